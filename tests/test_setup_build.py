"""setup.py's choice of building the CUDA extension: only where a GPU is present (for its architectures), unless
OMNI_BUILD_CUDA / OMNI_CUDA_ARCHS say otherwise."""

from __future__ import annotations

import runpy
import subprocess
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    """setup.py's functions, with setuptools.setup a no-op, a fake CUDA home holding nvcc, and nvidia-smi answering
    what ``gpus`` holds (None: no nvidia-smi)."""
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    for var in ("OMNI_BUILD_CUDA", "OMNI_CUDA_ARCHS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))  # no nvcc while setup.py itself runs
    ns = runpy.run_path(str(ROOT / "setup.py"))
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").touch()
    ns["_find_cuda_home"].__globals__["_find_cuda_home"] = lambda: tmp_path / "cuda"
    state = {"gpus": None}

    def run(cmd, **kw):
        assert cmd[0] == "nvidia-smi"
        if state["gpus"] is None:
            raise FileNotFoundError("nvidia-smi")
        return types.SimpleNamespace(stdout="\n".join(state["gpus"]) + "\n")

    fake = types.SimpleNamespace(run=run, SubprocessError=subprocess.SubprocessError)
    ns["_gpu_archs"].__globals__["subprocess"] = fake
    return ns, state


def test_no_gpu_skips_the_build(setup_py, monkeypatch):
    ns, state = setup_py
    assert ns["_want_cuda"]() is False  # nvcc present, no nvidia-smi
    state["gpus"] = []
    assert ns["_want_cuda"]() is False  # nvidia-smi, no GPU
    monkeypatch.setenv("OMNI_BUILD_CUDA", "1")
    assert ns["_want_cuda"]() is True and ns["_cuda_archs"]() == ["80", "90a"]
    monkeypatch.setenv("OMNI_CUDA_ARCHS", "80")
    assert ns["_cuda_archs"]() == ["80"]
    monkeypatch.delenv("OMNI_BUILD_CUDA")
    assert ns["_want_cuda"]() is True  # architectures asked for: a cross-build
    monkeypatch.setenv("OMNI_BUILD_CUDA", "0")
    assert ns["_want_cuda"]() is False


def test_gpus_pick_the_architectures(setup_py, monkeypatch):
    ns, state = setup_py
    state["gpus"] = ["9.0", "9.0", "8.6"]
    assert ns["_want_cuda"]() is True
    assert ns["_cuda_archs"]() == ["86", "90a"]
    monkeypatch.setenv("OMNI_CUDA_ARCHS", "80")
    assert ns["_cuda_archs"]() == ["80"]
