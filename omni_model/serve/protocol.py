"""The OpenAI chat-completions wire format, as pydantic models, and the error every failure becomes.

Requests follow OpenAI's audio chat format (``modalities``, ``audio: {voice, format}``, content parts ``text``,
``input_audio``, ``image_url`` and ``video_url``). Unknown fields are refused (a typo in an extension field is a 400
naming it, not a silently ignored option); the OpenAI fields this server accepts but has no use for are listed in
:class:`ChatCompletionRequest`. Extensions (the Talker's sampling and the like) are plain extra fields, which the
``openai`` client sends through ``extra_body``. ``docs/serving.md`` has the whole format.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """A failure that becomes an OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``.

    ``status`` is the HTTP status (400 bad request, 404 unknown model, 429 queue full, 503 draining, 500 a fault
    of the server). ``param`` names the request field at fault (``messages[0].content[1].input_audio.data``)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable"}


# ---------------------------------------------------------------------------------------------------- request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str  # base64 of the file's bytes
    format: Literal["wav", "mp3", "flac", "ogg"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class MediaURL(_Strict):
    url: str  # data:<mime>;base64,<data>, or a local path / file:// URL when the server allows one
    detail: str | None = None  # OpenAI's image detail hint; the model has one resolution rule, so it is unused


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[TextPart | AudioPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # An assistant turn that referred to earlier audio by id; this server keeps no audio, see app.py.
    audio: dict[str, Any] | None = None
    refusal: str | None = None


class AudioOptions(_Strict):
    voice: str
    format: Literal["wav", "pcm16"] = "wav"


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``. The Thinker's sampling: ``temperature`` (unset or 0: greedy), ``top_p``,
    ``top_k``, ``repetition_penalty``, ``max_tokens`` / ``max_completion_tokens``, ``seed``. The Talker's (voice)
    sampling, as extensions: ``talker_temperature`` (0: greedy), ``talker_top_k``, ``talker_top_p``,
    ``talker_repetition_penalty``, ``talker_max_tokens``; ``first_chunk_codes`` trades the first audio chunk's
    latency against its quality."""

    model: str
    messages: list[Message] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOptions | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: Literal[1] = 1
    # Extensions: the Thinker beyond OpenAI's fields, and the Talker (the voice).
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    talker_temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    talker_top_k: int | None = Field(default=None, ge=1)
    talker_top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    talker_repetition_penalty: float | None = Field(default=None, gt=0.0)
    talker_max_tokens: int | None = Field(default=None, ge=1)
    first_chunk_codes: int | None = Field(default=None, ge=1)
    # Accepted for compatibility with OpenAI clients, and unused.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @property
    def wants_audio(self) -> bool:
        return bool(self.modalities) and "audio" in self.modalities


# ---------------------------------------------------------------------------------------------------- response


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ResponseAudio(BaseModel):
    id: str
    data: str  # base64: a 24 kHz mono 16-bit WAV file ("wav") or the bare samples ("pcm16")
    expires_at: int
    transcript: str


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    audio: ResponseAudio | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None


class Timings(BaseModel):
    """The engine's times for one request, in ms since it arrived (an extension of ``usage``)."""

    ttft_ms: float | None = None
    ttfa_ms: float | None = None
    total_ms: float | None = None
    audio_seconds: float = 0.0
    rtf: float | None = None  # total_ms / 1000 / audio_seconds: below 1 is faster than real time


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    timings: Timings


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaAudio(BaseModel):
    id: str
    data: str | None = None  # base64 of PCM16 little-endian mono 24 kHz samples
    transcript: str | None = None  # the piece of text being spoken
    expires_at: int | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    audio: DeltaAudio | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------------- listings


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omni"
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Voice(BaseModel):
    id: str
    name: str


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Voice]
