"""The shared tolerance policy and timing helpers must themselves be able to fail."""

import pytest
import torch

from omni_kernels.testing import (
    Record,
    assert_close,
    assert_close_to_oracle,
    do_bench,
    make_record,
    quantiles,
    set_speedups,
    tolerance,
)


def test_elementwise_table_accepts_one_rounding_and_rejects_more():
    x = torch.randn(1000, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert_close(x.to(dtype), x, dtype=dtype)  # one rounding passes
        atol, rtol = tolerance(dtype)
        with pytest.raises(AssertionError):
            assert_close((x * (1 + 4 * rtol) + 4 * atol).to(dtype), x, dtype=dtype)


def test_two_times_rule():
    oracle = torch.randn(64, 64, dtype=torch.float64)
    lowp = oracle + 1e-3 * torch.randn_like(oracle)
    good = oracle + 1.5e-3 * torch.randn_like(oracle).clamp(-1, 1)
    err, ref_err = assert_close_to_oracle(good, lowp, oracle)
    assert err <= 2 * ref_err + 1e-4
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_oracle(oracle + 1e-1, lowp, oracle)
    bad = good.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_close_to_oracle(bad, lowp, oracle)
    with pytest.raises(ValueError, match="shapes differ"):
        assert_close_to_oracle(good[:1], lowp, oracle)


def test_bench_and_records_on_cpu():
    p20, p50, p80 = do_bench(lambda: torch.randn(100, 100) @ torch.randn(100, 100), device="cpu", rep=5)
    assert 0 < p20 <= p50 <= p80
    assert quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((1.8, 3.0, 4.2))
    a = make_record(bench="x", provider="torch", shape="s", dtype=torch.float32, device="cpu", timing=(1, 2, 3),
                    nbytes=2e9, flops=4e12)
    b = make_record(bench="x", provider="cuda", shape="s", dtype=torch.float32, device="cpu", timing=(0.5, 0.5, 1))
    assert a.gbps == pytest.approx(1000.0) and a.tflops == pytest.approx(2000.0) and a.dtype == "float32"
    set_speedups([a, b], "torch")
    assert b.speedup == pytest.approx(4.0) and b.baseline == "torch"
    assert isinstance(a, Record) and set(a.to_dict()) >= {"bench", "ms_p50", "git", "triton"}
