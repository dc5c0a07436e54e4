"""Thinker decode: tokens/s and % of the weight-bytes roofline at batch 1 and 8, against HF ``generate``.

What is measured: the Thinker LM (``ThinkerTextModel`` + ``lm_head``, random weights at the
preset's shapes, bf16 on CUDA) prefills a 64-token text prompt, then runs N greedy decode steps per sequence
through the engine's :class:`~omni_model.engine.runner.DecoderRunner` (paged KV cache, CUDA graphs). A decode
step must read every weight once: the decoder layers, the final norm, ``lm_head`` and one embedding row per
sequence (7B: 14.1 GB, 4.2 ms at 3.35 TB/s), plus each sequence's cached keys and values; ``gbps`` counts
exactly those bytes (weights + KV read at the mean context of the run) per p50 step.

Providers (same weights, same prompt, same process):

* ``omni``: the runner with CUDA graphs, a sync-free loop (the sampled ids stay on the device);
* ``omni-sync``: the same loop reading each step's ids back to the host, as a serving loop does to check for
  stop ids (shows how much host work per step is exposed once the host waits for the GPU);
* ``torch-eager``: the runner without CUDA graphs (CUDA only: on CPU it is ``omni``), what graphs buy;
* ``omni-all-cuda`` / ``omni-all-triton`` (CUDA only): ``omni`` with every op on one compiled backend, including
  the fused ``add_rms_norm`` / ``silu_and_mul`` that ``backend=None`` leaves on torch until they are measured;
* ``hf-generate``: transformers' ``Qwen2_5OmniThinkerForConditionalGeneration`` (encoders shrunk to a stub:
  a text prompt never runs them) with our weights copied in, ``generate(do_sample=False, min_new_tokens=N + 1,
  max_new_tokens=N + 1)`` from the same prompt ids; the baseline of ``speedup``.

Timing: per-step intervals between CUDA events recorded at the step boundaries (HF: from a logits processor,
which HF calls once per generated token), so p20/p50/p80 are single decode steps with prefill excluded on
both sides; ``ms_mean`` is the whole decode loop divided by N. Extra fields: ``tokens_per_s`` (batch x 1000 /
p50), ``pct_of_copy_bw`` (``gbps`` against the device-to-device copy bandwidth measured in this run),
``pct_of_spec_bw`` (against the published HBM figure), ``weight_gb``, ``kv_mb`` (KV bytes read per step),
``host_ms`` (p50 host time to issue one step: when it exceeds the GPU step the loop is host-bound),
``match_tokens`` (leading generated ids equal to ``omni``'s in every row: 100% on the fp32 CPU run shows
the weights were copied right; random bf16 weights drift apart after a few ids), ``error`` (a failed
provider, recorded instead of stopping the bench).

On CPU (or ``quick``): the tiny preset on CPU (fp32, a few steps, HF included when transformers imports); on
CUDA with ``quick`` the preset at batch 1 with fewer steps.

Int4 (:func:`run_int4`): the same LM with its decoder linears random int4 (AWQ-style zero points, group
128; ``omni_model.layers.quant_linear``), next to the float model at the same shapes, in the same run:

* ``thinker_decode_int4``: batch 1 decode, providers ``omni-float`` (the float decoder, as ``omni``) and
  ``omni-int4`` (backend None: the op's default), on CUDA also ``omni-int4-cuda`` / ``omni-int4-triton`` (the
  int4 linears, and every other op, on one compiled backend). ``gbps`` counts each provider's own weight bytes,
  so for the int4 rows ``pct_of_copy_bw`` / ``pct_of_spec_bw`` are the share of the int4 weight-bytes roofline;
  ``speedup`` is against ``omni-float`` (tokens/s ratio; the issue's target is 2.5x).
* ``thinker_prefill_int4``: one prefill of 2048 tokens (CPU: 64) at batch 1, ms per prefill, the same providers;
  ``speedup`` against ``omni-float`` (the target is 0.8x or better).

On CPU the tiny LM's SwiGLU width 37 is not a multiple of 32, so the int4 section widens it to 64 (group 32) for
both its float and int4 rows.

The helpers below (random init on the device, the timed decode loop, HF generate timing, weight copy into HF)
are shared with ``bench_talker``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from omni_benchmarks.cases import Case, CaseGroup, CaseKey, Loop, dtype_name, keys, run_groups
from omni_kernels.testing import (
    Record,
    bench_main,
    copy_bandwidth_gbps,
    device_name,
    make_record,
    quantiles,
    spec_for,
)
from omni_model.config import OmniConfig
from omni_model.engine.runner import DecoderRunner, RunnerConfig
from omni_model.layers.backend import use_backend
from omni_model.layers.quant_linear import init_random_int4_, quantize_decoder_
from omni_model.layers.sampler import SamplingParams, SamplingRows, sample
from omni_model.models.thinker import ThinkerTextModel
from omni_model.quant import QuantConfig
from omni_model.weights import checkpoint_plan

SEED = 0
BLOCK_SIZE = 16
WARMUP_STEPS = 3
GREEDY = SamplingParams()


@dataclass(frozen=True)
class Plan:
    """Prompt length, decode steps, batch sizes and timed repetitions of one run."""

    prompt: int
    steps: int
    batches: tuple[int, ...]
    reps: int


FULL = Plan(prompt=64, steps=128, batches=(1, 8), reps=2)
QUICK_CUDA = Plan(prompt=64, steps=32, batches=(1,), reps=1)
QUICK_CPU = Plan(prompt=16, steps=6, batches=(1, 2), reps=1)
# The encoders of HF's Thinker never run on a text prompt; shrinking them keeps HF's copy to the LM's size.
HF_STUB_AUDIO = dict(encoder_layers=1, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=16)
HF_STUB_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, fullatt_block_indexes=[0])


def plan_for(device: torch.device, quick: bool) -> Plan:
    if device.type != "cuda":
        return QUICK_CPU
    return QUICK_CUDA if quick else FULL


def preset_for(device: torch.device, preset: str) -> str:
    return preset if device.type == "cuda" else "tiny"


def short_name(preset: str) -> str:
    return preset.strip().lower().removeprefix("qwen/").removeprefix("qwen2.5-omni-")


# --------------------------------------------------------------------------------------- random weights


@torch.no_grad()
def init_random_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights in place on the module's device: matrices N(0, 1/fan_in) (unit-gain layers, so logits
    are O(1) and greedy ids are not decided by rounding), norm weights 1, other vectors N(0, 0.02)."""
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return module


def build_random(factory: Callable[[], nn.Module], *, dtype: torch.dtype, device: torch.device,
                 seed: int) -> nn.Module:
    """Builds ``factory()`` on the meta device and materialises it on ``device`` in ``dtype`` with random
    weights (a 7B LM in seconds: no host allocation, no CPU init, no copy)."""
    with torch.device("meta"):
        module = factory()
    if any(True for _ in module.buffers()):
        raise ValueError(f"{type(module).__name__} has buffers, which meta construction would leave empty")
    module = module.to(dtype=dtype).to_empty(device=device)
    init_random_(module, seed)
    return module.requires_grad_(False).eval()


def param_bytes(*modules: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    skipped = {id(p) for m in skip for p in m.parameters()}
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in skipped and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def safe_ids(vocab: int, excluded: set[int], n: int, gen: torch.Generator) -> list[int]:
    """``n`` random ids in [0, vocab) avoiding ``excluded`` (media / stop ids that would change HF's path)."""
    ok = torch.ones(vocab, dtype=torch.bool)
    ok[[i for i in excluded if 0 <= i < vocab]] = False
    pool = ok.nonzero().squeeze(1)
    return pool[torch.randint(len(pool), (n,), generator=gen)].tolist()


def allowed_mask(vocab: int, banned: set[int], device: torch.device) -> torch.Tensor | None:
    """Ids the loop may emit: all but ``banned`` (HF's ``min_new_tokens`` bans the stop ids until the last
    step, ``suppress_tokens`` bans others), so both sides decode the same N ids; None when nothing is banned."""
    if not banned:
        return None
    mask = torch.ones(vocab, dtype=torch.bool, device=device)
    mask[sorted(banned)] = False
    return mask


# --------------------------------------------------------------------------------------- our decode loop


@dataclass
class DecodeSpec:
    """What the loop feeds one decoder (shapes: B sequences, P prompt tokens, H decoder width)."""

    decoder: nn.Module
    prompt_ids: Callable[[int], list[list[int]]]  # batch -> B lists of P ids (the block manager's keys)
    prefill_inputs: Callable[[int], torch.Tensor]  # batch -> (B * P, H) decoder inputs
    step_inputs: Callable[[torch.Tensor, int], torch.Tensor]  # (ids (B,), step) -> (B, H)
    logits: Callable[[torch.Tensor], torch.Tensor]  # hidden (B, H) -> (B, V) float32
    allowed: torch.Tensor | None = None

    def next_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy ids through the engine's sampler (its per-row settings go up with every step, as there)."""
        logits = self.logits(hidden)
        rows = SamplingRows.build([GREEDY] * logits.shape[0], [0.0] * logits.shape[0], logits.shape[-1],
                                  logits.device)
        return sample(logits, rows, allowed=self.allowed)


@dataclass
class LoopResult:
    step_ms: list[float]  # one value per timed decode step
    ms_mean: float  # the decode loop's time / steps
    tokens: torch.Tensor  # (B, steps + 1) on the host: the prefill's id, then one per step
    host_ms: list[float] = field(default_factory=list)  # host time to issue each step
    extra: dict = field(default_factory=dict)


def make_runner(decoder: nn.Module, *, graphs: bool, plan: Plan, max_model_len: int, dtype: torch.dtype,
                device: torch.device) -> DecoderRunner:
    """A runner sized for the plan's largest batch; ``max_model_len`` is the model's (as the engine sets it,
    so the per-step block-table copy has its real width)."""
    per_seq = -(-(plan.prompt + plan.steps + WARMUP_STEPS + 2) // BLOCK_SIZE)
    batch = max(plan.batches)
    config = RunnerConfig(num_blocks=batch * per_seq + 2, block_size=BLOCK_SIZE, max_model_len=max_model_len,
                          max_batch=batch, cuda_graphs=graphs)
    return DecoderRunner(decoder, config, dtype=dtype, device=device)


@torch.inference_mode()
def decode_loop(runner: DecoderRunner, spec: DecodeSpec, batch: int, steps: int, *,
                sync_each_step: bool = False) -> LoopResult:
    """Prefill B prompts, then ``steps`` greedy decode steps at batch B; times each step.

    Positions stay on the device (incremented in place) and the sampled ids feed the next step without a host
    round trip, so nothing waits for the GPU unless ``sync_each_step`` reads the ids back.
    """
    dev = runner.device
    cuda = dev.type == "cuda"
    ids = spec.prompt_ids(batch)
    prompt = len(ids[0])
    seqs = [runner.allocate(len(p)) for p in ids]
    try:
        positions = torch.arange(prompt, device=dev).repeat(batch).expand(3, -1).contiguous()
        hidden = runner.prefill(seqs, spec.prefill_inputs(batch), positions)
        tok = spec.next_ids(hidden[prompt - 1 :: prompt])
        out = [tok]
        pos = torch.full((3, batch), prompt, dtype=torch.int64, device=dev)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
        stamps, host = [], []
        if cuda:
            torch.cuda.synchronize(dev)
            events[0].record()
        stamps.append(time.perf_counter())
        for step in range(steps):
            t0 = time.perf_counter()
            if runner.reserve_decode(seqs):
                raise RuntimeError("the runner's KV cache is full")
            hidden = runner.decode(seqs, spec.step_inputs(tok, step), pos)
            tok = spec.next_ids(hidden)
            pos.add_(1)
            out.append(tok)
            host.append((time.perf_counter() - t0) * 1e3)
            if sync_each_step:
                tok.tolist()
            if cuda:
                events[step + 1].record()
            stamps.append(time.perf_counter())
        if cuda:
            torch.cuda.synchronize(dev)
            step_ms = [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:])]
            total = events[0].elapsed_time(events[-1])
        else:
            step_ms = [(b - a) * 1e3 for a, b in zip(stamps[:-1], stamps[1:])]
            total = (stamps[-1] - stamps[0]) * 1e3
        return LoopResult(step_ms, total / max(steps, 1), torch.stack(out, 1).cpu(), host)
    finally:
        for s in seqs:
            runner.free(s)


def pool_runs(runs: list[LoopResult]) -> LoopResult:
    """The timed loops of one provider pooled: every step's time, the mean of the loops' ms per step, the first
    loop's ids."""
    return LoopResult(
        step_ms=[t for r in runs for t in r.step_ms],
        ms_mean=sum(r.ms_mean for r in runs) / len(runs),
        tokens=runs[0].tokens,
        host_ms=[t for r in runs for t in r.host_ms],
    )


def with_backend(backend: str | None, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with every op on ``backend`` (None: each op's default)."""

    def call():
        with use_backend(backend):
            return fn()

    return call


# --------------------------------------------------------------------------------------- HF generate


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silences transformers' advisory warnings (generation flags, config keys it does not validate)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def hf_build_context(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Builds HF modules directly on ``device`` in ``dtype`` (what ``from_pretrained`` would do), restoring
    torch's defaults afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), quiet_hf():
            yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def copy_into_hf(ours: nn.Module, hf: nn.Module, *, what: str) -> None:
    """Copies ``ours`` into the HF module with the same checkpoint names (fused q/k/v and gate/up split back by
    :func:`omni_model.weights.checkpoint_plan`); every HF parameter must be filled, with the right shape."""
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    ours_params = dict(ours.named_parameters())
    missing = []
    for key, target in checkpoint_plan(ours).items():
        if key not in hf_params:
            missing.append(key)
            continue
        src = ours_params[target.param]
        if target.start is not None:
            src = src[target.start : target.stop]
        dest = hf_params.pop(key)
        if dest.numel() != src.numel():
            raise ValueError(f"{what}: {key} has {tuple(dest.shape)} in HF, ours {tuple(src.shape)}")
        dest.copy_(src.reshape(dest.shape))
    if missing or hf_params:
        raise ValueError(f"{what}: weight names differ from HF's: ours only {sorted(missing)[:5]}, "
                         f"HF only {sorted(hf_params)[:5]}")


def untie(hf_head: nn.Linear, hf_embed: nn.Embedding) -> None:
    """HF ties ``lm_head`` to the embedding where its config says so; the Thinker's are separate tensors."""
    if hf_head.weight.data_ptr() == hf_embed.weight.data_ptr():
        hf_head.weight = nn.Parameter(torch.empty_like(hf_embed.weight), requires_grad=False)


def _event_marker(device: torch.device, stamps: list):
    """A logits processor that records a CUDA event (CPU: the wall clock) each time HF scores a new token."""
    from transformers import LogitsProcessor

    class Marker(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if device.type == "cuda":
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                stamps.append(e)
            else:
                stamps.append(time.perf_counter())
            return scores

    return Marker()


@torch.inference_mode()
def hf_generate_loop(hf: nn.Module, kwargs: Callable[[], dict], steps: int, device: torch.device) -> LoopResult:
    """One ``generate`` of ``steps + 1`` greedy ids (the prefill's, then ``steps`` decode steps); the intervals
    between consecutive scoring calls are HF's decode steps."""
    from transformers import LogitsProcessorList

    stamps: list = []
    marker = LogitsProcessorList([_event_marker(device, stamps)])
    t0 = time.perf_counter()
    with quiet_hf():
        seqs = hf.generate(**kwargs(), do_sample=False, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                           logits_processor=marker)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        step_ms = [a.elapsed_time(b) for a, b in zip(stamps[:-1], stamps[1:])]
        total = stamps[0].elapsed_time(stamps[-1])
    else:
        step_ms = [(b - a) * 1e3 for a, b in zip(stamps[:-1], stamps[1:])]
        total = (stamps[-1] - stamps[0]) * 1e3
    wall = (time.perf_counter() - t0) * 1e3
    if len(step_ms) != steps:
        raise RuntimeError(f"HF generate scored {len(stamps)} tokens, expected {steps + 1}")
    seqs = seqs.sequences if hasattr(seqs, "sequences") else seqs
    return LoopResult(step_ms, total / steps, seqs[:, -(steps + 1):].cpu(),
                      extra={"ms_per_token_incl_prefill": wall / (steps + 1)})


def pool_hf(runs: list[LoopResult]) -> LoopResult:
    """HF's timed generates pooled as :func:`pool_runs` does, with their mean ms per token including the prefill."""
    return LoopResult(
        step_ms=[t for r in runs for t in r.step_ms],
        ms_mean=sum(r.ms_mean for r in runs) / len(runs),
        tokens=runs[0].tokens,
        extra={"ms_per_token_incl_prefill": sum(r.extra["ms_per_token_incl_prefill"] for r in runs) / len(runs)},
    )


# --------------------------------------------------------------------------------------- records


@dataclass
class Roofline:
    """Bytes one decode step must read, and the bandwidths to hold them against."""

    weight_bytes: Callable[[int], float]  # batch -> weight bytes read per step
    kv_bytes_per_token: float  # K and V of one cached token, all layers
    copy_gbps: float
    spec_gbps: float | None

    def step_bytes(self, batch: int, plan: Plan) -> tuple[float, float]:
        """(weight bytes, KV bytes) per step at the run's mean context (step j attends prompt + j + 1 tokens)."""
        mean_ctx = plan.prompt + (plan.steps + 1) / 2
        return self.weight_bytes(batch), batch * mean_ctx * self.kv_bytes_per_token


def device_roofline(device: torch.device, weight_bytes: Callable[[int], float],
                    kv_bytes_per_token: float) -> Roofline:
    spec = spec_for(device_name(device)) if device.type == "cuda" else None
    return Roofline(weight_bytes, kv_bytes_per_token, copy_bandwidth_gbps(str(device)),
                    spec["hbm_gbps"] if spec else None)


def step_fields(roof: Roofline, batch: int, plan: Plan) -> dict:
    """The bytes a decode step reads at ``batch``: ``weight_gb`` and ``kv_mb`` (in every record, failed or not)."""
    weight, kv = roof.step_bytes(batch, plan)
    return dict(weight_gb=weight / 1e9, kv_mb=kv / 1e6)


def decode_record(*, bench: str, provider: str, shape: str, dtype: torch.dtype, device: torch.device,
                  batch: int, plan: Plan, roof: Roofline, result: LoopResult,
                  reference: torch.Tensor | None = None) -> Record:
    """The record of one provider's pooled decode loops at one shape."""
    weight, kv = roof.step_bytes(batch, plan)
    timing = quantiles(result.step_ms)
    rec = make_record(bench=bench, provider=provider, shape=shape, dtype=dtype, device=device, timing=timing,
                      nbytes=weight + kv, **step_fields(roof, batch, plan))
    p50 = timing[1]
    rec.extra.update(
        tokens_per_s=1e3 / p50 * batch,
        pct_of_copy_bw=100.0 * rec.gbps / roof.copy_gbps,
        pct_of_spec_bw=100.0 * rec.gbps / roof.spec_gbps if roof.spec_gbps else None,
        ms_mean=result.ms_mean,
        tokens_per_s_mean=1e3 / result.ms_mean * batch,
        host_ms=quantiles(result.host_ms)[1] if result.host_ms else None,
        **result.extra,
    )
    if reference is not None:
        rec.extra["match_tokens"] = leading_matches(result.tokens, reference)
    return rec


def leading_matches(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids (B, L) agree in every row."""
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n] == b[:, :n]).all(0)
    return n if bool(same.all()) else int(same.to(torch.int8).argmin())


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


@dataclass
class DecodeSetup:
    """What the decode groups of one decoder share, built on first use: the decoder and what feeds it, the
    model's ``max_model_len`` (the engine's, so the per-step block-table copy has its real width), the roofline,
    and HF's twin (``hf_factory``: HF's model with our weights; ``hf_kwargs(batch)``: its generate arguments)."""

    spec: DecodeSpec
    max_model_len: int
    roof: Roofline
    hf_factory: Callable[[], nn.Module]
    hf_kwargs: Callable[[int], Callable[[], dict]]


HF_GENERATE = "hf-generate"


def decode_variants(device: torch.device) -> list[tuple[str, bool, bool, str | None]]:
    """(provider, CUDA graphs, sync each step, backend of every op) of our decode loop on ``device``."""
    variants = [("omni", True, False, None), ("omni-sync", True, True, None)]
    if device.type == "cuda":
        variants.append(("torch-eager", False, False, None))
        # Every op on one compiled backend, the fused add_rms_norm / silu_and_mul included (their default is the
        # torch reference until a run like this one shows them winning).
        variants += [("omni-all-cuda", True, False, "cuda"), ("omni-all-triton", True, False, "triton")]
    return variants


def decode_groups(*, bench: str, label: Callable[[int], str], plan: Plan, dtype: torch.dtype, device: torch.device,
                  setup: Callable[[], DecodeSetup]) -> list[CaseGroup]:
    """``omni`` / ``omni-sync`` / ``torch-eager`` / ``omni-all-*`` on our runner and ``hf-generate`` at each batch
    of the plan: one group per runner (the variants with the same CUDA graphs and backend: a captured graph keeps
    the kernels of the backend it was captured with), then one for HF. A provider that fails gets a record with its
    ``error`` and the others go on. ``match_tokens`` compares each row with ``omni``'s ids at the same batch."""
    reference: dict[int, torch.Tensor] = {}
    variants = decode_variants(device)

    def row(provider: str, batch: int, fn, warmup, pool, error: BaseException | None) -> Case:
        s = setup()

        def record(runs: list[LoopResult]) -> Record:
            result = pool(runs)
            if provider == "omni":
                reference[batch] = result.tokens
            return decode_record(bench=bench, provider=provider, shape=label(batch), dtype=dtype, device=device,
                                 batch=batch, plan=plan, roof=s.roof, result=result,
                                 reference=reference.get(batch) if provider != "omni" else None)

        return Case(bench, provider, label(batch), dtype, fn, baseline=HF_GENERATE,
                    extra=step_fields(s.roof, batch, plan), loop=Loop(warmup, plan.reps, record), error=error,
                    catch=True)

    def runner_cases(graphs: bool, backend: str | None) -> list[Case]:
        s = setup()
        runner, error = None, None
        try:
            runner = make_runner(s.spec.decoder, graphs=graphs, plan=plan, max_model_len=s.max_model_len,
                                 dtype=dtype, device=device)
        except Exception as exc:  # a provider's failure is a record, not a crash
            error = exc
        cases = []
        for name, _, sync, _ in (v for v in variants if (v[1], v[3]) == (graphs, backend)):
            for batch in plan.batches:
                loop = partial(decode_loop, runner, s.spec, batch, sync_each_step=sync)
                cases.append(row(name, batch, with_backend(backend, partial(loop, plan.steps)),
                                 with_backend(backend, partial(loop, WARMUP_STEPS)), pool_runs, error))
        return cases

    def hf_cases() -> list[Case]:
        s = setup()
        hf, error = None, None
        try:
            hf = s.hf_factory()
        except Exception as exc:  # transformers missing or its API moved: say so in the records
            error = exc
        cases = []
        for batch in plan.batches:
            kwargs = s.hf_kwargs(batch)
            cases.append(row(HF_GENERATE, batch, partial(hf_generate_loop, hf, kwargs, plan.steps, device),
                             partial(hf_generate_loop, hf, kwargs, WARMUP_STEPS, device), pool_hf, error))
        return cases

    groups = []
    for graphs, backend in dict.fromkeys((v[1], v[3]) for v in variants):
        names = [v[0] for v in variants if (v[1], v[3]) == (graphs, backend)]
        rows = [CaseKey(bench, name, label(b), dtype_name(dtype)) for name in names for b in plan.batches]
        groups.append(CaseGroup(rows, partial(runner_cases, graphs, backend), release=True))
    hf_rows = [CaseKey(bench, HF_GENERATE, label(b), dtype_name(dtype)) for b in plan.batches]
    return groups + [CaseGroup(hf_rows, hf_cases, release=True)]


# --------------------------------------------------------------------------------------- the Thinker


def _hf_thinker(cfg: OmniConfig, ours: ThinkerTextModel, lm_head: nn.Linear, dtype: torch.dtype,
                device: torch.device) -> nn.Module:
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    d = cfg.to_dict()["thinker_config"]
    d["audio_config"].update(HF_STUB_AUDIO)
    d["vision_config"].update(HF_STUB_VISION)
    with hf_build_context(dtype, device):
        hf = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**d))
    hf = hf.requires_grad_(False).eval()
    text = getattr(hf.model, "language_model", hf.model)  # transformers 5 nests the LM one level deeper
    untie(hf.lm_head, text.embed_tokens)
    copy_into_hf(ours, text, what="HF thinker text model")
    with torch.no_grad():
        hf.lm_head.weight.copy_(lm_head.weight)
    return hf


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """The float decode groups (:func:`decode_groups`), then the int4 ones (:func:`int4_groups`); the model is built
    with the first group and shared by all (on CUDA the int4 rows' float model is this one)."""
    dev = torch.device(device)
    plan = plan_for(dev, quick)
    preset = preset_for(dev, preset)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = OmniConfig.preset(preset)
    thinker = cfg.thinker_config
    text = thinker.text_config
    stops = set(thinker.stop_token_ids)
    special = {getattr(thinker, n) for n in thinker._SPECIAL} | stops
    special |= {i for i in (thinker.pad_token_id, thinker.bos_token_id, text.pad_token_id) if i is not None}
    gen = torch.Generator().manual_seed(SEED)
    prompts = [safe_ids(text.vocab_size, special, plan.prompt, gen) for _ in range(max(plan.batches))]

    @functools.cache
    def models() -> tuple[ThinkerTextModel, nn.Linear]:
        return (build_random(lambda: ThinkerTextModel(text), dtype=dtype, device=dev, seed=SEED),
                build_random(lambda: nn.Linear(text.hidden_size, text.vocab_size, bias=False), dtype=dtype,
                             device=dev, seed=SEED + 1))

    @functools.cache
    def setup() -> DecodeSetup:
        model, lm_head = models()
        elem = torch.empty((), dtype=dtype).element_size()
        layers_bytes = param_bytes(model, lm_head, skip=(model.embed_tokens,))
        roof = device_roofline(dev, lambda b: layers_bytes + b * text.hidden_size * elem,
                               2 * text.num_hidden_layers * text.kv_size * elem)

        def hf_kwargs(batch: int) -> Callable[[], dict]:
            ids = torch.tensor(prompts[:batch], device=dev)
            eos = sorted(stops) or None
            return lambda: dict(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=eos,
                                pad_token_id=eos[0] if eos else None)

        return DecodeSetup(spec=_spec(model, lm_head, prompts, text.vocab_size, stops, dev),
                           max_model_len=text.max_position_embeddings, roof=roof,
                           hf_factory=lambda: _hf_thinker(cfg, model, lm_head, dtype, dev), hf_kwargs=hf_kwargs)

    name = short_name(preset)
    groups = decode_groups(bench="thinker_decode",
                           label=lambda b: f"thinker-{name} B={b} prompt={plan.prompt} steps={plan.steps}",
                           plan=plan, dtype=dtype, device=dev, setup=setup)
    # CPU: tiny's widths do not pack as int4, so the int4 section builds its own float model.
    return groups + int4_groups(dev, plan, name, text, dtype, prompts, stops,
                                float_model=models if dev.type == "cuda" else None)


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


# --------------------------------------------------------------------------------------- int4


def module_bytes(*modules: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Bytes of the parameters and buffers (the int4 linears keep their weights in buffers)."""
    skipped = {id(t) for m in skip for t in (*m.parameters(), *m.buffers())}
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in skipped and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def build_int4_decoder(text, quant: QuantConfig, *, dtype: torch.dtype, device: torch.device,
                       seed: int) -> ThinkerTextModel:
    """The Thinker LM with random int4 decoder linears (unit gain, as :func:`init_random_`), built on meta and
    materialised on ``device`` (no float copy of the linears ever exists)."""
    with torch.device("meta"):
        module = ThinkerTextModel(text)
    quantize_decoder_(module, quant)
    module = module.to(dtype=dtype).to_empty(device=device)
    init_random_(module, seed)
    init_random_int4_(module, std=None, generator=torch.Generator(device=device).manual_seed(seed + 2))
    return module.requires_grad_(False).eval()


def _spec(decoder: nn.Module, lm_head: nn.Linear, prompts: list[list[int]], vocab: int, stops: set[int],
          device: torch.device) -> DecodeSpec:
    return DecodeSpec(
        decoder=decoder,
        prompt_ids=lambda b: prompts[:b],
        prefill_inputs=lambda b: decoder.embed_tokens(torch.tensor(prompts[:b], device=device).flatten()),
        step_inputs=lambda ids, step: decoder.embed_tokens(ids),
        logits=lambda h: lm_head(h).float(),
        allowed=allowed_mask(vocab, stops, device),
    )


@torch.inference_mode()
def prefill_once(runner: DecoderRunner, decoder: nn.Module, ids: list[int]) -> torch.Tensor:
    """One prefill of ``ids`` at batch 1 over the runner's cache, blocks freed afterwards."""
    seq = runner.allocate(len(ids))
    try:
        positions = torch.arange(len(ids), device=runner.device).expand(3, -1)
        return runner.prefill([seq], decoder.embed_tokens(torch.tensor(ids, device=runner.device)), positions)
    finally:
        runner.free(seq)


INT4_BASELINE = "omni-float"


def int4_groups(dev: torch.device, plan: Plan, name: str, text, dtype: torch.dtype, prompts: list[list[int]],
                stops: set[int], *, float_model: Callable[[], tuple[nn.Module, nn.Linear]] | None = None
                ) -> list[CaseGroup]:
    """Batch-1 decode and a 2048-token prefill of the int4 LM against the float LM at the same shapes (see the
    module docstring): per provider a decode group and a prefill group, each with its own runner. ``float_model``:
    returns the (decoder, lm_head) already built at these shapes; None: built here."""
    cuda = dev.type == "cuda"
    group = 128 if cuda else 32
    if not cuda:
        text = dataclasses.replace(text, intermediate_size=64)
    quant = QuantConfig("awq", group, sym=False)
    quant.check_model(text)
    plan = dataclasses.replace(plan, batches=(1,))
    prefill_tokens = 2048 if cuda else 64
    providers = [(INT4_BASELINE, None), ("omni-int4", None)]
    if cuda:
        providers += [("omni-int4-cuda", "cuda"), ("omni-int4-triton", "triton")]
    label = f"thinker-{name} B=1 prompt={plan.prompt} steps={plan.steps} int4 g={group}"
    prefill_label = f"thinker-{name} prefill T={prefill_tokens} int4 g={group}"
    gen = torch.Generator().manual_seed(SEED + 5)
    prefill_ids = safe_ids(text.vocab_size, stops, prefill_tokens, gen)

    @functools.cache
    def models() -> tuple[nn.Module, nn.Module, nn.Linear]:
        """(the float decoder, the int4 decoder, lm_head)."""
        if float_model is None:
            float_decoder = build_random(lambda: ThinkerTextModel(text), dtype=dtype, device=dev, seed=SEED)
            lm_head = build_random(lambda: nn.Linear(text.hidden_size, text.vocab_size, bias=False), dtype=dtype,
                                   device=dev, seed=SEED + 1)
        else:
            float_decoder, lm_head = float_model()
        return float_decoder, build_int4_decoder(text, quant, dtype=dtype, device=dev, seed=SEED), lm_head

    def weight_bytes(provider: str) -> tuple[nn.Module, nn.Linear, int]:
        float_decoder, int4_decoder, lm_head = models()
        decoder = float_decoder if provider == INT4_BASELINE else int4_decoder
        return decoder, lm_head, module_bytes(decoder, skip=(decoder.embed_tokens,)) + module_bytes(lm_head)

    def decode(provider: str, backend: str | None) -> list[Case]:
        decoder, lm_head, weights = weight_bytes(provider)
        elem = torch.empty((), dtype=dtype).element_size()
        roof = device_roofline(dev, lambda b: weights + b * text.hidden_size * elem,
                               2 * text.num_hidden_layers * text.kv_size * elem)
        spec = _spec(decoder, lm_head, prompts, text.vocab_size, stops, dev)
        runner, error = None, None
        try:
            runner = make_runner(decoder, graphs=True, plan=plan, max_model_len=text.max_position_embeddings,
                                 dtype=dtype, device=dev)
        except Exception as exc:  # a provider's failure is a record, not a crash
            error = exc
        loop = partial(decode_loop, runner, spec, 1)

        def record(runs: list[LoopResult]) -> Record:
            return decode_record(bench="thinker_decode_int4", provider=provider, shape=label, dtype=dtype,
                                 device=dev, batch=1, plan=plan, roof=roof, result=pool_runs(runs))

        return [Case("thinker_decode_int4", provider, label, dtype, with_backend(backend, partial(loop, plan.steps)),
                     baseline=INT4_BASELINE, extra=step_fields(roof, 1, plan),
                     loop=Loop(with_backend(backend, partial(loop, WARMUP_STEPS)), plan.reps, record), error=error,
                     catch=True)]

    def prefill(provider: str, backend: str | None) -> list[Case]:
        decoder, _, weights = weight_bytes(provider)
        runner, error = None, None
        try:
            prefill_plan = Plan(prompt=prefill_tokens, steps=0, batches=(1,), reps=1)
            runner = make_runner(decoder, graphs=False, plan=prefill_plan, max_model_len=text.max_position_embeddings,
                                 dtype=dtype, device=dev)
        except Exception as exc:
            error = exc

        def finish(rec: Record) -> None:
            rec.extra.update(weight_gb=weights / 1e9, tokens_per_s=prefill_tokens / (rec.ms_p50 * 1e-3))

        return [Case("thinker_prefill_int4", provider, prefill_label, dtype,
                     with_backend(backend, partial(prefill_once, runner, decoder, prefill_ids)),
                     baseline=INT4_BASELINE, finish=finish, warmup=2, rep=10 if cuda else 3, flush_l2=False,
                     max_seconds=20.0, error=error, catch=True)]

    groups = []
    for provider, backend in providers:
        groups.append(CaseGroup(keys("thinker_decode_int4", [provider], label, dtype),
                                partial(decode, provider, backend), release=True))
        groups.append(CaseGroup(keys("thinker_prefill_int4", [provider], prefill_label, dtype),
                                partial(prefill, provider, backend), release=True))
    return groups


def run_int4(dev: torch.device, plan: Plan, name: str, text, dtype: torch.dtype, prompts: list[list[int]],
             stops: set[int], *, float_model: tuple[nn.Module, nn.Linear] | None = None) -> list[Record]:
    """The records of :func:`int4_groups` (``float_model``: the (decoder, lm_head) already built, or None)."""
    return run_groups(int4_groups(dev, plan, name, text, dtype, prompts, stops,
                                  float_model=None if float_model is None else lambda: float_model), dev)


if __name__ == "__main__":
    bench_main(run, __doc__)
