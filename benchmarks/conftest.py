"""pytest-benchmark adapter: every ``bench_<x>.py`` here is collected as pytest-benchmark tests, one per case.

``pytest benchmarks --benchmark-only`` times each row of each bench module (the cases of its ``case_groups``, the
rows ``omni bench`` writes, same shapes and providers) as its own test, ``benchmarks/bench_<x>.py::<bench>[<provider>
|<dtype>|<shape>]``; each test's ``extra_info`` is the row's contract record, so the pytest-benchmark JSON
(``--benchmark-json``, ``--benchmark-autosave``) holds what ``omni bench --json`` does and ``--benchmark-compare``
compares two commits. ``--benchmark-disable`` runs every case once, untimed, and still builds and checks its
record: CI's guard against a bench that broke. What each field means and how the timings are taken:
docs/benchmarks.md.

Options: ``--bench-device`` (default ``cuda`` when there is one, else ``cpu``), ``--bench-quick`` (reduced shapes;
always on CPU, as ``omni bench``), ``--bench-preset`` (``qwen2.5-omni-7b`` or ``qwen2.5-omni-3b``). Markers: the
``omni bench`` suite of each module (``-m kernels``, ``-m model``, ``-m e2e``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from omni_benchmarks import SUITES
from omni_benchmarks.cases import Case, compile_limits, fill_speedups, peak_memory, release_memory
from omni_kernels.testing import RECORD_FIELDS, bench_rounds, describe_device, l2_flush_buffer, quantiles

# Modules whose cases depend on one another inside one run (the pipeline's HF model is built from ours, after ours
# is measured, and its memory ratio is written back on our row; serving times a whole load, not a callable): each
# runs its whole ``run()`` as one test that checks every record is complete.
WHOLE_RUN = ("bench_pipeline", "bench_serving")

HERE = Path(__file__).resolve().parent
SUITE_OF = {name: suite for suite, names in SUITES.items() for name in names}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("omni benchmarks")
    group.addoption("--bench-device", default=None, help="device of the benchmarks (default: cuda if present)")
    group.addoption("--bench-quick", action="store_true", help="reduced shapes (always on CPU)")
    group.addoption("--bench-preset", default="qwen2.5-omni-7b", choices=("qwen2.5-omni-7b", "qwen2.5-omni-3b"))


def pytest_configure(config: pytest.Config) -> None:
    for suite in SUITES:
        config.addinivalue_line("markers", f"{suite}: a bench of omni bench's {suite} suite")
    config.stash[_BASELINES] = {}


_BASELINES = pytest.StashKey[dict]()  # nodeid -> (baseline provider, baseline dtype) of each timed row


def bench_options(config: pytest.Config) -> tuple[str, bool, str]:
    """(device, quick, preset) of this session, resolved as ``omni bench`` resolves them."""
    device = config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = config.getoption("bench_quick") or torch.device(device).type != "cuda"
    return device, quick, config.getoption("bench_preset")


def pytest_collect_file(file_path, parent):
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and file_path.parent.resolve() == HERE:
        return BenchModule.from_parent(parent, path=file_path)
    return None


class BenchModule(pytest.Module):
    """A ``bench_<x>.py`` file: its items are the module's cases (or one whole-run item); the module object is the
    installed ``omni_benchmarks.bench_<x>``, never a second import of the file."""

    def _getobj(self):
        return importlib.import_module(f"omni_benchmarks.{self.path.stem}")

    def collect(self) -> Iterator[pytest.Item]:
        name = self.path.stem
        marks = [getattr(pytest.mark, SUITE_OF[name])] if name in SUITE_OF else []
        if name in WHOLE_RUN:
            item = BenchItem.from_parent(self, name=f"{name.removeprefix('bench_')}[whole run]", callobj=_bench_case)
            item.whole_run = True
            if not bench_options(self.config)[1]:
                # At full size a whole run is long by design (serving: 64 requests, then HF answering them one by
                # one); the ini's per-test timeout guards the quick runs only.
                marks = [*marks, pytest.mark.timeout(0)]
            yield _marked(item, marks)
            return
        if not hasattr(self.obj, "case_groups"):
            raise pytest.UsageError(f"{self.path}: a bench module needs case_groups() (benchmarks/cases.py), or an "
                                    f"entry in WHOLE_RUN with the reason")
        self.groups = self.obj.case_groups(*bench_options(self.config))
        self.keys = [group.keys for group in self.groups]
        self.built: tuple[int, list[Case] | BaseException] | None = None
        for g, group in enumerate(self.groups):
            for k, key in enumerate(group.keys):
                item = BenchItem.from_parent(self, name=f"{key.bench}[{key.provider}|{key.dtype}|{key.shape}]",
                                             callobj=_bench_case)
                item.case_index = (g, k)
                yield _marked(item, [*marks, pytest.mark.benchmark(group=f"{key.bench} | {key.shape} | {key.dtype}")])

    def case(self, g: int, k: int) -> Case:
        """Case ``k`` of group ``g``, building the group when it is not the one built (the previous one is
        dropped first). A group that failed to build fails each of its tests with the same error."""
        if self.built is None or self.built[0] != g:
            self.release()
            if self.groups is None:  # left earlier and revisited: the same rows, built afresh
                self.groups = self.obj.case_groups(*bench_options(self.config))
                if [group.keys for group in self.groups] != self.keys:
                    raise RuntimeError(f"{self.path.stem}: case_groups() named other rows than at collection")
            try:
                self.built = (g, self.groups[g].cases())
            except Exception as exc:
                self.built = (g, exc)
        built = self.built[1]
        if isinstance(built, BaseException):
            raise built
        return built[k]

    def release(self, module_done: bool = False) -> None:
        """Drops the built group (and with ``module_done`` the groups' shared models) and frees their memory."""
        had = self.built is not None and (isinstance(self.built[1], BaseException)
                                          or self.groups[self.built[0]].release)
        self.built = None
        if module_done:
            self.groups = None
        if had or module_done:
            release_memory()


class BenchItem(pytest.Function):
    """One case of a bench module (``case_index``: (group, case)), or a module's whole run."""

    case_index: tuple[int, int] | None = None
    whole_run: bool = False


def _marked(item: pytest.Item, marks: list) -> pytest.Item:
    for mark in marks:
        item.add_marker(mark)
    return item


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Frees a group's inputs once its last test has run, and a module's models once it is left."""
    if not isinstance(item, BenchItem) or item.case_index is None:
        return
    module = item.parent
    if not isinstance(nextitem, BenchItem) or nextitem.parent is not module:
        module.release(module_done=True)
    elif nextitem.case_index[0] != item.case_index[0]:
        module.release()


@pytest.fixture(scope="session", autouse=True)
def _compile_limits():
    """As ``omni bench``: a torch.compile row that hits dynamo's recompile limit is an error, not eager code."""
    with compile_limits():
        yield


def _bench_case(benchmark, request: pytest.FixtureRequest) -> None:
    """Times one case (or a module's whole run) and puts its contract record in ``benchmark.extra_info``."""
    item: BenchItem = request.node
    device, quick, preset = bench_options(request.config)
    if item.whole_run:
        _whole_run(benchmark, item, device, quick, preset)
        return
    case = item.parent.case(*item.case_index)
    if case.error is not None:
        if isinstance(case.error, ImportError):
            pytest.skip(f"{case.provider}: an optional package is missing ({case.error})")
        raise case.error
    record = (_time_loop if case.loop is not None else _time_call)(benchmark, case, torch.device(device))
    d = record.to_dict()
    assert (d["bench"], d["provider"], d["shape"], d["dtype"]) == tuple(case.key), (d, case.key)
    assert set(RECORD_FIELDS) <= set(d) and not d.get("error"), d
    assert 0 < d["ms_p20"] <= d["ms_p50"] <= d["ms_p80"], d
    benchmark.extra_info.update(d)
    request.config.stash[_BASELINES][item.nodeid] = (case.baseline, case.baseline_dtype)


def _time_call(benchmark, case: Case, device: torch.device):
    """A call case: ``fn`` once untimed (compilation, autotuning) and once to size the rounds, then rounds of one
    call each. On CUDA each round flushes L2 and synchronises in its setup (not timed), times the call between CUDA
    events and ends in a synchronize, so pytest-benchmark's own clock measures the GPU work to completion and the
    record's p20/p50/p80 are the events' times, as ``do_bench``'s. On CPU both are the wall clock of the call."""
    dev = torch.device(case.timer_device or device)
    cuda = dev.type == "cuda"
    flush = l2_flush_buffer(dev.index or 0) if cuda and case.flush_l2 else None
    samples: list[float] = []

    def setup() -> None:
        if flush is not None:
            flush.zero_()
        if cuda:
            torch.cuda.synchronize(dev)

    def call() -> None:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.fn()
            end.record()
            torch.cuda.synchronize(dev)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            case.fn()
            samples.append((time.perf_counter() - t0) * 1e3)

    with peak_memory(device, case.peak_memory) as peak:
        if benchmark.disabled:  # one untimed call; the record still gets built and checked
            benchmark.pedantic(call, setup=setup)
            timing = (samples[0],) * 3
        else:
            case.fn()
            setup()
            call()
            warmup, rounds = bench_rounds(samples.pop() / 1e3, warmup=case.warmup, rep=case.rep,
                                          max_seconds=case.max_seconds, cuda=cuda)
            benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=warmup)
            timing = quantiles(samples[warmup: warmup + rounds])
    return case.record(device, timing, peak_mib=peak[0])


def _time_loop(benchmark, case: Case, device: torch.device):
    """A loop case: the warm-up, then ``loop.rounds`` rounds (one with ``--benchmark-disable``), each a loop that
    synchronises at its end; pytest-benchmark times the rounds, the record comes from the steps inside them."""
    results: list = []

    def round_() -> None:
        results.append(case.fn())

    case.loop.warmup()
    benchmark.pedantic(round_, rounds=1 if benchmark.disabled else case.loop.rounds)
    return case.loop.record(results)


def _whole_run(benchmark, item: BenchItem, device: str, quick: bool, preset: str) -> None:
    """A module's whole ``run()`` as one round; every record must be complete (contract fields, a timing, no
    error). Its records go in ``extra_info["records"]``; their own ``baseline`` / ``speedup`` are already set."""
    pytest.importorskip("transformers", reason="the end-to-end benches compare against HF transformers")
    rows = benchmark.pedantic(lambda: item.parent.obj.run(device=device, quick=quick, preset=preset), rounds=1)
    rows = [r.to_dict() if hasattr(r, "to_dict") else r for r in rows]
    assert rows, "no records"
    for d in rows:
        assert set(RECORD_FIELDS) <= set(d), (d, set(RECORD_FIELDS) - set(d))
        assert not d.get("error") and d["ms_p50"] is not None and d["ms_p50"] > 0, d
    benchmark.extra_info["records"] = rows


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """The device, versions and commit of the run, as ``omni bench`` prints them."""
    device, quick, preset = bench_options(config)
    machine_info["omni"] = dict(describe_device(device), quick=quick, preset=preset)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """``speedup`` needs the baseline row's time: it is filled here, when the JSON is written, from the baseline row
    timed in this session (same bench and shape); it stays null when that row was not run."""
    baselines = config.stash[_BASELINES]
    rows = [(b["extra_info"], *baselines[b["fullname"]]) for b in output_json["benchmarks"]
            if b["fullname"] in baselines]
    fill_speedups(rows)
