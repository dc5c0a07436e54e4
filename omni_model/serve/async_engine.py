"""The engine thread and its asyncio front: one thread owns the device, every request reads its own queue.

The engine (``OmniEngine``: ``add_request``, ``step``, ``abort_request``, ``has_unfinished_requests``, ``stats``) is
driven by one thread that calls ``step()`` while there is work and sleeps on an event otherwise. Requests are added
and aborted from the asyncio side (``add_request`` and ``abort_request`` are thread-safe); each step's outputs go
back to their request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``, the pattern of vLLM's OpenAI
server. The metrics are updated by the engine thread itself, so they do not depend on a client reading its stream.

Admission: at most ``max_num_seqs + max_waiting`` requests are in flight (added, not finished); one more is refused
at once (:class:`QueueFull`, HTTP 429) instead of waiting without bound. A request whose reader goes away (a closed
connection) is aborted; the engine frees its blocks at the next step and still sends its last output (``finished``,
``finish_reason`` "abort"), which ends its bookkeeping here.

If ``step()`` itself raises (a bug, not a bad request: those fail in ``add_request`` or alone in their output), the
requests in flight end with that error, are aborted, and the thread goes on serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omni_model.serve.metrics import ServerMetrics

log = logging.getLogger("omni.serve")


class QueueFull(Exception):
    """The server holds as many requests as it may; the client should retry later."""


@dataclass
class FailedOutput:
    """What a request gets when the engine step itself failed: the fields of the engine's ``RequestOutput``."""

    request_id: str
    error: str
    text_ids: list[int] = field(default_factory=list)
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    finished: bool = True
    finish_reason: str = "error"
    stage_times: dict[str, float] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class RequestStream:
    """One request's outputs, in order, ending with the one whose ``finished`` is True."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        while not self.finished:
            out = await self.queue.get()
            self.finished = bool(out.finished)
            yield out


class AsyncEngine:
    """Owns the engine thread. ``max_num_seqs`` is the engine's running limit, ``max_waiting`` how many more may
    wait in its queue."""

    def __init__(self, engine, *, max_num_seqs: int, max_waiting: int, metrics: ServerMetrics | None = None,
                 idle_poll_s: float = 0.5):
        self.engine = engine
        self.capacity = max_num_seqs + max_waiting
        self.metrics = metrics
        self.idle_poll_s = idle_poll_s
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats: dict[str, Any] = {}
        self.step_failures = 0
        self.steps = 0

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stats = dict(self.engine.stats())
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="omni-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the thread after its current step (requests still in flight are aborted first)."""
        for rid in self.in_flight_ids():
            self.engine.abort_request(rid)
        self._stop.set()
        self._work.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------------------ requests

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def in_flight_ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    async def add(self, request_id: str, inputs: dict, options: dict) -> RequestStream:
        """Queues a request; raises :class:`QueueFull`, or the engine's ValueError / TypeError for a bad one
        (nothing is left queued then)."""
        stream = RequestStream(request_id, asyncio.get_running_loop())
        with self._lock:
            if len(self._streams) >= self.capacity:
                raise QueueFull(f"the server holds {len(self._streams)} requests, its limit")
            self._streams[request_id] = stream  # before add_request: the engine may answer at once
        try:
            # add_request checks the inputs on the host (position ids of long prompts take a while): not here on the
            # event loop.
            await asyncio.to_thread(self.engine.add_request, inputs, request_id=request_id, **options)
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        self._work.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Aborts a request still in flight (a no-op for one that has finished)."""
        with self._lock:
            known = request_id in self._streams
        if known:
            self.engine.abort_request(request_id)
            self._work.set()

    def stats(self) -> dict[str, Any]:
        """The engine's stats after its latest step."""
        return dict(self._stats)

    # ------------------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self._work.clear()  # before the check: an add that lands after it sets the event again
            if not self.engine.has_unfinished_requests():
                self._work.wait(self.idle_poll_s)
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a fault of the engine, not of one request: fail those in flight, go on
                self.step_failures += 1
                log.error("engine step failed:\n%s", traceback.format_exc())
                outputs = [FailedOutput(rid, f"engine step failed: {type(exc).__name__}: {exc}")
                           for rid in self.in_flight_ids()]
                for out in outputs:
                    try:
                        self.engine.abort_request(out.request_id)
                    except Exception:  # the engine may not know the request any more
                        pass
                time.sleep(0.05)  # a step that keeps failing must not spin
            self.steps += 1
            try:
                self._stats = dict(self.engine.stats())
                self._publish_stats()
            except Exception:  # stale numbers on /health and /metrics, but the requests go on
                log.error("engine stats failed:\n%s", traceback.format_exc())
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if stream is not None and out.finished:
                del self._streams[out.request_id]
        if self.metrics is not None:
            self.metrics.observe_output(out)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
            except RuntimeError:  # the event loop has closed (shutdown): nobody reads this any more
                pass

    def _publish_stats(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_stats(self._stats)
