"""bench_serving on the CPU at toy sizes: every case gives a complete contract record, the numbers are consistent
(first text before first audio before the end, the burst's speedup is the ratio of its makespans, host time per
step recorded per batch size), and the TTFA plot is written."""

import dataclasses
import math

import pytest

from omni_benchmarks import bench_serving as bs
from omni_kernels.testing import RECORD_FIELDS

PLAN = dataclasses.replace(bs.CPU, num_requests=3, rate=20.0, thinker_tokens=3, talker_codes=14, burst=2,
                           host_batches=(1, 4), host_steps=3, max_num_seqs=4)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    pytest.importorskip("transformers")
    plot = tmp_path_factory.mktemp("serving") / "ttfa.png"
    rows = [r.to_dict() for r in bs.run("cpu", quick=True, plan=PLAN, plot_path=plot)]
    return rows, plot


def test_records_complete(records):
    rows, plot = records
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    for r in rows:
        assert set(RECORD_FIELDS) <= set(r) and r["bench"] == "serving" and r["dtype"] == "float32"
    providers = {r["provider"] for r in rows}
    assert providers == {bs.ENGINE, bs.HF, f"{bs.ENGINE}-burst", f"{bs.ENGINE}-sequential", f"{bs.ENGINE}-host"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert plot.is_file() and plot.stat().st_size > 0


def test_latencies_are_consistent(records):
    rows, _ = records
    for provider in (bs.ENGINE, bs.HF):
        r = next(r for r in rows if r["provider"] == provider)
        assert r["requests"] == PLAN.num_requests and r["failed"] == 0
        assert len(r["ttfa_ms"]) == PLAN.num_requests
        assert 0 < r["ttft_p50_ms"] <= r["ttfa_p50_ms"] <= r["ttfa_p99_ms"]
        assert r["audio_s_per_s"] > 0 and r["text_tokens_per_s"] > 0 and r["rtf_p50"] > 0
    hf = next(r for r in rows if r["provider"] == bs.HF)
    assert hf["ttft_p50_ms"] == hf["ttfa_p50_ms"], "HF returns text and audio together"


def test_burst_and_host_time(records):
    rows, _ = records
    burst = next(r for r in rows if r["provider"] == f"{bs.ENGINE}-burst")
    alone = next(r for r in rows if r["provider"] == f"{bs.ENGINE}-sequential")
    assert burst["baseline"] == alone["provider"]
    assert math.isclose(burst["speedup"], alone["ms_p50"] / burst["ms_p50"], rel_tol=1e-9)
    assert burst["requests"] == PLAN.burst and 0 < burst["ttfa_p50_ms"] <= burst["ttfa_p99_ms"] <= burst["ms_p50"]
    host = {r["shape"]: r for r in rows if r["provider"] == f"{bs.ENGINE}-host"}
    assert sorted(host) == ["tiny running=1", "tiny running=4"]
    for r in host.values():
        assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] and r["us_per_request"] > 0
