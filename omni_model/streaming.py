"""Streaming code-to-wave: Token2Wav on chunks of talker codes as soon as they exist (issue #7, items 1-2).

HF 4.57.6 runs Token2Wav once over all codes of a reply. Qwen's own low-VRAM code (not in transformers) streams
it: DiT chunks of 48 codes with 24 codes of left and 12 of right context, positions and block indices restarting
per chunk, and vocoder chunks with 20 mel frames of context on each side (REFERENCE.md). This module does the same
with a configurable (smaller) first chunk:

* DiT: chunk ``[start, end)`` runs the whole flow-matching ODE on the codes ``[lo, hi)`` with
  ``lo = align_down(start - left_context_codes)`` (clipped at 0) and ``hi = end + right_context_codes``
  (clipped at the last code). The window starts on a DiT block boundary of the full utterance (block =
  ``block_size // repeats`` codes, 12 at 7B), so inside the window the block mask groups frames exactly as the
  full run does; the stacked receptive field of one DiT pass is 2 blocks back and 1 ahead, which the default
  contexts cover. The noise of a window is the same global noise tensor the non-streaming run uses, sliced at the
  window's absolute mel frames, so every frame starts the ODE from the noise the full run gives it. Only the
  mel of ``[start, end)`` is final; the right-context frames are provisional.
* Vocoder: the final mel of ``[start, end)`` with up to ``vocoder_context_frames`` frames on each side (left: the
  final mel of the previous chunks; right: the provisional mel of the right-context codes) is vocoded and the
  samples of the context frames are cut away (``hop`` samples per frame, 240 at 7B).

Samples come out in order, each exactly once: N codes give ``N * repeats * hop`` samples in total. Chunk
boundaries depend only on the number of codes, never on how they were pushed, so pushing codes one by one or all
at once gives the same audio.

The speaker part of the DiT input (ECAPA-TDNN over the reference mel, both guidance branches) is computed once
per utterance; per chunk only the code embeddings of the window are projected.

On CUDA (issue #7, item 1): a chunk's DiT solve (36 passes of small kernels, launch-bound eagerly) and its vocoder
replay CUDA graphs, one per window shape, kept on the model (:func:`graph_cache`; every chunk but the last has a
shape fixed by the settings, the last one runs eagerly), and chunks run on Token2Wav's own CUDA stream
(:func:`token2wav_stream`): ``push`` queues the chunk and returns at once, the samples come back through pinned
memory, and the audio of a chunk is handed out by the first ``push`` / ``finish`` after its last kernel, so the
decoders' steps go on while the DiT runs.

Quality is measured, not assumed: :func:`stream_snr_db` compares streamed audio with the non-streaming
``Token2Wav`` audio of the same codes and noise (``tests/model/test_streaming.py`` on the tiny model,
``benchmarks/bench_token2wav.py`` at 7B shapes).
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from omni_model.engine.graphs import GraphCache
from omni_model.layers.backend import get_backend
from omni_model.layers.flow_matching import GUIDANCE_EPS, guided, integrate, sway_time_points
from omni_model.models.dit import DiT, check_codes
from omni_model.models.token2wav import HF_NOISE_FRAMES, Token2Wav


def stream_snr_db(reference: np.ndarray, streamed: np.ndarray) -> float:
    """SNR in dB of ``streamed`` against ``reference`` (same length): 10 log10(sum ref^2 / sum (ref - streamed)^2).

    ``inf`` when they are equal. Both are flattened and compared in float64.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    out = np.asarray(streamed, dtype=np.float64).reshape(-1)
    if ref.shape != out.shape:
        raise ValueError(f"reference and streamed must have the same length, got {ref.size} and {out.size}")
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def stream_audio(token2wav: Token2Wav, codes: torch.Tensor | Iterable[int], cond: torch.Tensor,
                 ref_mel: torch.Tensor, noise: torch.Tensor | None = None, *, push_size: int | None = None,
                 **kwargs) -> tuple[np.ndarray, Token2WavStreamer]:
    """Streams all of ``codes`` ((1, N) or 1-D) through a new :class:`Token2WavStreamer` (``kwargs`` go to it),
    ``push_size`` codes per push (None: one push), then ``finish()``. Returns (audio (N * repeats * hop,) float32,
    the streamer, for its ``chunks`` and ``stage_times``). For tests and benchmarks."""
    flat = [int(c) for c in (codes.reshape(-1).tolist() if isinstance(codes, torch.Tensor) else codes)]
    streamer = Token2WavStreamer(token2wav, cond, ref_mel, noise, **kwargs)
    step = len(flat) if push_size is None else _int_arg("push_size", push_size, 1)
    pieces = []
    for i in range(0, len(flat), max(step, 1)):
        pieces += streamer.push(flat[i:i + step])
    pieces += streamer.finish()
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)), streamer


@dataclass
class ChunkRecord:
    """One emitted chunk: codes ``[start, end)``, the DiT window ``[dit_lo, dit_hi)`` (codes), the vocoder window
    ``[voc_lo, voc_hi)`` (absolute mel frames), the samples emitted and the time of each stage (on CUDA the GPU time
    between events on Token2Wav's stream, elsewhere wall time)."""

    index: int
    start: int
    end: int
    dit_lo: int
    dit_hi: int
    voc_lo: int
    voc_hi: int
    samples: int
    dit_ms: float
    vocoder_ms: float
    final: bool
    launched_s: float = 0.0  # host clock (time.perf_counter) when the chunk was queued
    ready_s: float = 0.0  # and when its audio was handed out


@dataclass
class _Pending:
    record: ChunkRecord
    samples: torch.Tensor  # (n,) float32 on the host (pinned on CUDA, filled when marks[2] has passed)
    marks: list | None  # CUDA events: start, DiT done, samples copied (None on CPU: already done)


def graph_cache(token2wav: Token2Wav, *, enabled: bool = True) -> GraphCache:
    """The CUDA graphs of a Token2Wav's streaming chunks, kept on the model so later utterances replay them (a
    disabled cache, which runs everything eagerly, when ``enabled`` is False or the model is not on CUDA)."""
    if not enabled:
        return GraphCache(token2wav.device, enabled=False)
    cache = token2wav.__dict__.get("_stream_graphs")
    if cache is None or cache.device != token2wav.device:
        cache = GraphCache(token2wav.device)
        token2wav.__dict__["_stream_graphs"] = cache
    return cache


def token2wav_stream(token2wav: Token2Wav) -> torch.cuda.Stream:
    """Token2Wav's own CUDA stream (one per model, made on first use): chunks run beside the decoders' steps."""
    stream = token2wav.__dict__.get("_stream")
    if stream is None or stream.device != token2wav.device:
        stream = torch.cuda.Stream(token2wav.device)
        token2wav.__dict__["_stream"] = stream
    return stream


def _solve(dit: DiT, guidance_scale: float, guide: bool, static: torch.Tensor, x0: torch.Tensor,
           time_points: torch.Tensor) -> torch.Tensor:
    """The flow-matching ODE of one window: x0 (1, L, mel) noise -> mel (1, L, mel), ``static`` the window's DiT
    conditioning (S, L, hidden). Both guidance branches run in each DiT call."""

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        v = dit(x, t, static).float()
        return guided(v[:1], v[1:], guidance_scale) if guide else v

    return integrate(velocity, x0, time_points)


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class Token2WavStreamer:
    """Streams one utterance through a :class:`~omni_model.models.token2wav.Token2Wav`.

    Args:
        token2wav: the model (its precision and ``math_mode`` are used as they are).
        cond: (1, enc_emb_dim) speaker vector; ref_mel: (1, T_ref, mel) reference mel.
        noise: (1, >= repeats * N, mel) initial noise, the same global tensor the non-streaming run takes, indexed
            by absolute mel frame; None: drawn like ``Token2Wav`` does (a CPU ``randn`` of 30000 frames from
            ``generator``), which bounds the utterance to 30000 / repeats codes.
        num_steps, guidance_scale, sway_coefficient: the sampler settings of ``Token2Wav.mel``.
        first_chunk_codes: codes of the first chunk (None: ``chunk_codes``); any value >= 1. The first audio needs
            ``first_chunk_codes + right_context_codes`` codes. When it is not a multiple of the DiT block (in
            codes), the second chunk ends on the last block boundary before ``first_chunk_codes + chunk_codes``
            so that every later chunk is block aligned again (and the second window's start is rounded down to a
            block boundary: more left context, never less).
        chunk_codes: codes per later chunk, a positive multiple of the DiT block in codes (12 at 7B).
        left_context_codes, right_context_codes: DiT context, multiples of the DiT block in codes (>= 0).
        vocoder_context_frames: mel frames of vocoder context on each side (>= 0).
        cuda_graphs: on CUDA, replay each chunk's DiT solve and vocoder from CUDA graphs (see :func:`graph_cache`).

    ``push(codes)`` and ``finish()`` return the new audio as a list of 1-D float32 arrays (possibly empty).
    ``chunks`` holds a :class:`ChunkRecord` per emitted chunk and ``stage_times`` the totals.
    """

    def __init__(self, token2wav: Token2Wav, cond: torch.Tensor, ref_mel: torch.Tensor,
                 noise: torch.Tensor | None = None, *, num_steps: int = 10, guidance_scale: float = 0.5,
                 sway_coefficient: float | None = -1.0, first_chunk_codes: int | None = None, chunk_codes: int = 48,
                 left_context_codes: int = 24, right_context_codes: int = 12, vocoder_context_frames: int = 20,
                 generator: torch.Generator | None = None, cuda_graphs: bool = True):
        self.token2wav = token2wav
        dit = token2wav.dit
        self.repeats = dit.repeats
        self.hop = token2wav.vocoder.hop
        self.block_codes = dit.cfg.block_size // dit.repeats
        mel_dim, device = dit.cfg.mel_dim, token2wav.device
        self.device = device

        self.chunk_codes = _int_arg("chunk_codes", chunk_codes, 1)
        self.left_context_codes = _int_arg("left_context_codes", left_context_codes, 0)
        self.right_context_codes = _int_arg("right_context_codes", right_context_codes, 0)
        for name in ("chunk_codes", "left_context_codes", "right_context_codes"):
            # Block-aligned windows keep the block mask of a window equal to the full run's (blocks restart at 0
            # in every DiT call, so a window must start on a block boundary of the utterance).
            if getattr(self, name) % self.block_codes:
                raise ValueError(f"{name} must be a multiple of the DiT block in codes (block_size {dit.cfg.block_size}"
                                 f" / repeats {dit.repeats} = {self.block_codes}), got {getattr(self, name)}")
        self.first_chunk_codes = (self.chunk_codes if first_chunk_codes is None
                                  else _int_arg("first_chunk_codes", first_chunk_codes, 1))
        self.vocoder_context_frames = _int_arg("vocoder_context_frames", vocoder_context_frames, 0)
        self.num_steps = _int_arg("num_steps", num_steps, 2)
        self.guidance_scale = float(guidance_scale)
        self.guide = self.guidance_scale >= GUIDANCE_EPS  # HF: below 1e-5 only the conditional branch runs

        if not isinstance(cond, torch.Tensor) or cond.shape != (1, dit.cfg.enc_emb_dim):
            raise ValueError(f"cond must have shape (1, {dit.cfg.enc_emb_dim}), "
                             f"got {tuple(getattr(cond, 'shape', ()))}")
        if (not isinstance(ref_mel, torch.Tensor) or ref_mel.dim() != 3 or ref_mel.shape[0] != 1
                or ref_mel.shape[2] != mel_dim or ref_mel.shape[1] < 1):
            raise ValueError(f"ref_mel must have shape (1, T, {mel_dim}), got {tuple(getattr(ref_mel, 'shape', ()))}")
        if noise is None:
            # Token2Wav's draw (HF's): CPU randn of 30000 frames, so the same generator state gives the same noise.
            noise = torch.randn([1, HF_NOISE_FRAMES, mel_dim], generator=generator)
        if not isinstance(noise, torch.Tensor) or noise.dim() != 3 or noise.shape[0] != 1 or noise.shape[2] != mel_dim:
            raise ValueError(f"noise must have shape (1, >= repeats * N, {mel_dim}), "
                             f"got {tuple(getattr(noise, 'shape', ()))}")
        self.noise = noise.to(device=device, dtype=torch.float32)
        self.max_codes = noise.shape[1] // self.repeats

        self.time_points = sway_time_points(self.num_steps, sway_coefficient, device)
        self._graphs = graph_cache(token2wav, enabled=cuda_graphs)
        self._init_speaker(cond.to(device), ref_mel.to(device))

        self._codes: list[int] = []
        self._next = 0  # first code not yet queued
        self._launched = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._stream = token2wav_stream(token2wav) if device.type == "cuda" else None
        self._mel_tail = torch.zeros(1, mel_dim, 0, device=device)  # final mel before _next (vocoder left context)
        self._finished = False
        self.samples_emitted = 0
        self.chunks: list[ChunkRecord] = []

    # -- conditioning -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_speaker(self, cond: torch.Tensor, ref_mel: torch.Tensor) -> None:
        """ECAPA over the reference mel once per utterance (DiT.conditioning's rows: conditional, then the
        unconditional branch with a zero speaker vector and a zero reference mel)."""
        dit = self.token2wav.dit
        cond, ref_mel = cond.to(dit.dtype), ref_mel.to(dit.dtype)
        if self.guide:
            cond = torch.cat([cond, torch.zeros_like(cond)])
            ref_mel = torch.cat([ref_mel, torch.zeros_like(ref_mel)])
        with self.token2wav.math_mode():
            self._voice = dit.input_embed.spk_encoder(ref_mel)  # (S, enc_dim)
        self._speaker = cond  # (S, enc_emb_dim)

    def conditioning(self, codes: torch.Tensor) -> torch.Tensor:
        """``DiT.conditioning(codes, cond, ref_mel, guidance=...)`` for a window of codes (1, n), with the ECAPA
        output computed once: (S, repeats * n, hidden) (tested equal to ``DiT.conditioning``)."""
        dit = self.token2wav.dit
        codes = codes.long()
        if self.guide:
            codes = torch.cat([codes, torch.zeros_like(codes)])  # unconditional branch: code 0
        code_embed = dit.text_embed(codes)
        length = code_embed.shape[1]
        feats = torch.cat((self._voice.unsqueeze(1).expand(-1, length, -1), code_embed,
                           self._speaker.unsqueeze(1).expand(-1, length, -1)), dim=-1)
        proj = dit.input_embed.proj
        return F.linear(feats, proj.weight[:, dit.cfg.mel_dim:], proj.bias)

    # -- chunk schedule -----------------------------------------------------------------------------------------

    def _chunk_end(self, start: int) -> int:
        if start == 0:
            return self.first_chunk_codes
        # Back onto the block grid after an unaligned first chunk (a no-op once start is aligned).
        return (start + self.chunk_codes) // self.block_codes * self.block_codes

    def _window(self, start: int, end: int, available: int) -> tuple[int, int]:
        lo = max(0, (start - self.left_context_codes) // self.block_codes * self.block_codes)
        return lo, min(end + self.right_context_codes, available)

    @property
    def codes_pushed(self) -> int:
        return len(self._codes)

    @property
    def stage_times(self) -> dict[str, float]:
        """Totals over the emitted chunks: DiT and vocoder milliseconds, the chunk count and the first chunk's
        DiT + vocoder milliseconds (0 before any chunk)."""
        first = self.chunks[0].dit_ms + self.chunks[0].vocoder_ms if self.chunks else 0.0
        return {"token2wav_dit_ms": sum(c.dit_ms for c in self.chunks),
                "token2wav_vocoder_ms": sum(c.vocoder_ms for c in self.chunks),
                "token2wav_chunks": float(len(self.chunks)),
                "token2wav_first_chunk_ms": first}

    # -- public -------------------------------------------------------------------------------------------------

    def push(self, codes: Iterable[int] | torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """Appends codes (a 1-D sequence of ints), starts every chunk that became ready and returns the audio of the
        chunks that have finished (on CUDA a chunk runs on Token2Wav's own stream while the caller goes on: its audio
        comes out of a later ``push`` or ``finish``, always in order)."""
        if self._finished:
            raise RuntimeError("push after finish(): make a new Token2WavStreamer for the next utterance")
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu()
        new = torch.as_tensor(list(codes) if not isinstance(codes, (torch.Tensor, np.ndarray)) else codes)
        if new.dim() > 1:
            raise ValueError(f"codes must be a 1-D sequence of ints, got shape {tuple(new.shape)}")
        if new.numel() == 0:
            return self._collect(wait=False)
        if new.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"codes must be ints, got {new.dtype}")
        check_codes(new, self.token2wav.dit.num_embeds)
        if len(self._codes) + new.numel() > self.max_codes:
            raise ValueError(f"noise has {self.noise.shape[1]} frames: enough for {self.max_codes} codes, got "
                             f"{len(self._codes) + new.numel()}; pass a longer noise tensor")
        self._codes.extend(new.tolist())
        while True:
            end = self._chunk_end(self._next)
            if end + self.right_context_codes > len(self._codes):
                return self._collect(wait=False)
            self._launch_chunk(self._next, end, final=False)

    def finish(self) -> list[np.ndarray]:
        """Flushes the codes not yet emitted as one last chunk (no right context) and waits for every chunk;
        returns their audio. Later calls return []."""
        if self._finished:
            return []
        self._finished = True
        if self._next < len(self._codes):
            self._launch_chunk(self._next, len(self._codes), final=True)
        return self._collect(wait=True)

    def close(self) -> None:
        """Waits for the chunks in flight and drops their audio (a stream closed early)."""
        self._finished = True
        self._collect(wait=True)

    # -- one chunk ----------------------------------------------------------------------------------------------

    def _to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)  # a pageable copy would wait for the stream
        return t.to(self.device)

    @torch.no_grad()
    def _launch_chunk(self, start: int, end: int, *, final: bool) -> None:
        """Queues the DiT solve of the chunk's window, the vocoder and the copy of its samples to the host."""
        lo, hi = self._window(start, end, len(self._codes))
        record = ChunkRecord(index=self._launched, start=start, end=end, dit_lo=lo, dit_hi=hi, voc_lo=0, voc_hi=0,
                             samples=0, dit_ms=0.0, vocoder_ms=0.0, final=final, launched_s=time.perf_counter())
        self._launched += 1
        if self._stream is None:
            samples, t1 = self._chunk(record)
            record.dit_ms, record.vocoder_ms = (t1 - record.launched_s) * 1e3, (time.perf_counter() - t1) * 1e3
            self._pending.append(_Pending(record, samples, None))
            return
        # Token2Wav's stream starts after what the caller queued so far (the noise and speaker tensors were made on
        # the caller's stream) and then runs beside it: decode steps go on while the chunk's ~40 DiT passes run.
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            marks[0].record()
            samples, _ = self._chunk(record, marks[1])
            marks[2].record()
        self._pending.append(_Pending(record, samples, marks))

    def _chunk(self, record: ChunkRecord, dit_done: torch.cuda.Event | None = None) -> tuple[torch.Tensor, float]:
        """The chunk's work on the current stream; returns (samples on the host, pinned on CUDA; the host clock
        after the DiT, which on CPU is when it finished)."""
        r, dit = self.repeats, self.token2wav.dit
        start, end, lo, hi = record.start, record.end, record.dit_lo, record.dit_hi
        # Window shapes of all but the last chunk are fixed by the settings: those replay CUDA graphs (captured on
        # first use, kept on the model for later utterances); the last chunk's odd shape runs eagerly.
        graphed = not record.final
        with self.token2wav.math_mode():
            static = self.conditioning(self._to_device(self._codes[lo:hi])[None])
            x0 = self.noise[:, lo * r:hi * r]  # the full run's noise at these absolute frames
            solve = functools.partial(_solve, dit, self.guidance_scale, self.guide)
            key = ("dit", self.guidance_scale, self.guide, dit.allow_tf32, get_backend())
            mel = self._graphs(key, solve, static, x0, self.time_points, capture_new=graphed)
            mel = mel.transpose(1, 2)  # (1, mel, repeats * (hi - lo))
        if dit_done is not None:
            dit_done.record()
        t1 = time.perf_counter()

        ctx = self.vocoder_context_frames
        keep = mel[:, :, (start - lo) * r:(end - lo) * r]
        right = mel[:, :, (end - lo) * r:(end - lo) * r + ctx]  # provisional mel of the right-context codes
        left = self._mel_tail
        wav = self._graphs(("vocoder", get_backend()), self.token2wav.vocode, torch.cat([left, keep, right], dim=-1),
                           capture_new=graphed)
        frames = left.shape[-1] + keep.shape[-1] + right.shape[-1]
        if wav.shape[-1] != frames * self.hop:  # every sample exactly once needs exactly hop samples per frame
            raise RuntimeError(f"vocoder returned {wav.shape[-1]} samples for {frames} mel frames, expected "
                               f"{self.hop} per frame")
        new = wav[0, left.shape[-1] * self.hop:(left.shape[-1] + keep.shape[-1]) * self.hop]
        if new.device.type == "cuda":
            samples = torch.empty(new.shape, dtype=torch.float32, pin_memory=True)
            samples.copy_(new, non_blocking=True)
        else:
            samples = new.float()
        tail = torch.cat([left, keep], dim=-1)
        self._mel_tail = tail[:, :, max(0, tail.shape[-1] - ctx):]
        self._next = end
        record.voc_lo, record.voc_hi = start * r - left.shape[-1], end * r + right.shape[-1]
        record.samples = samples.shape[0]
        return samples, t1

    def _collect(self, *, wait: bool) -> list[np.ndarray]:
        """The audio of the finished chunks at the head of the queue (all of them with ``wait``), in order."""
        out = []
        while self._pending:
            chunk = self._pending[0]
            if chunk.marks is not None:
                if not wait and not chunk.marks[2].query():
                    break
                chunk.marks[2].synchronize()
                chunk.record.dit_ms = chunk.marks[0].elapsed_time(chunk.marks[1])
                chunk.record.vocoder_ms = chunk.marks[1].elapsed_time(chunk.marks[2])
            self._pending.popleft()
            chunk.record.ready_s = time.perf_counter()
            self.chunks.append(chunk.record)
            self.samples_emitted += chunk.record.samples
            out.append(chunk.samples.numpy())
        return out
