"""One request: everything the engine knows of one conversation turn, in one object.

A request runs through two decoders, each followed by a :class:`Track` (its KV blocks, how many positions are
computed, how many are known on the host, its samples), then through Token2Wav (an
:class:`~omni_model.streaming.Utterance`). Its life:

* WAITING: queued, or preempted (its blocks were taken back; it keeps what it streamed and recomputes its KV from
  its prompt and its tokens when it is admitted again);
* RUNNING: admitted, with a sampling slot and KV blocks (prefill chunks, then decode steps);
* DRAINING: both decoders done, its blocks and slot returned, Token2Wav still turning its last codes into audio;
* FINISHED: its last :class:`RequestOutput` said ``finished``.

Positions: prompt token i has the prompt's TMRoPE ids; every later position p (reply tokens, the Talker's speaker
and first-reply positions, codes) has ``p + delta`` on all three axes, ``delta = max prompt id + 1 - L``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_model.engine.block_manager import SeqBlocks, hash_blocks
from omni_model.inputs import GenerationConfig, MediaItem, ThinkerPrompt


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DRAINING = "draining"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step made for one request: new text ids, new Talker codes, new 24 kHz samples, and whether it is
    over.

    ``finish_reason``: "stop" (an end-of-turn id), "length" (``thinker_max_new_tokens``), "abort" or "error" once
    ``finished``; ``error`` says why a failed request failed (the others went on). ``stage_times``: ms since the
    request arrived at each stage reached so far (encoders, thinker_prefill, first_token, talker_prefill,
    first_audio, done) and the Token2Wav totals. ``num_cached_tokens``: prompt tokens served by the prefix cache.
    """

    request_id: str
    text_ids: list[int]
    audio: np.ndarray
    finished: bool
    error: str | None
    stage_times: dict[str, float]
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    codes: list[int] = field(default_factory=list)  # the new Talker codes (what the audio is made of)


@dataclass
class Track:
    """One request's progress through one decoder.

    Positions [0, ``computed``) have their KV written; [``computed``, ``target``) have inputs known on the host and
    are prefilled in chunks; once ``computed == target`` each decode step feeds the last sample (from the device)
    at position ``computed``. ``sample_at_target``: the prefill's last chunk draws the first sample (a fresh prompt;
    a resumed track decodes its last known sample instead). ``samples`` are read back, ``in_flight`` drawn but not
    read yet.
    """

    seq: SeqBlocks | None = None
    computed: int = 0
    target: int = 0
    sample_at_target: bool = False
    registered: int = 0  # leading full blocks offered to the prefix cache
    samples: list[int] = field(default_factory=list)
    in_flight: int = 0
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.seq is not None and self.computed < self.target

    @property
    def drawn(self) -> int:
        """Samples drawn so far (read back or in flight)."""
        return len(self.samples) + self.in_flight

    def reset(self) -> None:
        """Forgets the cache (preemption); the samples stay."""
        self.seq, self.computed, self.target, self.sample_at_target, self.registered = None, 0, 0, False, 0


class Request:
    """One conversation turn (batch 1) through the engine."""

    def __init__(self, request_id: str, prompt: ThinkerPrompt, options: GenerationConfig, *, seed: int,
                 media: list[MediaItem], block_size: int, hashed: bool,
                 sink: Callable[[RequestOutput], None] | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.options = options
        self.seed = seed
        self.media = media
        self.sink = sink
        self.arrival = time.perf_counter()
        self.prompt_ids: list[int] = prompt.ids.cpu().tolist()
        self.positions = prompt.positions.cpu()
        self.delta = int(self.positions.max()) + 1 - len(self.prompt_ids)
        self.speak = options.return_audio
        self.block_size = block_size
        # Chained hashes of the full blocks of prompt + known reply tokens (prefix caching; [] when it is off).
        self.hashes: list[bytes] = self._hash(self.prompt_ids) if hashed else []
        self.hashed = hashed

        self.status = Status.WAITING
        self.slot: int | None = None
        self.admitted_at = -1  # admission order (preemption takes the most recent)
        self.thinker = Track()
        self.talker = Track()
        self.embeds: torch.Tensor | None = None  # (L, E) prompt embeddings, media features in place
        self.encoded: set[tuple[str, int]] = set()  # (kind, index) of the media whose features are in ``embeds``
        self.reply: list[torch.Tensor] = []  # Talker reply elements (E,): Thinker hidden + embedding per fed token
        self.talker_prompt: torch.Tensor | None = None  # (L + 2, talker hidden): its projected prompt inputs
        self.utterance = None  # omni_model.streaming.Utterance once the Talker starts
        self.num_cached_tokens = -1  # set at the first admission

        self.finish_reason: str | None = None
        self.error: str | None = None
        self.times: dict[str, float] = {}
        self.new_text: list[int] = []
        self.new_codes: list[int] = []
        self.new_audio: list[np.ndarray] = []
        self.changed = False  # something to report at the end of the step

    # ------------------------------------------------------------------------------------------- facts

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def positions_of(self, start: int, end: int) -> torch.Tensor:
        """(3, end - start) int64 ids of positions [start, end) on the host."""
        n = len(self.prompt_ids)
        head = self.positions[:, start:min(end, n)]
        tail = torch.arange(max(start, n), max(end, n)).add_(self.delta).expand(3, -1)
        return torch.cat([head, tail], dim=1)

    def mark(self, stage: str) -> None:
        if stage not in self.times:
            self.times[stage] = (time.perf_counter() - self.arrival) * 1e3
            self.changed = True

    @property
    def needs_thinker_cache(self) -> bool:
        """The Thinker's cache is still needed: it writes text, or the Talker has yet to read the prompt's hidden
        states from it."""
        return not self.thinker.done or (self.speak and self.talker_prompt is None and not self.talker.done)

    @property
    def decoders_done(self) -> bool:
        return self.thinker.done and (not self.speak or self.talker.done)

    # ------------------------------------------------------------------------------------------- prefix hashes

    def _media_extra(self, lo: int, hi: int) -> bytes:
        return b"".join(m.digest for m in self.media if m.start < hi and m.end > lo)

    def _hash(self, ids: list[int], prev: list[bytes] | None = None) -> list[bytes]:
        return hash_blocks(ids, self.block_size, extra=self._media_extra, prev=prev or [])

    def extend_hashes(self) -> None:
        """Hashes the full blocks that the read-back reply tokens completed."""
        if self.hashed:
            self.hashes += self._hash(self.prompt_ids + self.thinker.samples, self.hashes)

    # ------------------------------------------------------------------------------------------- output

    def take_output(self, extra_times: dict[str, float]) -> RequestOutput:
        audio = np.concatenate(self.new_audio) if self.new_audio else np.zeros(0, dtype=np.float32)
        out = RequestOutput(
            request_id=self.request_id, text_ids=self.new_text, audio=audio,
            finished=self.status is Status.FINISHED, error=self.error, stage_times={**self.times, **extra_times},
            finish_reason=self.finish_reason, num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=max(self.num_cached_tokens, 0), codes=self.new_codes,
        )
        self.new_text, self.new_codes, self.new_audio, self.changed = [], [], [], False
        return out
