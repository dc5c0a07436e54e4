"""Install-level checks: imports with CUDA hidden, the backend resolver, the CLI."""

import os
import subprocess
import sys

import pytest
import torch

from omni_kernels import _backend, available, registered, resolve


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_imports_with_cuda_hidden():
    code = (
        "import torch, omni_kernels, omni_model, omni_model.cli\n"
        "assert not torch.cuda.is_available()\n"
        "from omni_kernels._backend import cuda_extension\n"
        "C = cuda_extension()\n"
        "print('ext', C is not None)\n"
        "if C is not None:\n"
        "    assert C.device_count() == 0\n"
        "    r = C.TensorRef(0, C.DType.float32, [1, 1, 4], [4, 4, 1], 0)\n"
        "    c = C.TensorRef(0, C.DType.float32, [1, 1, 1, 4], [4, 4, 4, 1], 0)\n"
        "    s = C.TensorRef(0, C.DType.int64, [1], [1], 0)\n"
        "    try:\n"
        "        C.store_kv_cache(r, r, c, c, s, 0)\n"
        "    except RuntimeError as e:\n"
        "        assert 'CUDA device' in str(e), e\n"
        "        print('clear error:', e)\n"
        "    else:\n"
        "        raise AssertionError('a call without a GPU must raise')\n"
    )
    out = _run(code, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr
    assert "ext" in out.stdout


def test_resolver_rules(monkeypatch):
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    assert registered()["store_kv_cache"] == ("torch", "triton", "cuda")
    assert resolve("store_kv_cache", "cpu") == "torch"
    assert "torch" in available("store_kv_cache", "cpu")
    assert "cuda" not in available("store_kv_cache", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve("store_kv_cache", "cpu", "tensorrt")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve("store_kv_cache", "cpu", "cuda")
    with pytest.raises(KeyError, match="unknown op"):
        resolve("no_such_op", "cpu")
    monkeypatch.setenv("OMNI_BACKEND", "torch")
    assert resolve("store_kv_cache", "cpu") == "torch"
    monkeypatch.setenv("OMNI_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        resolve("store_kv_cache", "cpu")
    assert resolve("store_kv_cache", "cpu", "torch") == "torch", "an explicit backend wins over OMNI_BACKEND"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if not _backend.triton_importable():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve("store_kv_cache", "cpu", "triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.gpu
def test_default_on_cuda_prefers_compiled():
    assert resolve("store_kv_cache", "cuda") in available("store_kv_cache", "cuda")


def test_cli_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "omni_model.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for sub in ("demo", "run", "bench"):
        assert sub in out.stdout


def test_bench_kernels_writes_contract_records(tmp_path):
    import json

    from omni_kernels.testing import RECORD_FIELDS

    path = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "omni_model.cli", "bench", "--suite", "kernels", "--only", "store_kv_cache",
         "--device", "cpu", "--json", str(path)], capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "small CPU suite" in out.stdout
    rows = json.loads(path.read_text())
    assert rows, "no records"
    providers = {r["provider"] for r in rows if r["bench"] == "store_kv_cache"}
    assert {"torch", "torch.compile"} <= providers
    for r in rows:
        assert set(RECORD_FIELDS) <= set(r), set(RECORD_FIELDS) - set(r)
        assert r["ms_p50"] > 0 and r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
