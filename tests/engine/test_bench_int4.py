"""The int4 benchmarks run on CPU and give complete records: the w4a16_linear rows (torch reference,
torch.compile of it and the float F.linear at the same shape, in one run) and bench_thinker's int4 decode and
prefill rows beside the float LM at the same shapes."""

import pytest
import torch

from omni_kernels.testing import RECORD_FIELDS


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_w4a16_linear_bench_records(one_thread):
    from omni_benchmarks import SUITES, bench_w4a16_linear

    assert "bench_w4a16_linear" in SUITES["kernels"]
    rows = [r.to_dict() for r in bench_w4a16_linear.run(device="cpu", quick=True)]
    (name, k, n), = bench_w4a16_linear.CPU_SHAPES
    groups = k // bench_w4a16_linear.GROUP
    int4 = k * n // 2 + 2 * groups * n * 4 + n * 4  # packed weights, fp32 scales and zero points, bias
    assert {(d["provider"], d["shape"]) for d in rows} == {
        (p, f"{name} M={m} K={k} N={n} g=128") for p in ("torch", "torch.compile", "F.linear") for m in (1, 8)}
    for d in rows:
        assert set(RECORD_FIELDS) <= set(d) and d.get("error") is None, d
        assert 0 < d["ms_p20"] <= d["ms_p50"] <= d["ms_p80"]
        assert d["weight_mb"] * 1e6 == (n * k + n) * 4 if d["provider"] == "F.linear" else int4
        assert d["baseline"] == "F.linear" and d["speedup"] > 0 and d["tflops"] > 0


def test_thinker_int4_bench_records(one_thread):
    from omni_benchmarks import bench_thinker

    dev = torch.device("cpu")
    plan = bench_thinker.plan_for(dev, True)
    cfg = bench_thinker.OmniConfig.preset("tiny")
    text = cfg.thinker_config.text_config
    prompts = [list(range(20, 20 + plan.prompt))]
    rows = [r.to_dict() for r in bench_thinker.run_int4(dev, plan, "tiny", text, torch.float32, prompts,
                                                        set(cfg.thinker_config.stop_token_ids))]
    by = {(d["bench"], d["provider"]): d for d in rows}
    assert set(by) == {(b, p) for b in ("thinker_decode_int4", "thinker_prefill_int4")
                       for p in ("omni-float", "omni-int4")}
    for d in rows:
        assert set(RECORD_FIELDS) <= set(d) and d.get("error") is None, d
        assert d["ms_p50"] > 0 and d["baseline"] == "omni-float" and d["speedup"] > 0
    decode_float, decode_int4 = by["thinker_decode_int4", "omni-float"], by["thinker_decode_int4", "omni-int4"]
    # The int4 decoder linears read about 1/8 of their fp32 bytes (plus scales and zero points).
    assert decode_int4["weight_gb"] < decode_float["weight_gb"]
    assert decode_int4["gbps"] == pytest.approx((decode_int4["weight_gb"] + decode_int4["kv_mb"] / 1e3)
                                                / decode_int4["ms_p50"] * 1e3)
    assert by["thinker_prefill_int4", "omni-int4"]["shape"].startswith("thinker-tiny prefill T=64")
