"""A test double of ``OmniEngine`` with the same interface and deterministic, checkable outputs.

It exercises the server's plumbing (queues, threads, streaming, aborts, admission, metrics) fast and exactly,
independently of the model: each step, every running request gets one text id and, when it speaks, one chunk of
audio, both functions of its prompt and step only (so a request's outputs do not depend on what runs beside it, as
the real engine promises for greedy requests). Blocks are counted like a paged KV cache with a prefix cache, and
``step`` sleeps ``step_s`` so that many clients overlap. The end-to-end tests run the real engine.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

OPTIONS = {"speaker", "return_audio", "use_audio_in_video", "thinker_max_new_tokens", "thinker_do_sample",
           "thinker_temperature", "thinker_top_k", "thinker_top_p", "thinker_repetition_penalty",
           "talker_max_new_tokens", "talker_do_sample", "talker_top_k", "talker_top_p", "talker_temperature",
           "talker_repetition_penalty", "token2wav_num_steps", "token2wav_guidance_scale",
           "token2wav_sway_coefficient", "seed", "first_chunk_codes"}
TEXT_IDS = range(13, 39)  # the tiny tokenizer's letters a..z
CHUNK = 480  # audio samples per step: one code's worth at 24 kHz


@dataclass
class Output:
    request_id: str
    text_ids: list[int]
    audio: np.ndarray
    finished: bool = False
    error: str | None = None
    stage_times: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class _Request:
    rid: str
    ids: list[int]
    options: dict
    arrival: float
    blocks: int = 0
    cached: int = 0
    step: int = 0
    times: dict[str, float] = field(default_factory=dict)


class ScriptedEngine:
    """``reply_tokens`` text ids per request (finish "stop"), or ``thinker_max_new_tokens`` when given (finish
    "length")."""

    def __init__(self, *, speakers=("Chelsie", "Ethan"), max_num_seqs: int = 64, num_blocks: int = 256,
                 block_size: int = 16, max_prompt: int = 1024, reply_tokens: int = 12, step_s: float = 0.01):
        self.speakers = set(speakers)
        self.max_num_seqs = max_num_seqs
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_prompt = max_prompt
        self.reply_tokens = reply_tokens
        self.step_s = step_s
        self._lock = threading.Lock()
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._aborted: set[str] = set()
        self._cached_prefixes: set[str] = set()
        self._ids = itertools.count()
        self.prefix_hit_tokens = 0
        self.added: list[tuple[dict, dict]] = []  # (inputs, options) of every request added
        self.finish_reasons: dict[str, str] = {}  # request id -> finish_reason

    # ------------------------------------------------------------------------------ the OmniEngine interface

    def add_request(self, inputs: dict, request_id: str | None = None, **options) -> str:
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
        if options.get("return_audio", True) and options.get("speaker", "Chelsie") not in self.speakers:
            raise ValueError(f"speaker {options.get('speaker')!r} is not one of {sorted(self.speakers)}")
        ids = inputs["input_ids"][0].tolist()
        if len(ids) > self.max_prompt:
            raise ValueError(f"the prompt needs position ids up to {len(ids) - 1}, beyond max_position_embeddings "
                             f"{self.max_prompt}")
        rid = request_id or f"req-{next(self._ids)}"
        with self._lock:
            self.added.append((inputs, dict(options)))
            self._waiting.append(_Request(rid, ids, options, time.perf_counter()))
        return rid

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def stats(self) -> dict:
        with self._lock:
            used = sum(r.blocks for r in self._running)
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "thinker_free_blocks": self.num_blocks - used, "thinker_total_blocks": self.num_blocks,
                    "talker_free_blocks": self.num_blocks - used, "talker_total_blocks": self.num_blocks,
                    "prefix_cache_hit_tokens": self.prefix_hit_tokens}

    def step(self) -> list[Output]:
        time.sleep(self.step_s)
        outs: list[Output] = []
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            for queue in (self._waiting, self._running):
                for req in [r for r in queue if r.rid in aborted]:
                    queue.remove(req)
                    outs.append(self._finish(req, "abort"))
            while self._waiting and len(self._running) < self.max_num_seqs:
                req = self._waiting.pop(0)
                req.blocks = -(-len(req.ids) // self.block_size) + 1
                req.cached = self._prefix_hits(req.ids)
                self.prefix_hit_tokens += req.cached
                self._running.append(req)
            for req in list(self._running):
                outs.append(self._advance(req))
        return outs

    # ------------------------------------------------------------------------------ the script

    def expected(self, ids: list[int], options: dict) -> tuple[list[int], np.ndarray]:
        """The text ids and audio a request gets, without running it."""
        n = self._length(options)
        text = [self._token(ids, k) for k in range(n)]
        speaks = options.get("return_audio", True)
        audio = np.concatenate([self._audio(ids, k) for k in range(n)]) if speaks else np.zeros(0, np.float32)
        return text, audio

    def _length(self, options: dict) -> int:
        return options.get("thinker_max_new_tokens", self.reply_tokens)

    @staticmethod
    def _token(ids: list[int], k: int) -> int:
        return TEXT_IDS[(sum(ids) * 7 + k * 3 + len(ids)) % len(TEXT_IDS)]

    @staticmethod
    def _audio(ids: list[int], k: int) -> np.ndarray:
        t = np.arange(k * CHUNK, (k + 1) * CHUNK) / 24000.0
        return (0.5 * np.sin(2 * np.pi * (200 + sum(ids) % 300) * t)).astype(np.float32)

    def _prefix_hits(self, ids: list[int]) -> int:
        hits, full = 0, len(ids) // self.block_size
        for b in range(full):
            key = hashlib.sha1(repr(ids[: (b + 1) * self.block_size]).encode()).hexdigest()
            if key in self._cached_prefixes and hits == b * self.block_size:
                hits += self.block_size
            self._cached_prefixes.add(key)
        return hits

    def _ms(self, req: _Request) -> float:
        return (time.perf_counter() - req.arrival) * 1000.0

    def _advance(self, req: _Request) -> Output:
        k = req.step
        req.step += 1
        speaks = req.options.get("return_audio", True)
        req.times.setdefault("first_token", self._ms(req))
        audio = self._audio(req.ids, k) if speaks else np.zeros(0, np.float32)
        if speaks:
            req.times.setdefault("first_audio", self._ms(req))
        out = Output(req.rid, [self._token(req.ids, k)], audio, num_prompt_tokens=len(req.ids),
                     num_cached_tokens=req.cached)
        if req.step >= self._length(req.options):
            self._running.remove(req)
            done = self._finish(req, "length" if "thinker_max_new_tokens" in req.options else "stop")
            out.finished, out.finish_reason, out.stage_times = True, done.finish_reason, done.stage_times
        else:
            out.stage_times = dict(req.times)
        return out

    def _finish(self, req: _Request, reason: str) -> Output:
        req.times["done"] = self._ms(req)
        req.blocks = 0
        self.finish_reasons[req.rid] = reason
        return Output(req.rid, [], np.zeros(0, np.float32), finished=True, finish_reason=reason,
                      stage_times=dict(req.times), num_prompt_tokens=len(req.ids), num_cached_tokens=req.cached)


def main(argv: list[str]) -> None:
    """``python scripted_engine.py PORT PROCESSOR_DIR``: the real server front (``omni serve``'s uvicorn, SIGTERM
    drain included) over this engine, for the tests that need a server process of their own."""
    from omni_model import OmniConfig
    from omni_model.serve.app import ServerContext, build_app
    from omni_model.serve.async_engine import AsyncEngine
    from omni_model.serve.cli import serve
    from omni_model.serve.metrics import ServerMetrics
    from omni_model.serve.prompt import PromptBuilder

    port, processor = int(argv[0]), argv[1]
    metrics = ServerMetrics()
    engine = AsyncEngine(ScriptedEngine(step_s=0.02, reply_tokens=40), max_num_seqs=8, max_waiting=8,
                         metrics=metrics)
    builder = PromptBuilder.from_pretrained(processor, OmniConfig.preset("tiny").thinker_config)
    ctx = ServerContext(model_name="tiny", engine=engine, builder=builder, metrics=metrics,
                        speakers=["Chelsie", "Ethan"])
    serve(build_app(ctx), ctx, host="127.0.0.1", port=port, shutdown_timeout=30, log_level="warning")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
