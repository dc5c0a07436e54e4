"""Tolerance policy and timing helpers shared by the tests and the benchmarks.

Tolerances:
* elementwise ops (rotation, copies, activations): the per-dtype table :data:`TOLERANCES`, applied with
  :func:`assert_close`;
* attention and reductions: flash-attention's rule, :func:`assert_close_to_oracle`: the kernel's error
  against an fp32/fp64 oracle is at most twice the error of the same torch math run in the low
  precision, plus a small absolute floor for outputs that are exact in both.

Timing: :func:`do_bench` uses CUDA events (warm-up, then p20/p50/p80 of single-call times, with an L2
flush between calls when asked) on a GPU and the wall clock on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch

# dtype -> (atol, rtol) for elementwise ops. bf16 has 8 mantissa bits (eps 2^-8 ~ 3.9e-3 relative,
# one rounding of an fp32 result gives at most half of that, two roundings a full eps), fp16 has 11.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1.3e-6 * 8),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}")
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None, msg: str = ""):
    """Elementwise comparison with the tolerance of ``dtype`` (default: ``actual.dtype``)."""
    atol, rtol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}"
    )


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item() if a.numel() else 0.0


def assert_close_to_oracle(
    actual: torch.Tensor,
    torch_lowp: torch.Tensor,
    oracle: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "",
) -> tuple[float, float]:
    """Flash-attention's rule: ``|actual - oracle| <= factor * |torch_lowp - oracle| + floor`` (max norms).

    ``torch_lowp`` is the same computation done with torch in the kernel's precision, ``oracle`` in fp32 or
    fp64. ``floor`` (default: the fp32 elementwise atol scaled by the oracle's magnitude) keeps the rule
    meaningful when the torch error is exactly zero. Returns both errors so tests can print them.
    """
    if actual.shape != oracle.shape or torch_lowp.shape != oracle.shape:
        raise ValueError(f"shapes differ: actual {tuple(actual.shape)}, torch {tuple(torch_lowp.shape)}, "
                         f"oracle {tuple(oracle.shape)}")
    err = max_abs_err(actual, oracle)
    ref_err = max_abs_err(torch_lowp, oracle)
    if floor is None:
        scale = oracle.abs().max().item() if oracle.numel() else 1.0
        floor = 1e-5 * max(scale, 1.0)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the output"
    assert err <= factor * ref_err + floor, (
        f"{name}: max error {err:.3e} exceeds {factor} x torch's {ref_err:.3e} + {floor:.1e} (against the oracle)"
    )
    return err, ref_err


# ----------------------------------------------------------------------------------------------------- timing


def quantiles(samples_ms: list[float], qs=(0.2, 0.5, 0.8)) -> tuple[float, ...]:
    t = torch.tensor(samples_ms, dtype=torch.float64)
    return tuple(torch.quantile(t, q).item() for q in qs)


@functools.cache
def l2_flush_buffer(device_index: int) -> torch.Tensor:
    # 256 MB: larger than any current L2 (H100 50 MB, H200 60 MB), so each timed call starts cold.
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=f"cuda:{device_index}")


def bench_rounds(once_s: float, *, warmup: int, rep: int, max_seconds: float, cuda: bool) -> tuple[int, int]:
    """(warm-up calls, timed calls) for a function whose first call took ``once_s`` seconds: ``rep`` timed calls,
    fewer when they would take more than ``max_seconds`` (at least 3); on CUDA at least one warm-up call and no more
    than the timed calls, on CPU at most 2 (shared by :func:`do_bench` and the pytest-benchmark adapter)."""
    rep = max(3, min(rep, int(max_seconds / max(once_s, 1e-6))))
    return (max(1, min(warmup, rep)) if cuda else min(warmup, 2)), rep


def do_bench(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    rep: int = 50,
    device: torch.device | str = "cuda",
    flush_l2: bool = True,
    max_seconds: float = 10.0,
) -> tuple[float, float, float]:
    """Times ``fn()``; returns (p20, p50, p80) in milliseconds.

    CUDA: each call is bracketed by its own pair of events after an L2 flush, so the quantiles describe
    single calls at cold cache (what a decode step sees for weights and KV). CPU: wall clock per call.
    ``max_seconds`` caps the repetitions for slow functions (at least 3 timed calls).
    """
    device = torch.device(device)
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        warmup, rep = bench_rounds(time.perf_counter() - t0, warmup=warmup, rep=rep, max_seconds=max_seconds,
                                   cuda=True)
        for _ in range(warmup):
            fn()
        flush = l2_flush_buffer(device.index or 0) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        return quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])
    t0 = time.perf_counter()
    fn()
    warmup, rep = bench_rounds(time.perf_counter() - t0, warmup=warmup, rep=rep, max_seconds=max_seconds, cuda=False)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


# ------------------------------------------------------------------------------------------------- device info


@functools.cache
def git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# Published peak figures (dense, no sparsity) used beside the in-run measurements.
_SPECS = {
    "H100 80GB HBM3": {"hbm_gbps": 3350.0, "bf16_tflops": 989.0, "tf32_tflops": 494.0, "fp32_tflops": 67.0},
    "H100": {"hbm_gbps": 3350.0, "bf16_tflops": 989.0, "tf32_tflops": 494.0, "fp32_tflops": 67.0},
    "H200": {"hbm_gbps": 4800.0, "bf16_tflops": 989.0, "tf32_tflops": 494.0, "fp32_tflops": 67.0},
    "A100-SXM4-80GB": {"hbm_gbps": 2039.0, "bf16_tflops": 312.0, "tf32_tflops": 156.0, "fp32_tflops": 19.5},
}


def spec_for(name: str) -> dict | None:
    for key, spec in sorted(_SPECS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return spec
    return None


def describe_device(device: torch.device | str = "cuda") -> dict:
    """Name, SMs, memory, clocks, driver, versions and commit of the run."""
    device = torch.device(device)
    info = {
        "torch": torch.__version__,
        "triton": triton_version(),
        "git": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            name=p.name,
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            cuda=torch.version.cuda,
            spec=spec_for(p.name),
        )
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip().splitlines()
            if q:
                driver, sm_clock, mem_clock = (x.strip() for x in q[0].split(","))
                info.update(driver=driver, max_sm_clock=sm_clock, max_mem_clock=mem_clock)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    else:
        info.update(name=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return describe_device(device)["name"]


@functools.cache
def copy_bandwidth_gbps(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth measured in this run (bytes read + written per second, GB/s):
    the practical roofline for memory-bound kernels, reported beside the spec figure."""
    dev = torch.device(device)
    if dev.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    p20, p50, p80 = do_bench(lambda: dst.copy_(src), warmup=5, rep=20, device=dev, flush_l2=False)
    return 2 * nbytes / (p50 * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------ records

RECORD_FIELDS = ("bench", "provider", "shape", "dtype", "device", "ms_p20", "ms_p50", "ms_p80", "gbps", "tflops",
                 "baseline", "speedup", "torch", "triton", "git")


@dataclasses.dataclass
class Record:
    """One benchmark measurement in the contract's JSON format (null where a field does not apply)."""

    bench: str
    provider: str
    shape: str
    dtype: str | None
    device: str
    ms_p20: float | None
    ms_p50: float | None
    ms_p80: float | None
    gbps: float | None = None
    tflops: float | None = None
    baseline: str | None = None
    speedup: float | None = None
    torch: str = dataclasses.field(default_factory=lambda: torch.__version__)
    triton: str | None = dataclasses.field(default_factory=triton_version)
    git: str | None = dataclasses.field(default_factory=git_commit)
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in RECORD_FIELDS}
        d.update(self.extra)
        return d


def make_record(*, bench: str, provider: str, shape: str, dtype, device, timing: tuple[float, float, float] | None,
                nbytes: float | None = None, flops: float | None = None, **extra) -> Record:
    """Builds a :class:`Record` from a timing; GB/s and TFLOP/s follow from ``nbytes`` and ``flops``."""
    p20, p50, p80 = timing if timing is not None else (None, None, None)
    return Record(
        bench=bench,
        provider=provider,
        shape=shape,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        device=device if isinstance(device, str) and not device.startswith(("cuda", "cpu")) else device_name(device),
        ms_p20=p20,
        ms_p50=p50,
        ms_p80=p80,
        gbps=nbytes / (p50 * 1e-3) / 1e9 if nbytes and p50 else None,
        tflops=flops / (p50 * 1e-3) / 1e12 if flops and p50 else None,
        extra=extra,
    )


def set_speedups(records: list[Record], baseline: str) -> list[Record]:
    """Fills ``baseline``/``speedup`` (baseline p50 / own p50) for records of the same bench and shape."""
    base = {(r.bench, r.shape, r.dtype): r.ms_p50 for r in records if r.provider == baseline}
    for r in records:
        b = base.get((r.bench, r.shape, r.dtype))
        if b and r.ms_p50:
            r.baseline, r.speedup = baseline, b / r.ms_p50
    return records


def write_records(records: list[Record | dict], path: str) -> None:
    rows = [r.to_dict() if isinstance(r, Record) else r for r in records]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def bench_main(run, doc: str | None) -> None:
    """``python benchmarks/bench_<x>.py [--device D] [--quick] [--preset P]``: runs one bench module's ``run`` and
    prints its records as JSON (``omni bench`` is the usual way in)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="qwen2.5-omni-7b", help="qwen2.5-omni-7b, qwen2.5-omni-3b or tiny")
    args = parser.parse_args()
    print(json.dumps([r.to_dict() for r in run(args.device, args.quick, args.preset)], indent=1))


def backend_params(op: str) -> list:
    """The (backend, device) pytest params of an op's tests: torch and Triton on CPU, then torch, Triton and CUDA
    on a GPU (marked ``gpu``); each skips cleanly where this machine cannot run it."""
    import pytest

    cases = [("torch", "cpu"), ("triton", "cpu"), ("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]
    params = []
    for backend, device in cases:
        marks = [] if (backend, device) == ("torch", "cpu") else [skip_unless_backend(op, backend, device)]
        if device == "cuda":
            marks.insert(0, pytest.mark.gpu)
        params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


def skip_unless_backend(op: str, backend: str, device: str):
    """A pytest skip marker for a backend that this machine cannot run."""
    import pytest

    from omni_kernels._backend import missing_reason

    reason = missing_reason(backend, torch.device(device))
    if device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device"
    return pytest.mark.skipif(reason is not None, reason=f"{op}/{backend} on {device}: {reason}")
