"""The benchmark cases (benchmarks/cases.py) and the pytest-benchmark adapter (benchmarks/conftest.py): how rows
become records, speedups, failures, and the pytest-benchmark JSON of a real bench module."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni_benchmarks.cases import Case, CaseGroup, CaseKey, Loop, fill_speedups, keys, run_groups
from omni_kernels.testing import RECORD_FIELDS, make_record

ROOT = Path(__file__).resolve().parents[1]


def _group(cases: list[Case], **kw) -> CaseGroup:
    return CaseGroup([c.key for c in cases], lambda: cases, **kw)


def _fixed_timing(monkeypatch, timings: dict[str, tuple[float, float, float]]) -> None:
    """do_bench returns the timing of the provider whose call it is given (each fn returns its provider)."""
    import omni_benchmarks.cases as cases

    monkeypatch.setattr(cases, "do_bench", lambda fn, **kw: timings[fn()])


def test_speedups_against_the_baseline_row_of_the_same_shape(monkeypatch):
    _fixed_timing(monkeypatch, {"torch": (1.0, 2.0, 3.0), "fast": (0.5, 0.5, 0.5), "other": (1.0, 1.0, 1.0)})
    rows = run_groups([
        _group([Case("op", "torch", "a", torch.float32, lambda: "torch", baseline="torch", nbytes=4e6),
                Case("op", "fast", "a", torch.float32, lambda: "fast", baseline="torch", nbytes=4e6)]),
        _group([Case("op", "fast", "b", torch.float32, lambda: "fast", baseline="torch")]),  # no baseline row
        _group([Case("op", "other", "a", "tf32", lambda: "other", baseline="torch", baseline_dtype="float32"),
                Case("op", "torch", "a", "tf32", lambda: "torch")]),  # a baseline row without a baseline itself
    ], "cpu")
    got = [(r.provider, r.shape, r.dtype, r.baseline, r.speedup) for r in rows]
    assert got == [("torch", "a", "float32", "torch", 1.0), ("fast", "a", "float32", "torch", 4.0),
                   ("fast", "b", "float32", None, None), ("other", "a", "tf32", "torch", 2.0),
                   ("torch", "a", "tf32", None, None)]
    assert rows[1].gbps == pytest.approx(4e6 / 0.5e-3 / 1e9)
    for r in rows:
        assert set(RECORD_FIELDS) <= set(r.to_dict())


def test_fill_speedups_on_dicts_needs_a_timed_baseline():
    rows = [make_record(bench="op", provider=p, shape="s", dtype=None, device="cpu", timing=t).to_dict()
            for p, t in (("base", (1.0, 3.0, 4.0)), ("x", (1.0, 1.5, 2.0)), ("broken", None))]
    rows[0]["ms_p50"] = None  # a baseline that failed gives no speedups
    fill_speedups([(r, "base", None) for r in rows])
    assert [r["speedup"] for r in rows] == [None, None, None]
    rows[0]["ms_p50"] = 3.0
    fill_speedups([(r, "base", None) for r in rows])
    assert [(r["baseline"], r["speedup"]) for r in rows] == [("base", 1.0), ("base", 2.0), (None, None)]


def test_failures_become_records_only_where_the_bench_says_so():
    def boom():
        raise RuntimeError("kernel exploded " + "x" * 600)

    rows = run_groups([_group([
        Case("op", "caught", "s", torch.float32, boom, catch=True, extra={"weight_mb": 1.0}, peak_memory=True),
        Case("op", "unbuilt", "s", torch.float32, None, error=ImportError("no module named peer"), error_chars=20),
    ])], "cpu")
    caught, unbuilt = (r.to_dict() for r in rows)
    assert caught["error"].startswith("RuntimeError: kernel exploded") and len(caught["error"]) == 500
    assert caught["weight_mb"] == 1.0 and caught["peak_mib"] is None and caught["ms_p50"] is None
    assert unbuilt["error"] == "ImportError: no modu" and unbuilt["ms_p50"] is None
    with pytest.raises(RuntimeError, match="kernel exploded"):
        run_groups([_group([Case("op", "raised", "s", torch.float32, boom)])], "cpu")


def test_a_group_must_build_the_rows_it_names():
    group = CaseGroup(keys("op", ["torch", "triton"], "s", torch.bfloat16),
                      lambda: [Case("op", "torch", "s", torch.bfloat16, lambda: None)])
    assert group.keys == [CaseKey("op", "torch", "s", "bfloat16"), CaseKey("op", "triton", "s", "bfloat16")]
    with pytest.raises(ValueError, match="named the rows"):
        run_groups([group], "cpu")


def test_a_loop_case_warms_up_once_and_records_its_rounds():
    calls = {"warmup": 0, "round": 0}

    def warmup():
        calls["warmup"] += 1

    def round_():
        calls["round"] += 1
        return [float(calls["round"])] * 4  # the round's own step times

    def record(results):
        steps = [t for r in results for t in r]
        return make_record(bench="decode", provider="omni", shape="B=1", dtype=torch.float32, device="cpu",
                           timing=(min(steps), sorted(steps)[len(steps) // 2], max(steps)), rounds=len(results))

    (rec,) = run_groups([_group([Case("decode", "omni", "B=1", torch.float32, round_,
                                      loop=Loop(warmup, 3, record))])], "cpu")
    assert calls == {"warmup": 1, "round": 3}
    assert (rec.ms_p20, rec.ms_p50, rec.ms_p80, rec.extra["rounds"]) == (1.0, 2.0, 3.0, 3)


def _pytest_benchmarks(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}  # as `omni bench` runs
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def test_pytest_benchmark_json_holds_the_contract_records(tmp_path):
    """``pytest benchmarks/bench_silu_and_mul.py --benchmark-only``: one test per (provider, shape, dtype) of
    ``omni bench``'s rows, each with its record in extra_info and speedup filled from the baseline row."""
    from omni_benchmarks import bench_silu_and_mul as mod

    out = tmp_path / "bench.json"
    proc = _pytest_benchmarks("benchmarks/bench_silu_and_mul.py", "--benchmark-only", f"--benchmark-json={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    expected = [key for group in mod.case_groups("cpu", True, "qwen2.5-omni-7b") for key in group.keys]
    rows = {(b["extra_info"]["bench"], b["extra_info"]["provider"], b["extra_info"]["shape"],
             b["extra_info"]["dtype"]): b for b in data["benchmarks"]}
    assert sorted(rows) == sorted(tuple(k) for k in expected)
    omni = data["machine_info"]["omni"]
    assert omni["name"].startswith("cpu") and omni["torch"] == torch.__version__ and omni["quick"] is True
    for key, b in rows.items():
        d = b["extra_info"]
        assert set(RECORD_FIELDS) <= set(d), set(RECORD_FIELDS) - set(d)
        assert b["name"] == f"{key[0]}[{key[1]}|{key[3]}|{key[2]}]"
        assert b["stats"]["rounds"] >= 3 and 0 < d["ms_p20"] <= d["ms_p50"] <= d["ms_p80"]
        base = rows[(key[0], "torch", key[2], key[3])]["extra_info"]["ms_p50"]
        assert d["baseline"] == "torch" and d["speedup"] == pytest.approx(base / d["ms_p50"])
        assert d["gbps"] == pytest.approx(3 * int(key[2].split("T=")[1].split()[0]) * int(key[2].split("I=")[1])
                                          * 4 / (d["ms_p50"] * 1e-3) / 1e9)


def test_benchmark_disable_fails_a_broken_bench(tmp_path):
    """CI runs every case once with --benchmark-disable: a bench whose call raises fails its tests."""
    plugin = tmp_path / "break_silu.py"
    plugin.write_text("import omni_benchmarks.bench_silu_and_mul as m\n\n\n"
                      "def broken(gate_up):\n    raise RuntimeError('silu reference broke')\n\n\n"
                      "m.silu_and_mul_ref = broken\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    ok = _pytest_benchmarks("benchmarks/bench_silu_and_mul.py", "--benchmark-disable")
    assert ok.returncode == 0 and re.search(r"\b4 passed", ok.stdout), ok.stdout[-3000:]
    broken = _pytest_benchmarks("benchmarks/bench_silu_and_mul.py", "--benchmark-disable", "-p", "break_silu",
                                env=env)
    assert broken.returncode == 1, broken.stdout[-3000:]
    # Both providers call the reference (torch.compile of it too): every case fails, each with the bench's error.
    assert broken.stdout.count("RuntimeError: silu reference broke") >= 4 and re.search(r"\b4 failed", broken.stdout), \
        broken.stdout[-3000:]
