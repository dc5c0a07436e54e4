"""``generate`` and ``stream``: thin loops over the model's :class:`~omni_model.engine.engine.OmniEngine`.

Each row of a prompt batch becomes one engine request. The engine batches them with whatever else runs (other
threads' calls included), so a call never waits for another to finish. Whoever waits for outputs steps the engine
when no other thread is stepping it (:func:`next_outputs`); the others wait on their own queues, which the stepping
thread fills. Nothing is held across a ``stream`` yield: no lock, no backend or inference-mode context.
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_model.engine.engine import OmniEngine, RequestTooLarge
from omni_model.engine.request import RequestOutput
from omni_model.inputs import prepare_thinker_prompt, split_kwargs, split_rows

# How long a waiting caller sleeps before it checks whether it must step the engine itself (another thread was
# stepping it and has stopped).
POLL_SECONDS = 0.005


@dataclass
class GenerateOutput:
    """``sequences`` (B, L + N) like HF's (prompt with its padding, then the reply, rows that stopped early padded);
    ``codes`` one 1-D LongTensor per row (no bos/eos) or None; ``audio`` float32 arrays at 24 kHz or None;
    ``errors`` per row: None, or why that request failed (e.g. it cannot fit the KV cache) while the others
    finished."""

    sequences: torch.Tensor
    codes: list[torch.Tensor] | None
    audio: list[np.ndarray] | None
    errors: list[str | None] = field(default_factory=list)


@dataclass
class StreamEvent:
    """One piece of :meth:`OmniModel.stream`: new thinker ids and new 24 kHz samples (either may be empty), the
    timings so far and the batch row it belongs to. ``stage_times``: ms since the request at each stage (encoders,
    thinker_prefill, first_token, talker_prefill, first_audio, done) and the Token2Wav totals (token2wav_dit_ms,
    token2wav_vocoder_ms, token2wav_first_chunk_ms, token2wav_chunks). The last event of a row is empty, has
    ``finished`` set and carries the complete timings and the row's ``error`` (None unless it failed)."""

    text_ids: list[int]
    audio: np.ndarray
    stage_times: dict[str, float]
    row: int = 0
    finished: bool = False
    error: str | None = None


class _Caller:
    """One caller's requests: their outputs arrive in its queue from whichever thread steps the engine."""

    def __init__(self, engine: OmniEngine):
        self.engine = engine
        self.queue: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self.rows: dict[str, int] = {}
        self.open: set[str] = set()

    def add(self, row: int, prompt, options) -> str:
        request_id = self.engine.add_prompt(prompt, options, sink=self.queue.put)
        self.rows[request_id] = row
        self.open.add(request_id)
        return request_id

    def outputs(self) -> Iterator[tuple[int, RequestOutput]]:
        """(row, output) of this caller's requests until all are finished; steps the engine when nobody else does."""
        while self.open:
            try:
                out = self.queue.get_nowait()
            except queue.Empty:
                if not self._step():
                    try:
                        out = self.queue.get(timeout=POLL_SECONDS)
                    except queue.Empty:
                        continue
                else:
                    continue
            if out.finished:
                self.open.discard(out.request_id)
            yield self.rows[out.request_id], out

    def _step(self) -> bool:
        engine = self.engine
        if not engine.lock.acquire(blocking=False):
            return False
        try:
            if engine.has_unfinished_requests():
                engine.step()
            return True
        finally:
            engine.lock.release()

    def abort(self) -> None:
        for request_id in self.open:
            self.engine.abort_request(request_id)
        self.open.clear()


def _rows(model, kwargs: dict):
    inputs, options = split_kwargs(kwargs)
    cfg = model.config.thinker_config
    prompt = prepare_thinker_prompt(cfg, **inputs, use_audio_in_video=options.use_audio_in_video)
    return inputs, options, split_rows(cfg, prompt)


def generate(model, **kwargs) -> GenerateOutput:
    """``OmniModel.generate``: every row through the engine; Token2Wav runs once over all codes of a row (HF's
    non-streaming numbers). A row that cannot fit the cache fails alone (``errors``); a batch of one raises
    (:class:`~omni_model.engine.engine.RequestTooLarge`, a ValueError; a request that failed on the way: a
    RuntimeError with its error)."""
    inputs, options, rows = _rows(model, kwargs)
    options = dataclasses.replace(options, stream_audio=False)
    engine = model.engine
    caller = _Caller(engine)
    errors: list[str | None] = [None] * len(rows)
    tokens: list[list[int]] = [[] for _ in rows]
    audio: list[list[np.ndarray]] = [[] for _ in rows]
    codes: list[list[int]] = [[] for _ in rows]
    try:
        for i, prompt in enumerate(rows):
            try:
                caller.add(i, prompt, options)
            except RequestTooLarge as exc:  # this row alone; the others go on
                if len(rows) == 1:
                    raise
                errors[i] = str(exc)
        for row, out in caller.outputs():
            tokens[row] += out.text_ids
            codes[row] += out.codes
            if out.audio.size:
                audio[row].append(out.audio)
            if out.finished:
                errors[row] = out.error
    finally:
        caller.abort()
    if len(rows) == 1 and errors[0] is not None:
        raise RuntimeError(errors[0])
    ids = inputs["input_ids"]
    n = max((len(t) for t in tokens), default=0)
    pad = getattr(model.config.thinker_config.text_config, "pad_token_id", None)
    if pad is None:
        pad = min(engine.stop_ids, default=0)
    reply = torch.full((ids.shape[0], n), pad, dtype=torch.long)
    for i, t in enumerate(tokens):
        reply[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    sequences = torch.cat([ids.cpu().long(), reply], dim=1).to(ids.device)
    if not options.return_audio:
        return GenerateOutput(sequences, None, None, errors)
    waves = [np.concatenate(a) if a else np.zeros(0, dtype=np.float32) for a in audio]
    return GenerateOutput(sequences, [torch.tensor(c, dtype=torch.long) for c in codes], waves, errors)


def stream(model, **kwargs) -> Iterator[StreamEvent]:
    """``OmniModel.stream``: events of every row as the engine makes them. Closing the iterator early aborts the
    rows' requests (their blocks are free at once, or at the engine's next step). A batch of one raises its error
    after its last event."""
    _, options, rows = _rows(model, kwargs)
    caller = _Caller(model.engine)
    empty = np.zeros(0, dtype=np.float32)
    try:
        for i, prompt in enumerate(rows):
            caller.add(i, prompt, options)
        failed = None
        for row, out in caller.outputs():
            if out.text_ids or out.audio.size:
                yield StreamEvent(out.text_ids, out.audio, out.stage_times, row)
            if out.finished:
                yield StreamEvent([], empty, out.stage_times, row, finished=True, error=out.error)
                failed = failed or out.error
        if failed is not None and len(rows) == 1:
            raise RuntimeError(failed)
    finally:
        caller.abort()
