"""The scheduler: which requests run, and what each decoder computes in the next step.

Per decoder and step, decodes come first: every running request whose next input is known takes one token (one
new cache slot). Prefill chunks then fill the rest of ``max_num_batched_tokens``: first the requests already
prefilling, in admission order, then waiting requests, first come first served, as long as ``max_num_seqs`` and the
free blocks allow: a request is admitted only when its prompt fits (shared prefix blocks count once). The Talker of
a request starts once its prompt's Thinker states and its first reply element exist.

When a running request needs a block and none is free, the most recently admitted running request is preempted:
its blocks and its sampling slot go back, it keeps everything it has read back (and streamed), and it returns to
the head of the queue; when it is admitted again, its decoders recompute their KV from the prompt and the tokens and
codes known on the host, then decode on from the last one. A request that cannot fit even alone is refused by
``OmniEngine.add_request`` before it is queued.

Host bookkeeping only: no tensors are made here.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from omni_model.engine.block_manager import CacheFullError
from omni_model.engine.config import EngineConfig
from omni_model.engine.request import Request, Status, Track
from omni_model.engine.runner import DecoderRunner
from omni_model.engine.talker_inputs import element_ready


@dataclass
class StepPlan:
    """What one step computes. Chunks are (request, first position, number of positions)."""

    thinker_decodes: list[Request] = field(default_factory=list)
    thinker_chunks: list[tuple[Request, int, int]] = field(default_factory=list)
    talker_starts: list[Request] = field(default_factory=list)
    talker_decodes: list[Request] = field(default_factory=list)
    talker_chunks: list[tuple[Request, int, int]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # (re)admitted this step: their slot state is set first
    preempted: list[Request] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        return not (self.thinker_chunks or self.talker_chunks or self.talker_starts or self.admitted)

    def drop(self, req: Request) -> None:
        """Removes a preempted request from everything planned so far."""
        for name in ("thinker_decodes", "talker_decodes", "talker_starts", "admitted"):
            setattr(self, name, [r for r in getattr(self, name) if r is not req])
        for name in ("thinker_chunks", "talker_chunks"):
            setattr(self, name, [c for c in getattr(self, name) if c[0] is not req])


class Scheduler:
    """Waiting queue, running set, sampling slots and the per-step plan for the two decoders."""

    def __init__(self, config: EngineConfig, thinker: DecoderRunner, talker: DecoderRunner | None):
        self.config = config
        self.thinker = thinker
        self.talker = talker
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self._admissions = itertools.count()
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens served by the prefix cache at first admission, in total

    # ------------------------------------------------------------------------------------------ feedability

    @staticmethod
    def thinker_feedable(req: Request) -> bool:
        t = req.thinker
        return (t.seq is not None and not t.prefilling and not t.done and t.drawn >= 1
                and t.drawn < req.options.thinker_max_new_tokens)

    @staticmethod
    def talker_feedable(req: Request) -> bool:
        k = req.talker
        return (req.talker_prompt is not None and k.seq is not None and not k.prefilling and not k.done
                and k.drawn >= 1 and k.drawn < req.options.talker_max_new_tokens and element_ready(req, k.drawn))

    @staticmethod
    def talker_startable(req: Request) -> bool:
        t = req.thinker
        return (req.speak and req.talker_prompt is None and not req.talker.done and t.seq is not None
                and t.computed >= req.num_prompt_tokens and len(t.samples) >= 1 and len(req.reply) >= 1)

    # ------------------------------------------------------------------------------------------ one step

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if req.status is Status.RUNNING and self.thinker_feedable(req):
                if self._reserve(req, self.thinker, req.thinker, plan):
                    plan.thinker_decodes.append(req)
        if self.talker is not None:
            for req in list(self.running):
                if req.status is Status.RUNNING and self.talker_feedable(req):
                    if self._reserve(req, self.talker, req.talker, plan):
                        plan.talker_decodes.append(req)
        left = budget - len(plan.thinker_decodes)
        for req in self.running:
            if left > 0 and req.thinker.prefilling:
                left -= self._chunk(plan.thinker_chunks, req, req.thinker, left)
        while left > 0 and self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req in plan.preempted or req.thinker.in_flight or req.talker.in_flight or not self._admit(req):
                break
            self.waiting.popleft()
            plan.admitted.append(req)
            if req.thinker.prefilling:
                left -= self._chunk(plan.thinker_chunks, req, req.thinker, left)
        if self.talker is not None:
            self._schedule_talker(plan, budget - len(plan.talker_decodes))
        return plan

    def _schedule_talker(self, plan: StepPlan, left: int) -> None:
        for req in list(self.running):
            if left <= 0:
                break
            if req.status is not Status.RUNNING:
                continue
            if self.talker_startable(req):
                if not self._start_talker(req, plan):
                    continue
                plan.talker_starts.append(req)
            if req.talker.prefilling:
                left -= self._chunk(plan.talker_chunks, req, req.talker, left)

    @staticmethod
    def _chunk(chunks: list, req: Request, track: Track, left: int) -> int:
        n = min(left, track.target - track.computed)
        chunks.append((req, track.computed, n))
        return n

    # ------------------------------------------------------------------------------------------ blocks

    def _reserve(self, req: Request, runner: DecoderRunner, track: Track, plan: StepPlan) -> bool:
        """One more slot for ``track``'s next decode, preempting newer requests while no block is free; False when
        ``req`` itself was preempted."""
        while runner.reserve_decode([track.seq]):
            victim = max((r for r in self.running), key=lambda r: r.admitted_at)
            self.preempt(victim, plan)
            if victim is req:
                return False
        return True

    def _start_talker(self, req: Request, plan: StepPlan) -> bool:
        """Blocks for the Talker prompt (L + 2 positions), preempting newer requests if needed."""
        length = req.num_prompt_tokens + 2
        hashes = req.hashes[:req.num_prompt_tokens // self.talker.config.block_size]
        while True:
            try:
                req.talker.seq = self.talker.allocate(length, hashes)
                break
            except CacheFullError:
                victim = max(self.running, key=lambda r: r.admitted_at)
                self.preempt(victim, plan)
                if victim is req:
                    return False
        k = req.talker
        k.computed, k.target, k.sample_at_target = k.seq.num_cached_tokens, length, True
        return True

    def _resume_targets(self, req: Request) -> tuple[tuple[int, bool] | None, tuple[int, bool] | None]:
        """(target, sample_at_target) of each decoder's cache for a (re)admission, None where none is needed."""
        length = req.num_prompt_tokens
        thinker = talker = None
        if req.needs_thinker_cache:
            n = len(req.thinker.samples)
            if n == 0:
                thinker = (length, True)
            elif req.thinker.done:
                thinker = (length, False)  # only the prompt's hidden states, for the Talker's prompt
            else:
                thinker = (length + n - 1, False)  # then decode on from the last token
        if req.talker_prompt is not None and not req.talker.done:
            n = len(req.talker.samples)
            talker = (length + 2, True) if n == 0 else (length + 2 + n - 1, False)
        return thinker, talker

    def _admit(self, req: Request) -> bool:
        """Admits the head of the queue when its caches fit (both decoders' blocks at once, or neither)."""
        thinker, talker = self._resume_targets(req)
        prompt_blocks = req.num_prompt_tokens // self.thinker.config.block_size
        need_t = 0 if thinker is None else self.thinker.blocks.free_blocks_needed(thinker[0], req.hashes)
        need_k = 0 if talker is None else self.talker.blocks.free_blocks_needed(talker[0], req.hashes[:prompt_blocks])
        if need_t > self.thinker.blocks.num_free_blocks or (
                talker is not None and need_k > self.talker.blocks.num_free_blocks):
            return False
        if thinker is not None:
            self._allocate(req.thinker, self.thinker, thinker, req.hashes)
        if talker is not None:
            self._allocate(req.talker, self.talker, talker, req.hashes[:prompt_blocks])
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = min(req.thinker.computed, req.num_prompt_tokens)
            self.prefix_hit_tokens += req.num_cached_tokens
        req.slot = self.free_slots.pop()
        req.admitted_at = next(self._admissions)
        req.status = Status.RUNNING
        self.running.append(req)
        return True

    @staticmethod
    def _allocate(track: Track, runner: DecoderRunner, target: tuple[int, bool], hashes: list[bytes]) -> None:
        track.seq = runner.allocate(target[0], hashes)
        track.computed, track.target, track.sample_at_target = track.seq.num_cached_tokens, target[0], target[1]
        track.registered = track.computed // runner.config.block_size

    def preempt(self, req: Request, plan: StepPlan | None = None) -> None:
        """Takes back ``req``'s blocks and slot; it waits at the head of the queue to be recomputed."""
        self.release(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        if plan is not None:
            plan.drop(req)
            plan.preempted.append(req)

    def release(self, req: Request) -> None:
        """Returns every block and the slot of a running request (finished, failed, aborted or preempted)."""
        for track, runner in ((req.thinker, self.thinker), (req.talker, self.talker)):
            if track.seq is not None:
                runner.free(track.seq)
            track.reset()
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None
        if req in self.running:
            self.running.remove(req)

    def free_thinker(self, req: Request) -> None:
        """The Thinker's blocks of a request that no longer needs them (its prefix blocks stay cached)."""
        if req.thinker.seq is not None:
            self.thinker.free(req.thinker.seq)
            req.thinker.seq = None
