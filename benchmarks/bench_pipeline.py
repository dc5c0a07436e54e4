"""End to end: time to first audio, real-time factor, the stage timeline and peak memory, against HF ``generate``.

What is measured (issue #7 item 4), with random weights at the preset's shapes (7B: bf16, Token2Wav fp32 as HF
runs it) and the same weights in HF's model, in the same process:

* ``7b audio-5s reply<=10s``: a spoken question (5 s of a synthetic speech-like signal, log-mel features as the
  processor makes them, 125 audio tokens between a 24-token text prefix and a 6-token suffix) answered with
  speech. Random weights never emit the end of turn, so the reply is capped: ``thinker_max_new_tokens`` text ids
  (40, about 10 s of speech) and ``talker_max_new_tokens`` = 500 codes (10 s at 50 codes/s), greedy talker
  (``talker_do_sample=False``) on both sides; the talker may stop earlier on a stop code, and ``audio_s`` reports
  the audio each side really produced.

  - ``omni-stream`` (and ``omni-stream-fc<N>`` with ``first_chunk_codes=N``): ``OmniModel.stream``. ``ms_p50``
    is the time to first audio (``metric`` says so): wall clock from the call to the first event carrying
    samples. Extra fields: ``ttfa_ms`` (= p50), ``ttfa_stage_ms`` (the stream's own ``stage_times["first_audio"]``,
    whose clock starts after the host-side prompt checks; ``prep_ms`` is the difference), ``total_ms`` (until the
    stream is exhausted), ``audio_s``, ``rtf`` (= total / audio seconds), ``text_tokens``, ``codes``,
    ``stage_times`` (the stream's marks, ms), ``chunks`` (per Token2Wav chunk: codes, start / end on the request
    clock, DiT and vocoder ms), ``peak_gib``.
  - ``hf-generate``: ``Qwen2_5OmniForConditionalGeneration.generate(**inputs, speaker="Chelsie", ...)``. HF returns
    all audio at the end, so its time to first audio is its whole answer (``ttfa_ms = total_ms``);
    ``stage_times`` holds when its thinker, talker and token2wav calls returned. Its talker gets one logits
    processor that only allows the codes the DiT's table has (plus the stop codes), which our engine applies
    too (HF would index past the table otherwise).

* ``7b video60s+audio prefill``: peak GPU memory of answering a 60 s video-with-audio question (2 fps, 224 x 224
  frames: grid (60, 16, 16), 3840 video tokens interleaved with 1500 audio tokens per 2 s chunk as HF's processor
  lays them out, ``use_audio_in_video=True``), text only, one new token: ours ``generate(return_audio=False,
  thinker_max_new_tokens=1)``, HF ``generate(return_audio=False, thinker_max_new_tokens=1)``. ``ms_p50`` is the
  wall time of that call (``metric``); ``peak_gib`` is ``torch.cuda.max_memory_allocated`` after a reset with
  only that side's model on the GPU (weights included); ``activation_gib`` is the peak less what was allocated
  before the call; ``mem_ratio`` (ours / HF's) is on our record.

Memory: our engine's KV pool is sized for the largest request of the run (``Engine(max_tokens=...)``, as a server
sizes its pool for its load) rather than the default 35% of free memory; ``kv_pool_gib`` reports it. Our model is
measured first, then HF's model is built (HF's own constructor on the GPU, parameters left uninitialised, then
our weights copied in by :func:`omni_model.weights.checkpoint_plan`), ours is deleted and HF measured alone.
A provider or case that fails is a record with ``error``; the others go on.

Timing caveat: the stream's ``stage_times`` are host clocks read when the engine reaches each stage; stages
that end without a device sync (``encoders``) can read early on CUDA. ``ttfa_ms`` and ``total_ms`` are taken when
samples are on the host, so they are exact.

On CPU (``quick``): the tiny preset in fp32 (a 5 s question, 8 text ids, 100 codes; a 4 s video at 2 fps with
56 x 56 frames), HF tiny included when transformers imports; peak memory is CUDA only (null on CPU).
``plot_timeline`` draws our stage timeline and chunks against HF's bar (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from omni_benchmarks.bench_thinker import error_text, hf_build_context, quiet_hf, safe_ids, short_name
from omni_kernels.testing import Record, make_record, quantiles, set_speedups, write_records
from omni_model.config import SAMPLE_RATE, OmniConfig
from omni_model.demo import synthetic_question
from omni_model.engine.config import EngineConfig
from omni_model.model import OmniModel
from omni_model.processor import HOP, MAX_SAMPLES, audio_token_count, log_mel_features
from omni_model.processor import SAMPLE_RATE as MEL_RATE
from omni_model.weights import checkpoint_plan

BENCH = "pipeline"
SEED = 0
SPEAKER = "Chelsie"
GIB = 2**30
PREFIX_TOKENS, SUFFIX_TOKENS = 24, 6  # system / user template and assistant header stand-ins
STREAM = "omni-stream"
HF = "hf-generate"
PARTS = (("thinker", "thinker."), ("talker", "talker."), ("token2wav", "token2wav."))
TTFA_METRIC = "ms_p* = time to first audio (ms, request -> first samples)"
MEMORY_METRIC = "ms_p* = wall time of the 1-token text answer (ms); compare peak_gib"


@dataclass(frozen=True)
class Plan:
    """Shapes and repetitions of one run."""

    preset: str
    question_s: float  # spoken question length (s)
    thinker_tokens: int  # thinker_max_new_tokens of the spoken reply
    talker_codes: int  # talker_max_new_tokens (50 codes per second of audio)
    reps: int  # timed streams per variant (after one warm-up)
    hf_reps: int  # timed HF generates (after a short warm-up)
    first_chunks: tuple[int | None, ...]  # first_chunk_codes variants of the stream
    video_s: float
    video_fps: float
    frame_hw: tuple[int, int]  # video frame size in pixels (multiples of patch * merge)


FULL = Plan("qwen2.5-omni-7b", 5.0, 40, 500, reps=3, hf_reps=1, first_chunks=(None, 12), video_s=60.0,
            video_fps=2.0, frame_hw=(224, 224))
QUICK_CUDA = Plan("qwen2.5-omni-7b", 5.0, 40, 500, reps=1, hf_reps=1, first_chunks=(None, 12), video_s=60.0,
                  video_fps=2.0, frame_hw=(224, 224))
CPU = Plan("tiny", 5.0, 8, 100, reps=1, hf_reps=1, first_chunks=(None, 12), video_s=4.0, video_fps=2.0,
           frame_hw=(56, 56))


def plan_for(device: torch.device, quick: bool, preset: str) -> Plan:
    if device.type != "cuda":
        return CPU
    return dataclasses.replace(QUICK_CUDA if quick else FULL, preset=preset)


def speech_label(plan: Plan) -> str:
    seconds = plan.talker_codes / 50
    return f"{short_name(plan.preset)} audio-{plan.question_s:g}s reply<={seconds:g}s"


def video_label(plan: Plan) -> str:
    return f"{short_name(plan.preset)} video{plan.video_s:g}s+audio prefill"


# --------------------------------------------------------------------------------------------------- inputs


def _text_ids(cfg: OmniConfig, n: int, gen: torch.Generator) -> list[int]:
    th = cfg.thinker_config
    special = {getattr(th, name) for name in th._SPECIAL} | set(th.stop_token_ids)
    special |= {i for i in (th.pad_token_id, th.bos_token_id, th.text_config.pad_token_id) if i is not None}
    return safe_ids(th.text_config.vocab_size, special, n, gen)


def _log_mel(cfg: OmniConfig, seconds: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of ``seconds`` of synthetic speech, (1, mel, frames) and mask (1, frames): the processor's
    30 s windows, concatenated for longer audio (HF's audio tower takes any length, in chunks of its own)."""
    wave = synthetic_question(seconds, seed=seed)
    feats, masks = [], []
    for start in range(0, wave.size, MAX_SAMPLES):
        f, m = log_mel_features([wave[start:start + MAX_SAMPLES]], n_mels=cfg.thinker_config.audio_config.num_mel_bins)
        feats.append(f)
        masks.append(m)
    feats, mask = torch.cat(feats, dim=-1), torch.cat(masks, dim=-1)
    frames = -(-int(seconds * MEL_RATE) // HOP)
    if wave.size > MAX_SAMPLES:  # drop the padding of the last window: one clip of exactly its frames
        feats, mask = feats[..., :frames], mask[..., :frames]
    return feats, mask


def spoken_question_inputs(cfg: OmniConfig, seconds: float, *, seed: int = SEED) -> dict:
    """Processor-style inputs of a spoken question: text prefix, ``<audio_bos> <AUDIO> x n <audio_eos>``, suffix."""
    th = cfg.thinker_config
    gen = torch.Generator().manual_seed(seed)
    feats, mask = _log_mel(cfg, seconds, seed)
    n_audio = audio_token_count(int(mask.sum()))
    ids = (_text_ids(cfg, PREFIX_TOKENS, gen) + [th.audio_start_token_id] + [th.audio_token_id] * n_audio
           + [th.audio_end_token_id] + _text_ids(cfg, SUFFIX_TOKENS, gen))
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                input_features=feats, feature_attention_mask=mask)


def chunk_lengths(values: list[float], per_chunk: int) -> list[int]:
    """Token counts of consecutive chunks of temporal ids, HF 4.57.6's ``Qwen2_5OmniProcessor.get_chunked_index``
    rule: a chunk closes at the first id >= k * per_chunk (k = 1, 2, ...), one boundary per token at most."""
    out, start, k = [], 0, 1
    for i, v in enumerate(values):
        if v >= k * per_chunk:
            out.append(i - start)
            start, k = i, k + 1
    out.append(len(values) - start)
    return out


def video_audio_inputs(cfg: OmniConfig, seconds: float, fps: float, frame_hw: tuple[int, int], *,
                       seed: int = SEED) -> dict:
    """A video with its audio track (``use_audio_in_video=True``), laid out as HF's processor does: ``<vision_bos>
    <audio_bos>``, then per 2 s chunk the chunk's video tokens followed by its audio tokens, ``<audio_eos>
    <vision_eos>``. Frames: random normalised patches of ``frame_hw`` pixels; ``temporal_patch_size`` frames per
    grid step, so a grid step lasts ``temporal_patch_size / fps`` seconds."""
    th = cfg.thinker_config
    vision = th.vision_config
    merge, patch, tps = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    if frame_hw[0] % (patch * merge) or frame_hw[1] % (patch * merge):
        raise ValueError(f"frame_hw {frame_hw} must be multiples of {patch * merge}")
    grid = (max(1, round(seconds * fps / tps)), frame_hw[0] // patch, frame_hw[1] // patch)
    per_grid = tps / fps
    gen = torch.Generator().manual_seed(seed)
    patch_dim = vision.in_channels * tps * patch * patch
    pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=gen)
    feats, mask = _log_mel(cfg, seconds, seed + 1)
    n_audio = audio_token_count(int(mask.sum()))

    per_chunk = int(th.position_id_per_seconds * th.seconds_per_chunk)
    frame_tokens = grid[1] * grid[2] // merge**2
    video_t = [t * per_grid * th.position_id_per_seconds for t in range(grid[0]) for _ in range(frame_tokens)]
    v_chunks = chunk_lengths(video_t, per_chunk)
    a_chunks = chunk_lengths(list(range(n_audio)), per_chunk)
    body = [th.vision_start_token_id, th.audio_start_token_id]
    for j in range(max(len(v_chunks), len(a_chunks))):
        if j < len(v_chunks):
            body += [th.video_token_id] * v_chunks[j]
        if j < len(a_chunks):
            body += [th.audio_token_id] * a_chunks[j]
    body += [th.audio_end_token_id, th.vision_end_token_id]
    ids = _text_ids(cfg, PREFIX_TOKENS, gen) + body + _text_ids(cfg, SUFFIX_TOKENS, gen)
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                input_features=feats, feature_attention_mask=mask, pixel_values_videos=pixels,
                video_grid_thw=torch.tensor([grid]), video_second_per_grid=torch.tensor([per_grid]))


def to_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The inputs on ``device``, media features in ``dtype`` (HF's model card: ``inputs.to(device).to(dtype)``)."""
    media = ("input_features", "pixel_values", "pixel_values_videos")
    return {k: v.to(device=device, dtype=dtype if k in media else v.dtype) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Memory:
    """Allocated bytes before a call and the peak during it (CUDA; None elsewhere)."""

    device: torch.device
    before: int | None = None
    peak: int | None = None

    def __enter__(self) -> Memory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)

    def fields(self) -> dict:
        if self.peak is None:
            return dict(peak_gib=None, activation_gib=None)
        return dict(peak_gib=self.peak / GIB, activation_gib=(self.peak - self.before) / GIB)


@dataclass
class Run:
    """One answer: times in ms from the request, audio produced, the stage marks and per-chunk timings."""

    ttfa_ms: float
    total_ms: float
    audio_s: float
    text_tokens: int
    codes: int | None
    stage_times: dict[str, float]
    chunks: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    text_ids: list[int] = field(default_factory=list)  # the reply's text ids (compared across providers)


def leading_matches(a: list[int], b: list[int]) -> int:
    """How many leading ids two replies share (all of them on CPU in fp32 shows both sides ran the same weights and
    inputs; random bf16 weights drift apart after a few ids)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pick_median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.ttfa_ms)[len(runs) // 2]


# --------------------------------------------------------------------------------------------------- ours


@contextlib.contextmanager
def record_chunks(utterances: list) -> Iterator[None]:
    """Collects every Token2Wav utterance that hands out audio while the body runs (their ``chunks`` carry host
    clocks of when each chunk was queued and when its audio was handed out), by wrapping ``Utterance.collect``."""
    from omni_model.streaming import Utterance

    base = Utterance.collect

    def collect(self, *args, **kwargs):
        if not any(u is self for u in utterances):
            utterances.append(self)
        return base(self, *args, **kwargs)

    Utterance.collect = collect
    try:
        yield
    finally:
        Utterance.collect = base


def stream_once(model, inputs: dict, options: dict, device: torch.device) -> Run:
    """One ``model.stream`` of the request; clocks start at the call."""
    utterances: list = []
    samples = 0
    text: list[int] = []
    ttfa = None
    times: dict[str, float] = {}
    with Memory(device) as mem, record_chunks(utterances):
        t0 = time.perf_counter()
        for event in model.stream(**inputs, **options):
            if event.audio.size:
                if ttfa is None:
                    ttfa = (time.perf_counter() - t0) * 1e3
                samples += event.audio.size
            text += event.text_ids
            times = event.stage_times
        total = (time.perf_counter() - t0) * 1e3
    if ttfa is None:
        raise RuntimeError(f"the stream produced no audio ({len(text)} text ids)")
    log = [c for u in utterances for c in u.chunks]
    chunks = [dict(codes=[c.start, c.end], start_ms=(c.launched_s - t0) * 1e3, end_ms=(c.ready_s - t0) * 1e3,
                   dit_ms=c.dit_ms, vocoder_ms=c.vocoder_ms) for c in log]
    codes = log[-1].end if log else None  # None: the chunk hook saw nothing (see record_chunks)
    stage = dict(times)
    stage.setdefault("done", total - (ttfa - stage.get("first_audio", ttfa)))
    return Run(ttfa_ms=ttfa, total_ms=total, audio_s=samples / SAMPLE_RATE, text_tokens=len(text), codes=codes,
               stage_times=stage, chunks=chunks, memory=mem.fields(),
               extra=dict(prep_ms=ttfa - stage.get("first_audio", ttfa)), text_ids=text)


def speech_options(plan: Plan, first_chunk: int | None) -> dict:
    return dict(speaker=SPEAKER, thinker_max_new_tokens=plan.thinker_tokens, talker_max_new_tokens=plan.talker_codes,
                talker_do_sample=False, seed=SEED, first_chunk_codes=first_chunk)


def time_stream(model, inputs: dict, plan: Plan, first_chunk: int | None, device: torch.device) -> list[Run]:
    options = speech_options(plan, first_chunk)
    stream_once(model, inputs, options, device)  # warm-up: CUDA graphs, cuBLAS / Triton autotuning, DiT shapes
    return [stream_once(model, inputs, options, device) for _ in range(plan.reps)]


def _reply_ids(out, prompt_len: int) -> list[int]:
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[0, prompt_len:].tolist()


def memory_case_ours(model, inputs: dict, warmup: dict, device: torch.device) -> tuple[float, Memory, list[int]]:
    # The warm-up is another video (other pixels and text): a text-only answer may reuse cached prefix blocks,
    # and the timed call must prefill its whole prompt.
    model.generate(**warmup, use_audio_in_video=True, return_audio=False, thinker_max_new_tokens=1)
    with Memory(device) as mem:
        t0 = time.perf_counter()
        out = model.generate(**inputs, use_audio_in_video=True, return_audio=False, thinker_max_new_tokens=1)
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
    return ms, mem, _reply_ids(out, inputs["input_ids"].shape[1])


def kv_cache_bytes(model) -> int:
    """The bytes of the engine's KV caches (both decoders)."""
    engine = model.engine
    return sum(runner.cache.nbytes for runner in (engine.thinker, engine.talker) if runner is not None)


# --------------------------------------------------------------------------------------------------- HF


def _no_init() -> contextlib.AbstractContextManager:
    """HF's "skip weight init" context (every parameter is overwritten by the copy, which checks it)."""
    for module in ("transformers.modeling_utils", "transformers.initialization"):
        try:
            return __import__(module, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _untie(hf: nn.Module) -> None:
    """Gives every parameter name its own tensor (HF ties some where its config says so; ours are separate)."""
    seen: dict[int, str] = {}
    for name, p in list(hf.named_parameters(remove_duplicate=False)):
        if id(p) in seen:
            owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
            module = hf.get_submodule(owner) if owner else hf
            setattr(module, attr, nn.Parameter(torch.empty_like(p), requires_grad=False))
        else:
            seen[id(p)] = name


@torch.no_grad()
def copy_model_into_hf(model, hf: nn.Module) -> int:
    """Copies every part of our model into HF's ``Qwen2_5OmniForConditionalGeneration`` by checkpoint name (fused
    q/k/v and gate/up split back, reshaped tensors reshaped); every HF parameter must be filled. Returns the
    number of tensors copied."""
    _untie(hf)
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    missing, copied = [], 0
    for part, prefix in PARTS:
        ours = getattr(model, part, None)
        if ours is None:
            continue
        params = dict(ours.named_parameters())
        for key, target in checkpoint_plan(ours, prefix).items():
            dest = hf_params.pop(key, None)
            if dest is None:
                missing.append(key)
                continue
            src = params[target.param]
            if target.start is not None:
                src = src[target.start:target.stop]
            if dest.numel() != src.numel():
                raise ValueError(f"{key}: HF has {tuple(dest.shape)}, ours {tuple(src.shape)}")
            dest.copy_(src.reshape(dest.shape))
            copied += 1
    if missing or hf_params:
        raise ValueError(f"weight names differ from HF's: ours only {sorted(missing)[:5]} ({len(missing)}), "
                         f"HF only {sorted(hf_params)[:5]} ({len(hf_params)})")
    return copied


def build_hf(cfg: OmniConfig, model, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """HF's whole model built on ``device`` (Token2Wav fp32, as HF's constructor casts it) with our weights and
    speakers."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omni_model.hf_compat import hf_config

    with hf_build_context(dtype, device), _no_init():
        hf = Qwen2_5OmniForConditionalGeneration(hf_config(cfg))
    hf = hf.requires_grad_(False).eval()
    copy_model_into_hf(model, hf)
    hf.speaker_map = {name: {"cond": s["cond"].to(device), "ref_mel": s["ref_mel"].to(device),
                             "bos_token": int(s["bos_token"])} for name, s in model.speakers.items()}
    return hf


def _code_table_processor(cfg: OmniConfig):
    """HF talker logits processor allowing only the codes the DiT can embed, plus the stop codes (our engine's
    rule); None when the table covers the whole codec vocabulary."""
    from transformers import LogitsProcessor, LogitsProcessorList

    talker, table = cfg.talker_config, cfg.token2wav_config.dit.num_embeds
    if table >= talker.vocab_size:
        return None
    stops = sorted(set(talker.stop_token_ids))

    class CodeTable(LogitsProcessor):
        def __call__(self, input_ids, scores):
            keep = scores[:, stops].clone()
            scores[:, table:] = -float("inf")
            scores[:, stops] = keep
            return scores

    return LogitsProcessorList([CodeTable()])


@contextlib.contextmanager
def hf_stage_clock(hf: nn.Module, marks: dict[str, float], device: torch.device) -> Iterator[None]:
    """Stamps when HF's thinker.generate, talker.generate and token2wav return (instance attributes shadowing
    the methods for the call; synced, so the stamps are when the work is done)."""
    patched = []
    for part, method in (("thinker", "generate"), ("talker", "generate"), ("token2wav", "forward")):
        sub = getattr(hf, part, None)
        if sub is None:
            continue
        original = getattr(sub, method)

        def wrapped(*args, _original=original, _part=part, **kwargs):
            out = _original(*args, **kwargs)
            _sync(device)
            marks[_part] = time.perf_counter()
            return out

        shadowed = sub.__dict__.get(method)  # an instance attribute someone else set (a test's spy): restore it
        object.__setattr__(sub, method, wrapped)
        patched.append((sub, method, shadowed))
    try:
        yield
    finally:
        for sub, method, shadowed in patched:
            if shadowed is None:
                object.__delattr__(sub, method)
            else:
                object.__setattr__(sub, method, shadowed)


@torch.inference_mode()
def hf_generate_once(hf: nn.Module, cfg: OmniConfig, inputs: dict, plan: Plan, device: torch.device, *,
                     thinker_tokens: int | None = None, talker_codes: int | None = None) -> Run:
    marks: dict[str, float] = {}
    processor = _code_table_processor(cfg)
    extra = {} if processor is None else dict(talker_logits_processor=processor)
    with Memory(device) as mem, hf_stage_clock(hf, marks, device), quiet_hf():
        t0 = time.perf_counter()
        out = hf.generate(**inputs, speaker=SPEAKER, thinker_max_new_tokens=thinker_tokens or plan.thinker_tokens,
                          talker_max_new_tokens=talker_codes or plan.talker_codes, talker_do_sample=False, **extra)
        _sync(device)
        total = (time.perf_counter() - t0) * 1e3
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise RuntimeError(f"HF generate returned {type(out).__name__}, expected (sequences, audio)")
    sequences, wav = out
    samples = int(wav.numel())
    stage = {k: (v - t0) * 1e3 for k, v in marks.items()}
    stage.update(first_audio=total, done=total)
    codes = samples // (cfg.token2wav_config.dit.repeats * _hop(cfg)) if samples else 0
    text = sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return Run(ttfa_ms=total, total_ms=total, audio_s=samples / SAMPLE_RATE, text_tokens=len(text), codes=codes,
               stage_times=stage, memory=mem.fields(), text_ids=text)


def _hop(cfg: OmniConfig) -> int:
    bigvgan = cfg.token2wav_config.bigvgan
    return int(np.prod(bigvgan.upsample_rates))


@torch.inference_mode()
def memory_case_hf(hf: nn.Module, inputs: dict, warmup: dict, device: torch.device
                   ) -> tuple[float, Memory, list[int]]:
    def call(x: dict):
        with quiet_hf():
            return hf.generate(**x, use_audio_in_video=True, return_audio=False, thinker_max_new_tokens=1)

    call(warmup)  # as for ours (HF has no prefix cache)
    with Memory(device) as mem:
        t0 = time.perf_counter()
        out = call(inputs)
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
    return ms, mem, _reply_ids(out, inputs["input_ids"].shape[1])


# --------------------------------------------------------------------------------------------------- records


def run_record(provider: str, shape: str, dtype: torch.dtype, device: torch.device, runs: list[Run],
               **extra) -> Record:
    ttfa = [r.ttfa_ms for r in runs]
    mid = _pick_median(runs)
    rec = make_record(bench=BENCH, provider=provider, shape=shape, dtype=dtype, device=device,
                      timing=quantiles(ttfa), metric=TTFA_METRIC,
                      ttfa_ms=quantiles(ttfa)[1], total_ms=quantiles([r.total_ms for r in runs])[1],
                      audio_s=mid.audio_s, rtf=mid.total_ms / 1e3 / mid.audio_s if mid.audio_s else None,
                      text_tokens=mid.text_tokens, codes=mid.codes, stage_times=mid.stage_times, chunks=mid.chunks,
                      reps=len(runs), **mid.memory, **mid.extra, **extra)
    return rec


def error_record(provider: str, shape: str, dtype: torch.dtype, device: torch.device, exc: BaseException | str,
                 metric: str) -> Record:
    return make_record(bench=BENCH, provider=provider, shape=shape, dtype=dtype, device=device, timing=None,
                       metric=metric, error=exc if isinstance(exc, str) else error_text(exc))


def memory_record(provider: str, shape: str, dtype: torch.dtype, device: torch.device, ms: float, mem: Memory,
                  prompt_tokens: int, **extra) -> Record:
    return make_record(bench=BENCH, provider=provider, shape=shape, dtype=dtype, device=device, timing=(ms, ms, ms),
                       metric=MEMORY_METRIC, prompt_tokens=prompt_tokens, **mem.fields(), **extra)


# --------------------------------------------------------------------------------------------------- run


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b",
        plot_path: str | os.PathLike | None = None) -> list[Record]:
    """Records of the spoken-question case (each stream variant and HF) and the video memory case (ours, HF).
    ``plot_path`` (or the environment's ``OMNI_BENCH_PLOT``): where to save the timeline PNG; None: no plot.

    On CPU both sides run with one intra-op thread: the tiny model's ops are too small for a pool, and on a
    loaded 2-core machine the pool's wake-up latency dominated (HF's 1 s answer took 41 s with two threads)."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        records = _run(dev, quick, preset)
    finally:
        torch.set_num_threads(threads)
    plot_path = plot_path if plot_path is not None else os.environ.get("OMNI_BENCH_PLOT")
    if plot_path:
        plot_timeline(records, plot_path)
    return records


def _run(dev: torch.device, quick: bool, preset: str) -> list[Record]:
    plan = plan_for(dev, quick, preset)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = OmniConfig.preset(plan.preset)
    speech_shape, video_shape = speech_label(plan), video_label(plan)
    speech = to_device(spoken_question_inputs(cfg, plan.question_s), dev, dtype)
    video = to_device(video_audio_inputs(cfg, plan.video_s, plan.video_fps, plan.frame_hw), dev, dtype)
    video_warmup = to_device(video_audio_inputs(cfg, plan.video_s, plan.video_fps, plan.frame_hw, seed=SEED + 100),
                             dev, dtype)
    speech_len, video_len = speech["input_ids"].shape[1], video["input_ids"].shape[1]
    records: list[Record] = []
    reference_ids: list[int] | None = None  # our first stream variant's reply, to compare HF's with

    # Thinker: the longest prompt + reply; talker: the spoken prompt + 2 + codes (rounded up to whole blocks).
    max_tokens = max(video_len, speech_len + plan.thinker_tokens, speech_len + 2 + plan.talker_codes) + 64
    model = OmniModel.from_config(cfg, device=dev, dtype=dtype, seed=SEED,
                                  engine_config=EngineConfig(kv_cache_tokens=max_tokens))
    kv_pool_gib = kv_cache_bytes(model) / GIB

    for first_chunk in plan.first_chunks:
        provider = STREAM if first_chunk is None else f"{STREAM}-fc{first_chunk}"
        try:
            runs = time_stream(model, speech, plan, first_chunk, dev)
            if reference_ids is None:
                reference_ids = runs[0].text_ids
            records.append(run_record(provider, speech_shape, dtype, dev, runs, first_chunk_codes=first_chunk,
                                      prompt_tokens=speech_len, kv_pool_gib=kv_pool_gib))
        except Exception as exc:  # a failed variant is a record, not a crash
            records.append(error_record(provider, speech_shape, dtype, dev, exc, TTFA_METRIC))
        release()
    ours_mem, ours_next = None, None
    try:
        ms, ours_mem, ours_next = memory_case_ours(model, video, video_warmup, dev)
        records.append(memory_record(STREAM, video_shape, dtype, dev, ms, ours_mem, video_len,
                                     kv_pool_gib=kv_pool_gib, next_token=ours_next))
    except Exception as exc:
        records.append(error_record(STREAM, video_shape, dtype, dev, exc, MEMORY_METRIC))
    release()

    hf, hf_error = None, None
    try:
        hf = build_hf(cfg, model, dtype, dev)
    except Exception as exc:  # transformers missing, or its API / names moved: say so in the records
        hf_error = error_text(exc)
    del model
    release()

    if hf is None:
        records.append(error_record(HF, video_shape, dtype, dev, hf_error, MEMORY_METRIC))
        records.append(error_record(HF, speech_shape, dtype, dev, hf_error, TTFA_METRIC))
    else:
        try:
            ms, hf_mem, hf_next = memory_case_hf(hf, video, video_warmup, dev)
            records.append(memory_record(HF, video_shape, dtype, dev, ms, hf_mem, video_len, next_token=hf_next,
                                         match_text_tokens=None if ours_next is None
                                         else leading_matches(hf_next, ours_next)))
            ours_rec = next((r for r in records if r.provider == STREAM and r.shape == video_shape), None)
            if ours_rec is not None and ours_mem is not None and ours_mem.peak and hf_mem.peak:
                ours_rec.extra["mem_ratio"] = ours_mem.peak / hf_mem.peak
        except Exception as exc:
            records.append(error_record(HF, video_shape, dtype, dev, exc, MEMORY_METRIC))
        release()
        try:
            hf_generate_once(hf, cfg, speech, plan, dev, thinker_tokens=2, talker_codes=8)  # warm-up
            runs = [hf_generate_once(hf, cfg, speech, plan, dev) for _ in range(plan.hf_reps)]
            match = None if reference_ids is None else leading_matches(runs[0].text_ids, reference_ids)
            records.append(run_record(HF, speech_shape, dtype, dev, runs, prompt_tokens=speech_len,
                                      match_text_tokens=match))
        except Exception as exc:
            records.append(error_record(HF, speech_shape, dtype, dev, exc, TTFA_METRIC))
        del hf
        release()

    return set_speedups(records, HF)


# --------------------------------------------------------------------------------------------------- plot

STAGES = ("encoders", "thinker_prefill", "first_token", "talker_prefill", "first_audio", "done")
HF_STAGES = ("thinker", "talker", "token2wav")


def _as_dict(r) -> dict:
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


def plot_timeline(records: list, path: str | os.PathLike) -> Path | None:
    """Saves a PNG of our stream's stage timeline and Token2Wav chunks against HF's single bar (first audio =
    whole answer). Needs matplotlib (prints a note and returns None without it, or without a usable record)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("bench_pipeline: matplotlib is not installed; no timeline plot (pip install matplotlib)")
        return None
    rows = [_as_dict(r) for r in records]
    ours = [d for d in rows if d["provider"].startswith(STREAM) and d.get("stage_times") and not d.get("error")]
    if not ours:
        print("bench_pipeline: no stream record with stage times; no timeline plot")
        return None
    shape = ours[0]["shape"]
    ours = [d for d in ours if d["shape"] == shape]
    hf = next((d for d in rows if d["provider"] == HF and d["shape"] == shape and not d.get("error")), None)

    fig = Figure(figsize=(12, 2.2 + 0.9 * (len(ours) + (hf is not None))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, gridspec_kw=dict(height_ratios=[1, 1.4]))
    colors = dict(zip(STAGES + HF_STAGES + ("dit", "vocoder"),
                      ("#8ecae6", "#219ebc", "#023047", "#ffb703", "#fb8500", "#9aa5b1",
                       "#b5838d", "#6d6875", "#e5989b", "#2a9d8f", "#e76f51")))

    def stage_bars(ax, y, stage_times: dict, offset: float, names) -> None:
        prev = 0.0
        for name in names:
            if name not in stage_times:
                continue
            end = stage_times[name] + offset
            ax.barh(y, end - prev, left=prev, color=colors[name], edgecolor="white", height=0.6,
                    label=f"until {name}" if name not in labelled else None)
            labelled.add(name)
            prev = end

    labels = []
    for ax, zoom in zip(axes, (False, True)):
        labelled: set[str] = set()
        labels = []
        y = 0
        for d in ours:
            offset = d.get("prep_ms") or 0.0
            stage_bars(ax, y, d["stage_times"], offset, STAGES)
            ax.plot([d["ttfa_ms"]], [y], marker="v", color="black", ms=8)
            labels.append(f"{d['provider']}\nTTFA {d['ttfa_ms']:.0f} ms, RTF {d['rtf']:.2f}")
            y += 1
            if zoom:
                for c in d.get("chunks") or []:
                    mid = c["start_ms"] + c["dit_ms"]
                    ax.barh(y, c["dit_ms"], left=c["start_ms"], color=colors["dit"], height=0.6,
                            label="DiT chunk" if "dit" not in labelled else None)
                    ax.barh(y, c["end_ms"] - mid, left=mid, color=colors["vocoder"], height=0.6,
                            label="vocoder chunk" if "vocoder" not in labelled else None)
                    labelled.update(("dit", "vocoder"))
                labels.append(f"{d['provider']} token2wav chunks")
                y += 1
        if hf is not None and not zoom:
            stage_bars(ax, y, hf["stage_times"], 0.0, HF_STAGES)
            ax.plot([hf["ttfa_ms"]], [y], marker="v", color="black", ms=8)
            labels.append(f"{HF}\nfirst audio = whole answer {hf['ttfa_ms']:.0f} ms, RTF {hf['rtf']:.2f}")
            y += 1
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms since the request")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
        if zoom:
            ax.set_xlim(0, max(d["total_ms"] for d in ours) * 1.02)
            ax.set_title("ours: stages and Token2Wav chunks", fontsize=9)
        else:
            ax.set_title(f"{BENCH}: {shape} on {ours[0]['device']} ({ours[0]['dtype']}, random weights)", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------------------------------- CLI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="qwen2.5-omni-7b")
    parser.add_argument("--json", default=None, help="write the records here (the plot goes beside it)")
    parser.add_argument("--plot", default=None, help="timeline PNG (default with --json: <json stem>_timeline.png)")
    args = parser.parse_args()
    plot = args.plot
    if plot is None and args.json:
        plot = str(Path(args.json).with_name(Path(args.json).stem + "_timeline.png"))
    records = run(args.device, args.quick, args.preset, plot_path=plot)
    if args.json:
        write_records(records, args.json)
        print(f"bench_pipeline: wrote {len(records)} records to {args.json}" + (f", plot {plot}" if plot else ""))
    else:
        print(json.dumps([r.to_dict() for r in records], indent=1))


if __name__ == "__main__":
    main()

