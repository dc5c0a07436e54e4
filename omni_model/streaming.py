"""Streaming code-to-wave: Token2Wav on chunks of Talker codes as soon as they exist, for many replies at once.

HF 4.57.6 runs Token2Wav once over all codes of a reply. Qwen's own low-VRAM code (not in transformers) streams it:
DiT chunks of 48 codes with 24 codes of left and 12 of right context, positions and block indices restarting per
chunk, and vocoder chunks with 20 mel frames of context on each side (``docs/model.md``). This module does the same,
with a configurable (smaller) first chunk:

* DiT: chunk ``[start, end)`` runs the whole flow-matching ODE on the codes ``[lo, hi)`` with
  ``lo = align_down(start - left_context_codes)`` (clipped at 0) and ``hi = end + right_context_codes`` (clipped
  at the last code). The window starts on a DiT block boundary of the full utterance (block = ``block_size //
  repeats`` codes, 12 at 7B), so inside the window the block mask groups frames exactly as the full run does; the
  stacked receptive field of one DiT pass is 2 blocks back and 1 ahead, which the default contexts cover. The noise
  of a window is the same global noise tensor the non-streaming run uses, sliced at the window's absolute mel
  frames, so every frame starts the ODE from the noise the full run gives it. Only the mel of ``[start, end)`` is
  final; the right-context frames are provisional.
* Vocoder: the final mel of ``[start, end)`` with up to ``vocoder_context_frames`` frames on each side (left: the
  final mel of the previous chunks; right: the provisional mel of the right-context codes) is vocoded and the
  samples of the context frames are cut away (``hop`` samples per frame, 240 at 7B).

Samples come out in order, each exactly once: N codes give ``N * repeats * hop`` samples in total. Chunk boundaries
depend only on the number of codes, never on how they were pushed.

Many replies at once (the engine's voices): an :class:`Utterance` holds one reply's codes, schedule, speaker
conditioning and noise; a :class:`Token2WavRunner` runs the chunks that are ready across utterances together:
one DiT solve per solver setting with the windows packed along the length (``cu_seqlens``; positions and DiT blocks
restart in every window), then one vocoder call per window length. The 36 DiT passes per chunk are what many
concurrent voices cost, and they batch. A reply that is not streamed (``chunked=False``, ``generate``'s path) is a
single chunk over all its codes, which is exactly the non-streaming Token2Wav.

On CUDA the runner works on its own stream: ``run`` queues the work and returns, samples come back through pinned
memory, and each utterance hands out the audio of its finished chunks, in order, from a later ``collect``. The DiT
solve of windows of one common length and the vocoder of non-final chunks replay CUDA graphs (one per shape; the
last chunk's odd shape runs eagerly).

Quality is measured, not assumed: :func:`stream_snr_db` compares streamed audio with the non-streaming Token2Wav
audio of the same codes and noise (``tests/model/test_streaming.py`` on the tiny model, ``benchmarks/
bench_token2wav.py`` at 7B shapes).
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

from omni_model.engine.graphs import GraphCache
from omni_model.engine.runner import to_device
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


@dataclass
class ChunkRecord:
    """One emitted chunk: codes ``[start, end)``, the DiT window ``[dit_lo, dit_hi)`` (codes), the vocoder window
    ``[voc_lo, voc_hi)`` (absolute mel frames), the samples emitted and the time of each stage of the batch it ran in
    (on CUDA the GPU time between events on the runner's stream, elsewhere wall time)."""

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
    batch: int = 1  # chunks (of all utterances) in the DiT solve it ran in


@dataclass
class _Pending:
    record: ChunkRecord
    samples: torch.Tensor  # (n,) float32 on the host (pinned on CUDA, filled when marks[2] has passed)
    marks: list | None  # CUDA events: start, DiT done, samples copied (None on CPU: already done)


@dataclass
class ChunkJob:
    """A chunk of one utterance, ready to run."""

    utterance: Utterance
    record: ChunkRecord


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class Utterance:
    """One reply's code-to-wave state: its codes, the chunk schedule, the speaker conditioning, the noise and the final
    mel the next chunk's vocoder takes as left context.

    Args:
        token2wav: the model (its precision and ``math_mode`` are used as they are).
        cond: (1, enc_emb_dim) speaker vector; ref_mel: (1, T_ref, mel) reference mel.
        noise: (1, >= repeats * N, mel) initial noise, the same global tensor the non-streaming run takes, indexed by
            absolute mel frame (kept on the host; each window's slice goes up with its chunk); None: drawn like
            ``Token2Wav`` does (a CPU ``randn`` of 30000 frames from ``generator``), which bounds the utterance to
            30000 / repeats codes.
        num_steps, guidance_scale, sway_coefficient: the sampler settings of ``Token2Wav.mel``.
        first_chunk_codes: codes of the first chunk (None: ``chunk_codes``); any value >= 1. The first audio needs
            ``first_chunk_codes + right_context_codes`` codes. When it is not a multiple of the DiT block (in codes),
            the second chunk ends on the last block boundary before ``first_chunk_codes + chunk_codes`` so that every
            later chunk is block aligned again (and the second window's start is rounded down to a block boundary:
            more left context, never less).
        chunk_codes: codes per later chunk, a positive multiple of the DiT block in codes (12 at 7B).
        left_context_codes, right_context_codes: DiT context, multiples of the DiT block in codes (>= 0).
        vocoder_context_frames: mel frames of vocoder context on each side (>= 0).
        chunked: False runs the whole reply as one chunk when it is finished (the non-streaming Token2Wav).
    """

    def __init__(self, token2wav: Token2Wav, cond: torch.Tensor, ref_mel: torch.Tensor,
                 noise: torch.Tensor | None = None, *, num_steps: int = 10, guidance_scale: float = 0.5,
                 sway_coefficient: float | None = -1.0, first_chunk_codes: int | None = None, chunk_codes: int = 48,
                 left_context_codes: int = 24, right_context_codes: int = 12, vocoder_context_frames: int = 20,
                 generator: torch.Generator | None = None, chunked: bool = True):
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
            # in every DiT sequence, so a window must start on a block boundary of the utterance).
            if getattr(self, name) % self.block_codes:
                raise ValueError(f"{name} must be a multiple of the DiT block in codes (block_size {dit.cfg.block_size}"
                                 f" / repeats {dit.repeats} = {self.block_codes}), got {getattr(self, name)}")
        self.first_chunk_codes = (self.chunk_codes if first_chunk_codes is None
                                  else _int_arg("first_chunk_codes", first_chunk_codes, 1))
        self.vocoder_context_frames = _int_arg("vocoder_context_frames", vocoder_context_frames, 0)
        self.num_steps = _int_arg("num_steps", num_steps, 2)
        self.guidance_scale = float(guidance_scale)
        self.guide = self.guidance_scale >= GUIDANCE_EPS  # HF: below 1e-5 only the conditional branch runs
        self.sway_coefficient = sway_coefficient
        self.chunked = chunked

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
        self.noise = noise.detach().to(device="cpu", dtype=torch.float32)
        self.max_codes = noise.shape[1] // self.repeats

        self.time_points = sway_time_points(self.num_steps, sway_coefficient, device)
        with torch.no_grad(), token2wav.math_mode():
            # DiT.conditioning's speaker part, once per utterance: ECAPA over the reference mel (with guidance also
            # the unconditional row: a zero reference mel).
            self.voice = dit.voice(ref_mel.to(device), guidance=self.guide)
        self.speaker = cond.to(device=device, dtype=dit.dtype)

        self.codes: list[int] = []
        self._next = 0  # first code not yet queued
        self._launched = 0
        self._finished = False
        self._pending: collections.deque[_Pending] = collections.deque()
        self.mel_tail = torch.zeros(1, mel_dim, 0, device=device)  # final mel before _next (vocoder left context)
        self.samples_emitted = 0
        self.chunks: list[ChunkRecord] = []

    @property
    def solver_key(self) -> tuple:
        """Utterances with equal keys solve their chunks in one DiT batch (same time points and guidance)."""
        return (self.num_steps, self.sway_coefficient, self.guidance_scale)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def in_flight(self) -> bool:
        """Chunks queued whose audio has not been handed out yet."""
        return bool(self._pending)

    # -- schedule -----------------------------------------------------------------------------------------------

    def _chunk_end(self, start: int) -> int:
        if start == 0:
            return self.first_chunk_codes
        # Back onto the block grid after an unaligned first chunk (a no-op once start is aligned).
        return (start + self.chunk_codes) // self.block_codes * self.block_codes

    def _window(self, start: int, end: int) -> tuple[int, int]:
        lo = max(0, (start - self.left_context_codes) // self.block_codes * self.block_codes)
        return lo, min(end + self.right_context_codes, len(self.codes))

    def push(self, codes: Iterable[int] | torch.Tensor | np.ndarray) -> None:
        """Appends codes (a 1-D sequence of ints in the DiT's table, checked on the host)."""
        if self._finished:
            raise RuntimeError("push after finish(): make a new utterance for the next reply")
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu()
        new = torch.as_tensor(list(codes) if not isinstance(codes, (torch.Tensor, np.ndarray)) else codes)
        if new.dim() > 1:
            raise ValueError(f"codes must be a 1-D sequence of ints, got shape {tuple(new.shape)}")
        if new.numel() == 0:
            return
        if new.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"codes must be ints, got {new.dtype}")
        check_codes(new, self.token2wav.dit.num_embeds)
        if len(self.codes) + new.numel() > self.max_codes:
            raise ValueError(f"noise has {self.noise.shape[1]} frames: enough for {self.max_codes} codes, got "
                             f"{len(self.codes) + new.numel()}; pass a longer noise tensor")
        self.codes.extend(new.tolist())

    def ready(self, *, final: bool = False) -> list[ChunkJob]:
        """The chunks whose codes (and right context) exist, in order; with ``final`` also the rest as a last chunk
        (no right context), after which the utterance takes no more codes."""
        jobs = []
        while self.chunked:
            end = self._chunk_end(self._next)
            if end + self.right_context_codes > len(self.codes):
                break
            jobs.append(self._job(self._next, end, final=False))
        if final and not self._finished:
            self._finished = True
            if self._next < len(self.codes):
                jobs.append(self._job(self._next, len(self.codes), final=True))
        return jobs

    def _job(self, start: int, end: int, *, final: bool) -> ChunkJob:
        lo, hi = self._window(start, end)
        record = ChunkRecord(index=self._launched, start=start, end=end, dit_lo=lo, dit_hi=hi, voc_lo=0, voc_hi=0,
                             samples=0, dit_ms=0.0, vocoder_ms=0.0, final=final, launched_s=time.perf_counter())
        self._launched += 1
        self._next = end
        return ChunkJob(self, record)

    # -- audio --------------------------------------------------------------------------------------------------

    def collect(self, *, wait: bool = False) -> list[np.ndarray]:
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

    def close(self) -> None:
        """Takes no more codes; waits for the chunks in flight and drops their audio (a reply ended early)."""
        self._finished = True
        self.collect(wait=True)

    @property
    def stage_times(self) -> dict[str, float]:
        """Totals over the emitted chunks: DiT and vocoder milliseconds, the chunk count and the first chunk's
        DiT + vocoder milliseconds (0 before any chunk)."""
        first = self.chunks[0].dit_ms + self.chunks[0].vocoder_ms if self.chunks else 0.0
        return {"token2wav_dit_ms": sum(c.dit_ms for c in self.chunks),
                "token2wav_vocoder_ms": sum(c.vocoder_ms for c in self.chunks),
                "token2wav_chunks": float(len(self.chunks)),
                "token2wav_first_chunk_ms": first}


def _solve(dit: DiT, guidance_scale: float, guide: bool, static: torch.Tensor, x0: torch.Tensor,
           time_points: torch.Tensor, rot: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The flow-matching ODE of windows packed along the length: x0 (1, T, mel) noise -> mel (1, T, mel), ``static``
    their DiT conditioning (S, T, hidden), (rot, cu_seqlens) their :meth:`DiT.packed_layout`. Both guidance branches
    run in each DiT call."""

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        v = dit(x, t, static, (rot, cu_seqlens)).float()
        return guided(v[:1], v[1:], guidance_scale) if guide else v

    return integrate(velocity, x0, time_points)


class Token2WavRunner:
    """Runs ready chunks of many utterances of one Token2Wav: per call, one DiT solve per solver setting over the
    packed windows and one vocoder call per window length, on CUDA on the runner's own stream with CUDA graphs."""

    def __init__(self, token2wav: Token2Wav, *, cuda_graphs: bool = True):
        self.token2wav = token2wav
        self.device = token2wav.device
        self.graphs = GraphCache(self.device, enabled=cuda_graphs)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @torch.no_grad()
    def run(self, jobs: list[ChunkJob]) -> None:
        """Queues the jobs' work; each utterance hands out its audio from a later ``collect``. Jobs of one
        utterance must come in its order (as :meth:`Utterance.ready` gives them)."""
        if not jobs:
            return
        if self.stream is None:
            t0 = time.perf_counter()
            samples, t1 = self._work(jobs)
            t2 = time.perf_counter()
            for job, s in zip(jobs, samples):
                job.record.dit_ms, job.record.vocoder_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
                job.utterance._pending.append(_Pending(job.record, s, None))
            return
        # The runner's stream starts after what the caller queued so far and then runs beside it: decode steps go on
        # while the chunks' DiT passes run.
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            marks[0].record()
            samples, _ = self._work(jobs, marks[1])
            marks[2].record()
        for job, s in zip(jobs, samples):
            job.utterance._pending.append(_Pending(job.record, s, marks))

    def _work(self, jobs: list[ChunkJob], dit_done: torch.cuda.Event | None = None) -> tuple[list, float]:
        """The jobs' DiT solves and vocoders on the current stream; returns (samples per job, on the host; the host
        clock after the DiT)."""
        mels = {}
        with self.token2wav.math_mode():
            groups: dict[tuple, list[ChunkJob]] = {}
            for job in jobs:
                groups.setdefault(job.utterance.solver_key, []).append(job)
            for group in groups.values():
                for job, mel in zip(group, self._solve(group)):
                    mels[id(job)] = mel
        if dit_done is not None:
            dit_done.record()
        t1 = time.perf_counter()
        with self.token2wav.math_mode():
            samples = self._vocode(jobs, mels)
        return samples, t1

    def _solve(self, group: list[ChunkJob]) -> list[torch.Tensor]:
        """One DiT solve over the group's windows packed along the length -> each window's mel (1, mel, frames).

        Windows of one length are packed next to each other (the reference attention computes such a run in one
        batch; a uniform layout is a CUDA graph's key)."""
        order = sorted(range(len(group)), key=lambda i: group[i].record.dit_hi - group[i].record.dit_lo)
        mels = self._solve_packed([group[i] for i in order])
        out: list[torch.Tensor | None] = [None] * len(group)
        for i, mel in zip(order, mels):
            out[i] = mel
        return out

    def _solve_packed(self, group: list[ChunkJob]) -> list[torch.Tensor]:
        dit = self.token2wav.dit
        first = group[0].utterance
        r = first.repeats
        statics, noises, lengths = [], [], []
        for job in group:
            u, rec = job.utterance, job.record
            codes = to_device(u.codes[rec.dit_lo:rec.dit_hi], self.device)[None]
            statics.append(dit.conditioning(codes, u.speaker, voice=u.voice, guidance=u.guide))
            noises.append(u.noise[:, rec.dit_lo * r:rec.dit_hi * r])
            lengths.append((rec.dit_hi - rec.dit_lo) * r)
            rec.batch = len(group)
        positions, cu = DiT.packed_layout(lengths, 2 if first.guide else 1)
        rot = dit.rope(to_device(positions, self.device))
        x0 = to_device(torch.cat(noises, dim=1), self.device, torch.float32)
        solve = functools.partial(_solve, dit, first.guidance_scale, first.guide)
        key = ("dit", first.solver_key, dit.allow_tf32, get_backend(), tuple(lengths))
        # Windows of one length that are not last chunks recur: those shapes replay CUDA graphs.
        steady = len(set(lengths)) == 1 and not any(job.record.final for job in group)
        mel = self.graphs(key, solve, torch.cat(statics, dim=1), x0, first.time_points, rot,
                          to_device(cu, self.device, torch.int32), capture_new=steady)
        return list(mel.transpose(1, 2).split(lengths, dim=2))

    def _vocode(self, jobs: list[ChunkJob], mels: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Vocoder inputs in each utterance's order (the left context is the final mel of its previous chunks), run
        in one batch per input length; returns each chunk's new samples on the host."""
        inputs, cuts = [], []
        for job in jobs:
            u, rec = job.utterance, job.record
            r, ctx = u.repeats, u.vocoder_context_frames
            mel = mels[id(job)]
            keep = mel[:, :, (rec.start - rec.dit_lo) * r:(rec.end - rec.dit_lo) * r]
            right = mel[:, :, (rec.end - rec.dit_lo) * r:(rec.end - rec.dit_lo) * r + ctx]  # provisional
            left = u.mel_tail
            inputs.append(torch.cat([left, keep, right], dim=-1))
            cuts.append((left.shape[-1] * u.hop, (left.shape[-1] + keep.shape[-1]) * u.hop))
            tail = torch.cat([left, keep], dim=-1)
            u.mel_tail = tail[:, :, max(0, tail.shape[-1] - ctx):]
            rec.voc_lo, rec.voc_hi = rec.start * r - left.shape[-1], rec.end * r + right.shape[-1]
        # One call per input length on CUDA, where a batch fills the GPU. On a CPU every chunk goes alone: the
        # vocoder is compute-bound there and a batch's activations leave the cache (scripts/cpu_burst_breakdown.py on
        # the 2-core CPU, tiny model: 16 chunks of 136 frames took 2.63 s one by one and 5.03 s as one batch).
        batch = self.device.type == "cuda"
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault((x.shape[-1], 0 if batch else i), []).append(i)
        waves: list[torch.Tensor | None] = [None] * len(jobs)
        hop = self.token2wav.vocoder.hop
        for (frames, _), members in groups.items():
            steady = not any(jobs[i].record.final for i in members)
            wav = self.graphs(("vocoder", get_backend()), self.token2wav.vocode,
                              torch.cat([inputs[i] for i in members]), capture_new=steady)
            if wav.shape[-1] != frames * hop:  # every sample exactly once needs exactly hop samples per frame
                raise RuntimeError(f"vocoder returned {wav.shape[-1]} samples for {frames} mel frames, expected "
                                   f"{hop} per frame")
            for row, i in enumerate(members):
                waves[i] = wav[row, cuts[i][0]:cuts[i][1]]
        out = []
        for job, new in zip(jobs, waves):
            if new.device.type == "cuda":
                samples = torch.empty(new.shape, dtype=torch.float32, pin_memory=True)
                samples.copy_(new, non_blocking=True)
            else:
                samples = new.float()
            job.record.samples = samples.shape[0]
            out.append(samples)
        return out


class Token2WavStreamer:
    """Streams one utterance: an :class:`Utterance` run by a :class:`Token2WavRunner` (its own, or a shared one).

    Takes the arguments of :class:`Utterance`, plus ``cuda_graphs`` (for its own runner) or ``runner``.
    ``push(codes)`` and ``finish()`` return the new audio as a list of 1-D float32 arrays (possibly empty; on CUDA a
    chunk's audio comes out of a later ``push`` or ``finish``, always in order). ``chunks`` holds a
    :class:`ChunkRecord` per emitted chunk and ``stage_times`` the totals.
    """

    def __init__(self, token2wav: Token2Wav, cond: torch.Tensor, ref_mel: torch.Tensor,
                 noise: torch.Tensor | None = None, *, cuda_graphs: bool = True,
                 runner: Token2WavRunner | None = None, **kwargs):
        self.utterance = Utterance(token2wav, cond, ref_mel, noise, **kwargs)
        self.runner = runner if runner is not None else Token2WavRunner(token2wav, cuda_graphs=cuda_graphs)

    def push(self, codes: Iterable[int] | torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """Appends codes, starts every chunk that became ready, returns the audio of the chunks that finished."""
        if self.utterance.finished:
            raise RuntimeError("push after finish(): make a new Token2WavStreamer for the next utterance")
        self.utterance.push(codes)
        self.runner.run(self.utterance.ready())
        return self.utterance.collect()

    def finish(self) -> list[np.ndarray]:
        """Flushes the codes not yet emitted as one last chunk (no right context) and waits for every chunk;
        returns their audio. Later calls return []."""
        if self.utterance.finished:
            return []
        self.runner.run(self.utterance.ready(final=True))
        return self.utterance.collect(wait=True)

    def close(self) -> None:
        """Waits for the chunks in flight and drops their audio (a stream closed early)."""
        self.utterance.close()

    @property
    def chunks(self) -> list[ChunkRecord]:
        return self.utterance.chunks

    @property
    def stage_times(self) -> dict[str, float]:
        return self.utterance.stage_times

    @property
    def samples_emitted(self) -> int:
        return self.utterance.samples_emitted

    @property
    def codes_pushed(self) -> int:
        return len(self.utterance.codes)


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
