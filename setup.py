"""Build for omni: a pure-Python package plus the optional CUDA extension ``omni_kernels._C``.

The extension is pybind11 over raw device pointers and a CUDA stream handle (see csrc/bindings.cpp).
It links the static CUDA runtime and nothing of torch, so it builds beside a CPU-only torch and imports
on a machine without a GPU.

By default the extension is built only where it can run: when nvcc is found AND ``nvidia-smi`` reports GPUs, for
exactly their compute capabilities (9.0 builds sm_90a, the others their plain sm_XY). On a machine without a GPU
``pip install -e .`` is then pure Python and takes seconds instead of minutes of nvcc.

Environment:
  OMNI_BUILD_CUDA=0|1      skip, or force the extension (nvcc must exist; without a GPU it targets 80;90a)
  OMNI_CUDA_ARCHS="80;90a" build for these architectures (semicolon or comma separated), GPU present or not
  OMNI_NVCC_THREADS=N      nvcc --threads (default 4)
  MAX_JOBS=N               parallel nvcc jobs (default: number of CPUs)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _find_cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(os.path.realpath(nvcc)).parent.parent
    return None


DEFAULT_ARCHS = "80;90a"  # A100 and H100/H200: what a forced build without a GPU targets


def _gpu_archs() -> list[str]:
    """The compute capabilities of the GPUs here, as nvcc architectures ("9.0" -> "90a"); [] without a GPU or
    without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    archs = []
    for line in out.split():
        major, _, minor = line.strip().partition(".")
        if major.isdigit() and minor.isdigit():
            # sm_90a: the Hopper-only instructions (wgmma, TMA) need the arch-specific target.
            arch = f"{major}{minor}" + ("a" if (major, minor) == ("9", "0") else "")
            if arch not in archs:
                archs.append(arch)
    return sorted(archs)


def _cuda_archs() -> list[str]:
    raw = os.environ.get("OMNI_CUDA_ARCHS") or ";".join(_gpu_archs()) or DEFAULT_ARCHS
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("af").isdigit():
            raise ValueError(f"OMNI_CUDA_ARCHS: {a!r} is not an architecture like 80 or 90a")
    return archs


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the newest architecture so that newer GPUs can JIT it.
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _want_cuda() -> bool:
    flag = os.environ.get("OMNI_BUILD_CUDA")
    if flag is not None and flag not in ("0", "1"):
        raise ValueError(f"OMNI_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    cuda_home = _find_cuda_home()
    found = cuda_home is not None and (cuda_home / "bin" / "nvcc").exists()
    if flag == "1" and not found:
        raise RuntimeError("OMNI_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    if flag == "1" or not found:
        return found
    # Not forced: only where it can run, or where architectures were asked for explicitly.
    return bool(os.environ.get("OMNI_CUDA_ARCHS")) or bool(_gpu_archs())


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc (through ninja when available), then links them with the host-compiled
    pybind11 bindings and the static CUDA runtime."""

    def build_extension(self, ext: Extension) -> None:
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        if cu_sources:
            ext.extra_objects = self._compile_cuda(cu_sources) + list(ext.extra_objects or [])
        super().build_extension(ext)

    def _compile_cuda(self, sources: list[str]) -> list[str]:
        cuda_home = _find_cuda_home()
        nvcc = str(cuda_home / "bin" / "nvcc")
        archs = _cuda_archs()
        build_dir = Path(self.build_temp).resolve() / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        flags = [
            "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fPIC",
            f"--threads={os.environ.get('OMNI_NVCC_THREADS', '4')}", f"-I{CSRC}", f"-I{cuda_home / 'include'}",
            *_gencode_flags(archs),
        ]
        objects, jobs = [], []
        for src in sources:
            src_path = (ROOT / src).resolve()
            obj = build_dir / (src_path.stem + ".o")
            objects.append(str(obj))
            jobs.append((src_path, obj))
        print(f"omni: compiling {len(jobs)} CUDA sources for sm_{', sm_'.join(archs)}", flush=True)
        if shutil.which("ninja"):
            self._ninja(nvcc, flags, jobs, build_dir)
        else:
            for src_path, obj in jobs:
                cmd = [nvcc, *flags, "-c", str(src_path), "-o", str(obj)]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
        return objects

    def _ninja(self, nvcc: str, flags: list[str], jobs: list[tuple[Path, Path]], build_dir: Path) -> None:
        headers = sorted(str(p) for p in CSRC.rglob("*.h")) + sorted(str(p) for p in CSRC.rglob("*.cuh"))
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"flags = {' '.join(shlex.quote(f) for f in flags)}",
            "rule nvcc",
            "  command = $nvcc $flags -c $in -o $out",
            "  description = nvcc $in",
        ]
        for src_path, obj in jobs:
            lines.append(f"build {obj}: nvcc {src_path} | {' '.join(headers)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        cmd = ["ninja", "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        subprocess.check_call(cmd)


def _extensions() -> list[Extension]:
    if not _want_cuda():
        print("omni: building without the CUDA extension (OMNI_BUILD_CUDA=0, nvcc not found, or no GPU here; "
              "OMNI_BUILD_CUDA=1 forces it)", flush=True)
        return []
    import pybind11

    cuda_home = _find_cuda_home()
    lib_dirs = [str(p) for p in (cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets/x86_64-linux/lib")
                if (p / "libcudart_static.a").exists()]
    if not lib_dirs:
        raise RuntimeError(f"libcudart_static.a not found under {cuda_home}")
    archs = ";".join(_cuda_archs())
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + ["csrc/bindings.cpp"]
    return [
        Extension(
            "omni_kernels._C",
            sources=sources,
            include_dirs=[str(CSRC), pybind11.get_include(), str(cuda_home / "include")],
            library_dirs=lib_dirs,
            # Static runtime: no libcudart.so and no torch CUDA library at import time.
            extra_link_args=["-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread"],
            extra_compile_args=["-O3", "-std=c++17", f'-DOMNI_CUDA_ARCH_LIST="{archs}"'],
            language="c++",
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
