"""Media of a chat request, decoded: base64 audio files, ``data:`` URLs, and local files where allowed.

Every failure is an :class:`~omni_model.serve.protocol.APIError` (HTTP 400) whose ``param`` names the part of the
request at fault. Nothing is fetched over the network: a remote ``http(s)://`` URL is refused with a message that
says to send a ``data:`` URL instead (the server may run where it must not reach the internet).

* Audio: WAV, MP3, FLAC or Ogg through libsndfile (the ``soundfile`` package), mixed to mono and resampled to the
  16 kHz the audio encoder reads. At most 30 s per clip: the feature extractor of Qwen2.5-Omni covers 30 s and would
  otherwise cut the rest off without a word.
* Images: anything Pillow reads, refused above ``max_image_pixels`` before it is decoded (the size is in the file
  header), converted to RGB and resized the way Qwen2-VL's image processor resizes (:func:`smart_resize`).
* Videos: any container and codec FFmpeg reads (through PyAV), frames sampled at 2 per second as Qwen2.5-Omni's
  own preprocessing (qwen-omni-utils) samples them, an even count from 4 to 768, each resized by
  :func:`smart_resize` within a per-frame budget that shrinks as the frames grow in number. The audio track is not
  used (``use_audio_in_video`` is not offered). At most ten minutes per video.
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

from omni_model.processor import HOP
from omni_model.processor import SAMPLE_RATE as AUDIO_RATE  # the audio encoder's input rate (Whisper features)
from omni_model.serve.protocol import APIError

MAX_AUDIO_SECONDS = 30.0
MAX_VIDEO_SECONDS = 600.0
# Video sampling of qwen-omni-utils (Qwen's preprocessing for Qwen2.5-Omni): 2 frames a second, an even number of
# frames (the vision encoder's temporal patch) from 4 to 768, and at most about 90% of 128000 * 28 * 28 pixels over
# all frames of a video.
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES, VIDEO_MAX_FRAMES = 4, 768
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


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
    if mono.size < 3 * HOP:  # fewer than 3 mel frames give no audio token at all
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


# ---------------------------------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class VideoRule:
    """The checkpoint's video-processor settings (``video_preprocessor_config.json``); per-frame pixel bounds
    default to those of transformers' Qwen2.5-Omni processor (128 and 768 tokens of 28 x 28 pixels)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28


def sample_indices(total_frames: int, video_fps: float) -> list[int]:
    """Frame indices at about :data:`VIDEO_FPS` per second: an even count in [4, 768] (at most the frames there
    are, rounded down to even, when that is 2 or more), spread evenly from the first frame to the last."""
    factor = 2
    wanted = round(total_frames / video_fps * VIDEO_FPS / factor) * factor
    upper = max(factor, min(VIDEO_MAX_FRAMES, total_frames) // factor * factor)
    n = min(max(wanted, VIDEO_MIN_FRAMES), upper)
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def decode_video(raw: bytes, rule: VideoRule, *, param: str, policy: MediaPolicy) -> tuple[np.ndarray, float]:
    """(frames (T, H, W, 3) uint8 resized for the vision encoder, seconds per temporal patch of the sampled
    frames)."""
    try:
        import av
    except ImportError as exc:
        raise APIError(f"{param}: this server cannot decode video (install PyAV: pip install av)", param=param,
                       code="unsupported_content") from exc
    from PIL import Image

    try:
        total, rate = _count_frames(av, raw, param=param, policy=policy)
        if total / rate > MAX_VIDEO_SECONDS:
            raise APIError(f"{param}: the video is {total / rate:.0f} s long; at most {MAX_VIDEO_SECONDS:.0f} s are "
                           "accepted", param=param, code="video_too_long")
        idx = sample_indices(total, rate)
        wanted = set(idx)
        kept: dict[int, np.ndarray] = {}
        with av.open(io.BytesIO(raw)) as container:  # second pass: only the sampled frames are converted and kept
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
    except APIError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise APIError(f"{param}: the data is not a video FFmpeg can read ({exc})", param=param,
                       code="invalid_video") from exc
    if not kept:
        raise APIError(f"{param}: the video holds no frames", param=param, code="empty_media")
    last = kept[max(kept)]
    frames = [kept.get(i, last) for i in idx]  # a stream shorter than its header said repeats its last frame
    sampled_fps = len(idx) / total * rate
    h, w = frames[0].shape[:2]
    budget = max(min(rule.max_pixels, VIDEO_TOTAL_PIXELS / len(idx) * rule.temporal_patch_size),
                 int(rule.min_pixels * 1.05))
    try:
        th, tw = smart_resize(h, w, factor=rule.patch_size * rule.merge_size, min_pixels=rule.min_pixels,
                              max_pixels=int(budget))
    except ValueError as exc:
        raise APIError(f"{param}: the video could not be used ({exc})", param=param, code="invalid_video") from exc
    out = np.stack([np.array(Image.fromarray(f).resize((tw, th), resample=Image.Resampling.BICUBIC))
                    if (th, tw) != (h, w) else f for f in frames])
    return out, rule.temporal_patch_size / sampled_fps


def _count_frames(av, raw: bytes, *, param: str, policy: MediaPolicy) -> tuple[int, float]:
    """(frames, frames per second) of the first video stream, checking the frame size first. Frames are counted as
    the stream's packets (one frame each; nothing is decoded), since container headers may omit the count."""
    with av.open(io.BytesIO(raw)) as container:
        if not container.streams.video:
            raise APIError(f"{param}: the file has no video stream", param=param, code="invalid_video")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > policy.max_image_pixels:
            raise APIError(f"{param}: the video is {w}x{h} = {w * h} pixels a frame, above the server's limit of "
                           f"{policy.max_image_pixels}", param=param, code="image_too_large")
        rate = float(stream.average_rate or stream.guessed_rate or 0.0) or VIDEO_FPS
        total = sum(1 for _ in container.demux(stream) if _.size)  # packets of frame data: one frame each
    if total == 0:
        raise APIError(f"{param}: the video holds no frames", param=param, code="empty_media")
    return total, rate
