"""Media of a chat request, decoded: base64 audio files, ``data:`` URLs, and local files where allowed.

Every failure is an :class:`~omni_model.serve.protocol.APIError` (HTTP 400) whose ``param`` names the part of the
request at fault. Nothing is fetched over the network: a remote ``http(s)://`` URL is refused with a message that
says to send a ``data:`` URL instead (the server may run where it must not reach the internet).

* Audio: WAV, MP3, FLAC or Ogg through libsndfile (the ``soundfile`` package), mixed to mono and resampled to the
  16 kHz the audio encoder reads. At most 30 s per clip: the feature extractor of Qwen2.5-Omni covers 30 s and would
  otherwise cut the rest off without a word.
* Images: anything Pillow reads, refused above ``max_image_pixels`` before it is decoded (the size is in the file
  header), converted to RGB and resized the way Qwen2-VL's image processor resizes (:func:`smart_resize`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni_model.serve.protocol import APIError

AUDIO_RATE = 16000  # the audio encoder's input rate (Whisper features)
MAX_AUDIO_SECONDS = 30.0


def decode_base64(data: str, *, param: str) -> bytes:
    """Strict base64 (standard alphabet, padding required); whitespace between lines is tolerated."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(f"{param} is not valid base64 ({exc})", param=param, code="invalid_base64") from exc
    if not raw:
        raise APIError(f"{param} is empty", param=param, code="empty_media")
    return raw


# ---------------------------------------------------------------------------------------------------- audio


def decode_audio(raw: bytes, fmt: str, *, param: str) -> np.ndarray:
    """Mono float32 samples at 16 kHz from the bytes of a ``fmt`` file (wav, mp3, flac, ogg)."""
    import soundfile as sf

    from omni_model.demo import resample

    try:
        # libsndfile reads the container from the bytes themselves; ``fmt`` only names it in errors.
        samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise APIError(f"{param}: the data could not be decoded as {fmt} audio ({exc})", param=param,
                       code="invalid_audio") from exc
    if samples.size == 0:
        raise APIError(f"{param}: the audio holds no samples", param=param, code="empty_media")
    if samples.shape[0] / rate > MAX_AUDIO_SECONDS:
        raise APIError(f"{param}: the audio is {samples.shape[0] / rate:.1f} s long; at most "
                       f"{MAX_AUDIO_SECONDS:.0f} s per clip are accepted (split it into several input_audio parts)",
                       param=param, code="audio_too_long")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise APIError(f"{param}: the audio holds NaN or infinite samples", param=param, code="invalid_audio")
    if rate != AUDIO_RATE:
        mono = resample(mono, rate, AUDIO_RATE)
    if mono.size < 3 * 160:  # fewer than 3 mel frames give no audio token at all
        raise APIError(f"{param}: the audio is too short ({mono.size / AUDIO_RATE * 1000:.0f} ms)", param=param,
                       code="empty_media")
    return mono.astype(np.float32)


# ---------------------------------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class MediaPolicy:
    """What a media URL may point at: ``data:`` URLs always; local files only under ``local_root`` when set."""

    local_root: Path | None = None
    max_image_pixels: int = 7680 * 4320  # 8K UHD: larger images are refused before decoding


def read_url(url: str, *, param: str, kind: str, policy: MediaPolicy) -> bytes:
    """The bytes behind an image or video URL: ``data:<mime>;base64,...``, or (when allowed) a local path or
    ``file://`` URL under ``policy.local_root``."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(f"{param} must be a data URL of the form data:{kind}/<type>;base64,<data>", param=param,
                           code="invalid_url")
        mime = header[len("data:"):-len(";base64")]
        if mime and not mime.startswith(f"{kind}/") and mime != "application/octet-stream":
            raise APIError(f"{param} holds {mime!r}, not {kind} data", param=param, code="invalid_url")
        return decode_base64(payload, param=param)
    if url.startswith(("http://", "https://")):
        raise APIError(f"{param}: this server does not fetch remote URLs; send the {kind} inline as a "
                       f"data:{kind}/...;base64 URL", param=param, code="invalid_url")
    path = url.removeprefix("file://")
    if policy.local_root is None:
        raise APIError(f"{param} must be a data: URL (local paths are allowed only when the server is started with "
                       "--allowed-local-media-path)", param=param, code="invalid_url")
    resolved = Path(os.path.realpath(path))
    root = Path(os.path.realpath(policy.local_root))
    if not resolved.is_relative_to(root):
        raise APIError(f"{param}: {path} is outside the allowed media folder", param=param, code="invalid_url")
    if not resolved.is_file():
        raise APIError(f"{param}: no such file: {path}", param=param, code="invalid_url")
    raw = resolved.read_bytes()
    if not raw:
        raise APIError(f"{param}: {path} is empty", param=param, code="empty_media")
    return raw


# ---------------------------------------------------------------------------------------------------- images


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of ``factor`` (patch x merge), the area inside
    [min_pixels, max_pixels], the aspect ratio kept as closely as the rounding allows. Aspect ratios beyond 200
    are refused (the model was not trained on them)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"the aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


@dataclass(frozen=True)
class ImageRule:
    """The checkpoint's image-processor settings (``preprocessor_config.json``)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280


def decode_image(raw: bytes, rule: ImageRule, *, param: str, policy: MediaPolicy) -> np.ndarray:
    """(H, W, 3) uint8, resized by :func:`smart_resize` with bicubic filtering (as transformers' Qwen2-VL image
    processor does through Pillow)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise APIError(f"{param}: the data is not an image Pillow can read ({exc})", param=param,
                       code="invalid_image") from exc
    w, h = img.size
    if w * h > policy.max_image_pixels:
        raise APIError(f"{param}: the image is {w}x{h} = {w * h} pixels, above the server's limit of "
                       f"{policy.max_image_pixels}", param=param, code="image_too_large")
    try:
        rgb = img.convert("RGB")
        th, tw = smart_resize(h, w, factor=rule.patch_size * rule.merge_size, min_pixels=rule.min_pixels,
                              max_pixels=rule.max_pixels)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise APIError(f"{param}: the image could not be used ({exc})", param=param, code="invalid_image") from exc
    if (th, tw) != (h, w):
        rgb = rgb.resize((tw, th), resample=Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy of it follows)
