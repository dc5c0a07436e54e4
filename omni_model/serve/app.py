"""The FastAPI app of ``omni serve``: one handler per endpoint, one exception handler for every error.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/audio/voices``, ``GET /health``,
``GET /metrics``. A chat request goes: admission (429 at once when full) -> media decoding and prompt building (in
a worker thread) -> ``AsyncEngine.add`` (the engine checks the inputs; its ValueError is a 400) -> the request's
outputs, either collected into one ``chat.completion`` or sent as server-sent events as they come. A client that
goes away aborts its request. ``docs/serving.md`` describes the wire format and the errors.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni_model.config import SAMPLE_RATE
from omni_model.demo import SYSTEM_PROMPT
from omni_model.serve.async_engine import AsyncEngine, QueueFull, RequestStream
from omni_model.serve.media import MediaPolicy, decode_audio, decode_base64, decode_image, decode_video, read_url
from omni_model.serve.metrics import ServerMetrics
from omni_model.serve.prompt import IncrementalDetokenizer, PromptBuilder, Turn
from omni_model.serve.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Delta,
    DeltaAudio,
    Message,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseAudio,
    ResponseMessage,
    Timings,
    Usage,
    Voice,
    VoiceList,
    new_id,
)

log = logging.getLogger("omni.serve")

AUDIO_EXPIRY_S = 3600  # OpenAI's field; this server keeps no audio, so nothing ever refers back to it


@dataclass
class ServerContext:
    """Everything the handlers need: the engine front, the prompt builder and the served model's facts."""

    model_name: str
    engine: AsyncEngine
    builder: PromptBuilder
    metrics: ServerMetrics
    speakers: list[str]
    audio_output: bool = True
    policy: MediaPolicy = field(default_factory=MediaPolicy)
    retry_after_s: int = 1
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False


# ---------------------------------------------------------------------------------------------------- errors


def _param(loc: tuple) -> str | None:
    """A pydantic error location as a request path: ``messages[0].content[1].input_audio.format``. Union member
    labels (``str``, ``list[...]``) and the tag of a tagged union (the part's ``type``, repeated as its field name)
    are dropped."""
    out: list[str] = []
    for item in loc:
        if item == "body":
            continue
        if isinstance(item, int):
            if out:
                out[-1] += f"[{item}]"
            continue
        if "[" in item or item in ("str", "int", "float", "bool", "none") or (out and out[-1] == item):
            continue
        out.append(item)
    return ".".join(out) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError("the request body is not valid JSON", code="invalid_json")
    # A field of a union (content: str | list) reports one error per member: the deepest is the relevant one.
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _param(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    code = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}.get(
        kind, "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    return APIError(f"{param or 'body'}: {err.get('msg', 'invalid')}", param=param, code=code)


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: every failure becomes an OpenAI error body."""
    if isinstance(exc, RequestValidationError):
        exc = _validation_error(exc)
    elif isinstance(exc, StarletteHTTPException):
        exc = APIError(str(exc.detail), status=exc.status_code, code=None)
    elif not isinstance(exc, APIError):
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        exc = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, code="internal_error")
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ---------------------------------------------------------------------------------------------------- requests


def _turns(messages: list[Message], ctx: ServerContext) -> list[Turn]:
    """Messages -> turns with decoded media (runs in a worker thread: decoding is CPU work)."""
    turns = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        where = f"messages[{i}]"
        if msg.content is None:
            if role == "assistant" and msg.audio is not None:
                raise APIError(f"{where}.audio: this server keeps no audio to refer to; send the earlier reply's "
                               "transcript as the assistant message's content", param=f"{where}.audio",
                               code="unsupported_content")
            if role != "assistant":
                raise APIError(f"{where}.content is required for a {msg.role} message", param=f"{where}.content",
                               code="missing_required_parameter")
            turns.append(Turn(role, [("text", "")]))
            continue
        if isinstance(msg.content, str):
            turns.append(Turn(role, [("text", msg.content)]))
            continue
        parts = []
        for j, part in enumerate(msg.content):
            p = f"{where}.content[{j}]"
            if part.type != "text" and role != "user":
                raise APIError(f"{p}: {msg.role} messages hold text only; media go in user messages", param=p,
                               code="unsupported_content")
            if part.type == "text":
                parts.append(("text", part.text))
            elif part.type == "input_audio":
                raw = decode_base64(part.input_audio.data, param=f"{p}.input_audio.data")
                parts.append(("audio", decode_audio(raw, part.input_audio.format, param=f"{p}.input_audio.data")))
            elif part.type == "image_url":
                url = f"{p}.image_url.url"
                raw = read_url(part.image_url.url, param=url, kind="image", policy=ctx.policy)
                parts.append(("image", decode_image(raw, ctx.builder.image_rule, param=url, policy=ctx.policy)))
            else:
                url = f"{p}.video_url.url"
                raw = read_url(part.video_url.url, param=url, kind="video", policy=ctx.policy)
                parts.append(("video", decode_video(raw, ctx.builder.video_rule, param=url, policy=ctx.policy)))
        turns.append(Turn(role, parts))
    return turns


# Engine option -> the request field it comes from (to name the field in an error the engine raises).
_FIELD_OF_OPTION = {
    "speaker": "audio.voice", "thinker_max_new_tokens": "max_tokens", "thinker_temperature": "temperature",
    "thinker_top_p": "top_p", "thinker_top_k": "top_k", "thinker_repetition_penalty": "repetition_penalty",
    "talker_temperature": "talker_temperature", "talker_top_k": "talker_top_k", "talker_top_p": "talker_top_p",
    "talker_repetition_penalty": "talker_repetition_penalty", "talker_max_new_tokens": "talker_max_tokens",
    "first_chunk_codes": "first_chunk_codes", "seed": "seed",
}


def _options(req: ChatCompletionRequest, voice: str | None) -> dict:
    """The engine's keyword options for a request (unset fields keep the engine's defaults)."""
    opts: dict = {"return_audio": voice is not None}
    if voice is not None:
        opts["speaker"] = voice
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None:
        opts["thinker_max_new_tokens"] = max_tokens
    if req.temperature is not None:
        opts["thinker_do_sample"] = req.temperature > 0
        if req.temperature > 0:
            opts["thinker_temperature"] = req.temperature
    for name, value in (("thinker_top_p", req.top_p), ("thinker_top_k", req.top_k),
                        ("thinker_repetition_penalty", req.repetition_penalty), ("seed", req.seed)):
        if value is not None:
            opts[name] = value
    if voice is not None:
        if req.talker_temperature is not None:
            opts["talker_do_sample"] = req.talker_temperature > 0
            if req.talker_temperature > 0:
                opts["talker_temperature"] = req.talker_temperature
        for name, value in (("talker_top_k", req.talker_top_k), ("talker_top_p", req.talker_top_p),
                            ("talker_repetition_penalty", req.talker_repetition_penalty),
                            ("talker_max_new_tokens", req.talker_max_tokens),
                            ("first_chunk_codes", req.first_chunk_codes)):
            if value is not None:
                opts[name] = value
    return opts


def _engine_error(exc: ValueError, options: dict) -> APIError:
    """The engine's ValueError from add_request as a 400 naming the request field (the prompt when it names no
    option: media, ids and lengths all come from ``messages``)."""
    raw = str(exc)
    # The engine names its own options; the client knows the request's fields (thinker_max_new_tokens: max_tokens).
    msg = re.sub(r"\b(thinker|talker)_\w+|\bfirst_chunk_codes\b",
                 lambda m: _FIELD_OF_OPTION.get(m.group(0), m.group(0)), raw)
    for option, name in _FIELD_OF_OPTION.items():
        if option in options and option in raw:
            return APIError(f"{name}: {msg}", param=name, code="invalid_value")
    too_long = any(w in msg for w in ("max_position_embeddings", "context", "KV cache", "cache"))
    return APIError(f"messages: {msg}", param="messages",
                    code="context_length_exceeded" if too_long else "invalid_prompt")


async def _watch_disconnect(request: Request, on_disconnect) -> None:
    """Calls ``on_disconnect`` when the client closes the connection (the body has been read: the next ASGI
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM (what ``omni run`` writes to its WAV files)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16(samples))
    return buf.getvalue()


def _usage(last, completion_tokens: int, audio_samples: int) -> Usage:
    times = last.stage_times or {}
    seconds = audio_samples / SAMPLE_RATE
    total = times.get("done")
    timings = Timings(ttft_ms=times.get("first_token"), ttfa_ms=times.get("first_audio"), total_ms=total,
                      audio_seconds=seconds, rtf=total / 1000.0 / seconds if seconds and total is not None else None)
    return Usage(prompt_tokens=last.num_prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=last.num_prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=last.num_cached_tokens), timings=timings)


def _failure(last) -> APIError:
    return APIError(f"the request failed in the engine: {last.error}", status=500, code="engine_error")


class _EventStream(StreamingResponse):
    """A streaming response that always closes its generator (so the request is aborted at once when the send
    fails because the client went away, not whenever the generator is collected)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream_events(ctx: ServerContext, req: ChatCompletionRequest, rid: str, stream: RequestStream,
                         voice: str | None, request: Request) -> AsyncIterator[str]:
    created = int(time.time())
    audio_id = new_id("audio")
    detok = IncrementalDetokenizer(ctx.builder.decode)
    watcher = asyncio.create_task(_watch_disconnect(request, lambda: ctx.engine.abort(rid)))

    def chunk(delta: Delta, finish_reason: str | None = None, usage: Usage | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name,
                "choices": [{"index": 0, "delta": delta.model_dump(exclude_none=True), "finish_reason": finish_reason}]}
        if usage is not None:
            body["usage"] = usage.model_dump()
        return _sse(body)

    def text_delta(piece: str) -> Delta:
        return Delta(content=piece, audio=DeltaAudio(id=audio_id, transcript=piece) if voice else None)

    try:
        yield chunk(Delta(role="assistant", content=""))
        samples = 0
        async for out in stream:
            piece = detok.add(list(out.text_ids))
            if piece:
                yield chunk(text_delta(piece))
            if voice and out.audio is not None and out.audio.size:
                samples += int(out.audio.size)
                data = base64.b64encode(pcm16(out.audio)).decode("ascii")
                yield chunk(Delta(audio=DeltaAudio(id=audio_id, data=data, expires_at=created + AUDIO_EXPIRY_S)))
            if not out.finished:
                continue
            tail = detok.flush()
            if tail:
                yield chunk(text_delta(tail))
            if out.finish_reason == "abort":
                return  # the client is gone (or the server stopped): nobody reads the rest
            if out.error:
                yield _sse(_failure(out).body())
            else:
                usage = _usage(out, len(detok.ids), samples)
                yield chunk(Delta(), finish_reason=out.finish_reason or "stop", usage=usage)
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": ctx.model_name, "choices": [], "usage": usage.model_dump()})
            yield _sse("[DONE]")
    finally:
        watcher.cancel()
        if not stream.finished:
            ctx.engine.abort(rid)


async def _collect(ctx: ServerContext, rid: str, stream: RequestStream, voice: str | None, audio_format: str,
                   request: Request) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, lambda: ctx.engine.abort(rid)))
    ids: list[int] = []
    audio: list[np.ndarray] = []
    last = None
    try:
        async for out in stream:
            ids.extend(out.text_ids)
            if out.audio is not None and out.audio.size:
                audio.append(np.asarray(out.audio, dtype=np.float32))
            last = out
    finally:
        watcher.cancel()
        if not stream.finished:
            ctx.engine.abort(rid)
    if last.error and last.finish_reason != "abort":
        raise _failure(last)
    text = ctx.builder.decode(ids)
    samples = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    usage = _usage(last, len(ids), samples.size)
    message = ResponseMessage(content=text)
    if voice is not None:
        data = wav_bytes(samples) if audio_format == "wav" else pcm16(samples)
        message.audio = ResponseAudio(id=new_id("audio"), data=base64.b64encode(data).decode("ascii"),
                                      expires_at=int(time.time()) + AUDIO_EXPIRY_S, transcript=text)
    body = ChatCompletion(id=rid, model=ctx.model_name, usage=usage,
                          choices=[Choice(message=message, finish_reason=last.finish_reason or "stop")])
    headers = {f"x-omni-{k.replace('_', '-')}": f"{v:.1f}" for k, v in
               (("ttft_ms", usage.timings.ttft_ms), ("ttfa_ms", usage.timings.ttfa_ms)) if v is not None}
    return JSONResponse(body.model_dump(exclude_none=True), headers=headers)


# ---------------------------------------------------------------------------------------------------- the app


def build_app(ctx: ServerContext) -> FastAPI:
    """The app for one served model; the engine thread starts and stops with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not ctx.engine.alive:
            ctx.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(ctx.engine.stop)

    app = FastAPI(title="omni serve", lifespan=lifespan)
    for kind in (APIError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _error_response)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "draining" if ctx.draining else ("ok" if ctx.engine.alive else "engine_stopped")
        body = {"status": status, "model": ctx.model_name, "in_flight": ctx.engine.num_in_flight,
                "engine_steps": ctx.engine.steps, "engine_step_failures": ctx.engine.step_failures,
                "engine": ctx.engine.stats()}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=ctx.model_name, created=ctx.created, root=ctx.model_name)])

    @app.get("/v1/audio/voices")
    async def voices() -> VoiceList:
        return VoiceList(data=[Voice(id=name, name=name) for name in ctx.speakers])

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        if ctx.draining:
            raise APIError("the server is shutting down", status=503, code="shutting_down")
        if req.model != ctx.model_name:
            raise APIError(f"The model `{req.model}` does not exist; this server serves `{ctx.model_name}`",
                           status=404, param="model", code="model_not_found")
        voice = None
        if req.wants_audio:
            if not ctx.audio_output:
                raise APIError("this server was started with --no-audio: it answers in text only",
                               param="modalities", code="unsupported_modality")
            voice = req.audio.voice if req.audio is not None else ctx.speakers[0]
            if voice not in ctx.speakers:
                raise APIError(f"unknown voice {voice!r}; the voices are {', '.join(ctx.speakers)}",
                               param="audio.voice", code="invalid_voice")
        if ctx.engine.num_in_flight >= ctx.engine.capacity:  # before any decoding: refuse at once
            raise _queue_full(ctx)
        turns = await asyncio.to_thread(_turns, req.messages, ctx)
        system = SYSTEM_PROMPT if voice is not None else None
        inputs = await asyncio.to_thread(ctx.builder.build, turns, system_prompt=system)
        options = _options(req, voice)
        rid = new_id("chatcmpl")
        try:
            stream = await ctx.engine.add(rid, inputs, options)
        except QueueFull as exc:
            raise _queue_full(ctx) from exc
        except ValueError as exc:
            raise _engine_error(exc, options) from exc
        if req.stream:
            return _EventStream(_stream_events(ctx, req, rid, stream, voice, request), media_type="text/event-stream",
                                headers={"cache-control": "no-cache", "x-request-id": rid})
        # A stream always carries PCM16 (as OpenAI streams audio); a whole reply carries audio.format.
        return await _collect(ctx, rid, stream, voice, req.audio.format if req.audio is not None else "wav", request)

    return app


def _queue_full(ctx: ServerContext) -> APIError:
    return APIError(f"the server is at its limit of {ctx.engine.capacity} requests in flight; retry later",
                    status=429, code="queue_full", headers={"Retry-After": str(ctx.retry_after_s)})

