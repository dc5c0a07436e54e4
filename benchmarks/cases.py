"""Benchmark cases: every bench module's rows, defined once and run two ways.

A :class:`Case` is one row of a benchmark: a provider (one implementation) on one shape in one dtype, the callable
that one timed call runs, and what turns its time into the contract's record (bytes for GB/s, FLOPs for TFLOP/s,
the baseline provider of ``speedup``, extra fields). Cases that share inputs (one shape's tensors, one model, one
runner) form a :class:`CaseGroup`: the group names its rows up front, cheaply (no tensor, no model), and builds them
on demand, so that pytest can collect one test per row without allocating anything and both consumers hold one
group's inputs at a time.

Each bench module exposes ``case_groups(device, quick, preset) -> list[CaseGroup]`` and a ``run`` that is
``run_groups(case_groups(...), device)``. The two consumers:

* :func:`run_groups`: ``omni bench`` (through each module's ``run``) times every case with ``do_bench`` (a loop
  case: with its own rounds) and returns the records, speedups filled in;
* ``benchmarks/conftest.py``: ``pytest benchmarks`` collects one pytest-benchmark test per case and puts the same
  record in the test's ``extra_info`` (docs/benchmarks.md).

Two kinds of case:

* a *call* case (the default): ``fn`` is one call of the op; it is timed call by call (CUDA events after an L2
  flush on a GPU, the wall clock on CPU) and p20/p50/p80 of the calls make the record;
* a *loop* case (``loop`` set): ``fn`` is one round that times its own steps (a decode loop recording CUDA events
  between steps); ``loop.record`` makes the record from the rounds' results.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from omni_kernels.testing import Record, do_bench, make_record


class CaseKey(NamedTuple):
    """What names a row: the record's ``bench``, ``provider``, ``shape`` and ``dtype`` (as the record writes it)."""

    bench: str
    provider: str
    shape: str
    dtype: str | None


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """The record's spelling of a dtype (``bfloat16``; a precision name such as ``tf32`` stays as it is)."""
    return str(dtype).removeprefix("torch.") if dtype is not None else None


@dataclass
class Loop:
    """How a loop case runs: ``warmup()`` once (graph capture, compilation), then ``rounds`` calls of the case's
    ``fn``, whose results ``record`` turns into the record (the per-step times are inside the results)."""

    warmup: Callable[[], object]
    rounds: int
    record: Callable[[list[Any]], Record]


@dataclass
class Case:
    """One row: a provider on one shape in one dtype (module docstring).

    ``extra`` are record fields present whether the row succeeds or fails; ``finish`` adds the fields that follow
    from a successful timing (tokens/s, the share of the spec bandwidth). ``baseline`` is the provider whose p50
    over this row's p50 is ``speedup`` (same bench and shape; dtype ``baseline_dtype`` when it differs from this
    row's), None for no speedup. ``error``: building this row failed (the record says why; under pytest the test
    fails, or skips when an optional package is missing). ``catch``: an exception while timing becomes the record's
    ``error`` instead of stopping ``run`` (under pytest it always fails the test).
    """

    bench: str
    provider: str
    shape: str
    dtype: torch.dtype | str | None
    fn: Callable[[], object] | None = None
    nbytes: float | None = None
    flops: float | None = None
    baseline: str | None = None
    baseline_dtype: str | None = None
    extra: dict = field(default_factory=dict)
    finish: Callable[[Record], None] | None = None
    # do_bench's settings for a call case; timer_device: the clock that times it when not the bench's device.
    warmup: int = 10
    rep: int = 50
    max_seconds: float = 10.0
    flush_l2: bool = True
    timer_device: str | None = None
    peak_memory: bool = False  # record ``peak_mib``: the CUDA allocator's peak while timing (None on CPU)
    loop: Loop | None = None
    error: BaseException | None = None
    catch: bool = False
    error_chars: int = 500

    @property
    def key(self) -> CaseKey:
        return CaseKey(self.bench, self.provider, self.shape, dtype_name(self.dtype))

    def record(self, device: torch.device | str, timing: tuple[float, float, float], *,
               peak_mib: float | None = None) -> Record:
        """The record of a call case timed at ``timing`` (p20, p50, p80 in ms)."""
        extra = dict(self.extra, peak_mib=peak_mib) if self.peak_memory else self.extra
        rec = make_record(bench=self.bench, provider=self.provider, shape=self.shape, dtype=self.dtype, device=device,
                          timing=timing, nbytes=self.nbytes, flops=self.flops, **extra)
        if self.finish is not None:
            self.finish(rec)
        return rec

    def error_record(self, device: torch.device | str, exc: BaseException) -> Record:
        """The record of a row that failed: no timing, ``error`` says why."""
        extra = dict(self.extra, peak_mib=None) if self.peak_memory else dict(self.extra)
        extra["error"] = f"{type(exc).__name__}: {exc}"[: self.error_chars]
        return make_record(bench=self.bench, provider=self.provider, shape=self.shape, dtype=self.dtype,
                           device=device, timing=None, nbytes=self.nbytes, flops=self.flops, **extra)


@dataclass
class CaseGroup:
    """Rows that share inputs: ``keys`` names them (in order) without building anything; ``build()`` makes them.
    ``release``: after the group, collect garbage and return cached CUDA memory (models, runners, KV caches)."""

    keys: list[CaseKey]
    build: Callable[[], list[Case]]
    release: bool = False

    def cases(self) -> list[Case]:
        """``build()``, checked against ``keys``: a bench that names one row and builds another is a bug."""
        cases = self.build()
        built = [c.key for c in cases]
        if built != self.keys:
            raise ValueError(f"a case group named the rows {self.keys} but built {built}")
        return cases


def keys(bench: str, providers: Iterable[str], shape: str, dtype: torch.dtype | str | None) -> list[CaseKey]:
    """The keys of ``providers`` on one shape and dtype."""
    return [CaseKey(bench, p, shape, dtype_name(dtype)) for p in providers]


def release_memory() -> None:
    """Frees what nothing refers to any more (a group's models and runners) and returns it to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device, enabled: bool) -> Iterator[list[float | None]]:
    """Yields a one-element list that holds, on exit, the CUDA allocator's peak in MiB since entry (None on CPU or
    when not ``enabled``)."""
    out: list[float | None] = [None]
    cuda = enabled and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if cuda:
        out[0] = torch.cuda.max_memory_allocated(device) / 2**20


def time_case(case: Case, device: torch.device | str) -> Record:
    """``omni bench``'s timing of one case: ``do_bench`` for a call case, warm-up and rounds for a loop case."""
    dev = torch.device(device)
    if case.error is not None:
        return case.error_record(dev, case.error)
    try:
        if case.loop is not None:
            case.loop.warmup()
            return case.loop.record([case.fn() for _ in range(case.loop.rounds)])
        with peak_memory(dev, case.peak_memory) as peak:
            timing = do_bench(case.fn, device=case.timer_device or dev, warmup=case.warmup, rep=case.rep,
                              flush_l2=case.flush_l2, max_seconds=case.max_seconds)
        return case.record(dev, timing, peak_mib=peak[0])
    except Exception as exc:  # a provider's failure is a record, where the bench says so
        if not case.catch:
            raise
        return case.error_record(dev, exc)


def fill_speedups(rows: list[tuple[Record | dict, str | None, str | None]]) -> None:
    """Sets ``baseline`` and ``speedup`` (the baseline row's p50 over this row's) for every (record, baseline,
    baseline dtype) whose baseline row is among ``rows`` with a timing; records may be Records or their dicts."""

    def get(r, name):
        return r[name] if isinstance(r, dict) else getattr(r, name)

    p50 = {(get(r, "bench"), get(r, "shape"), get(r, "dtype"), get(r, "provider")): get(r, "ms_p50")
           for r, _, _ in rows}
    for r, baseline, baseline_dtype in rows:
        if baseline is None:
            continue
        base = p50.get((get(r, "bench"), get(r, "shape"), baseline_dtype or get(r, "dtype"), baseline))
        own = get(r, "ms_p50")
        if base and own:
            if isinstance(r, dict):
                r["baseline"], r["speedup"] = baseline, base / own
            else:
                r.baseline, r.speedup = baseline, base / own


def run_groups(groups: Iterable[CaseGroup], device: torch.device | str) -> list[Record]:
    """Times every case of ``groups`` in order, one group's inputs alive at a time; returns the records with their
    speedups."""
    rows: list[tuple[Record, str | None, str | None]] = []
    for group in groups:
        cases = group.cases()
        for case in cases:
            rows.append((time_case(case, device), case.baseline, case.baseline_dtype))
        del cases
        if group.release:
            release_memory()
    fill_speedups(rows)
    return [r for r, _, _ in rows]


def compile_limits() -> contextlib.AbstractContextManager:
    """Benches compile one reference over many shapes on purpose: past dynamo's recompile limit (8) a
    ``torch.compile`` provider would silently time eager code. Raise the limit, and make a hit an error."""
    import torch._dynamo.config as dynamo

    limits = {"recompile_limit": 64, "fail_on_recompile_limit_hit": True}
    return dynamo.patch({k: v for k, v in limits.items() if hasattr(dynamo, k)})


def compiled_backends(op: str, device: torch.device, *, cpu_triton: bool = False) -> list[str]:
    """The op's backends other than the torch reference that can run here; Triton on CPU (the interpreter, whose
    timings mean nothing) only with ``cpu_triton``."""
    from omni_kernels import available

    return [b for b in available(op, device)
            if b != "torch" and (cpu_triton or not (b == "triton" and device.type == "cpu"))]
