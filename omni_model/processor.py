"""Input features without transformers: Whisper log-mel for audio and Qwen2-VL patches for images.

``omni run`` uses transformers' ``Qwen2_5OmniProcessor`` for real files (tokenizer, resizing, video
decoding); these functions serve the demo and any caller that already holds decoded media. Both are tested
equal to transformers 4.57.6 (WhisperFeatureExtractor, Qwen2VLImageProcessor without resize).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MAX_SAMPLES = 30 * SAMPLE_RATE  # the processor pads every clip to 30 s ("max_length")

# CLIP normalisation used by the Qwen2-VL image processor.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's mel scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    mel[log_region] = 15.0 + np.log(f[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f = 200.0 * m / 3.0
    log_region = m >= 15.0
    f[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (m[log_region] - 15.0))
    return f


@functools.cache
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_max: float = 8000.0) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) Slaney-normalised triangular filters on the Slaney mel scale (Whisper's)."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mel_edges = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([f_max]))[0], n_mels + 2)
    edges = _mel_to_hz(mel_edges)
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (edges[2:] - edges[:-2])[None, :]
    return torch.from_numpy(filters).float()


def log_mel_features(audios: list[np.ndarray], n_mels: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel of 16 kHz mono clips, padded to 30 s like the Omni processor.

    Returns input_features (B, n_mels, 3000) float32 and feature_attention_mask (B, 3000) int32.
    """
    if not audios:
        raise ValueError("audios must hold at least one clip")
    batch = torch.zeros(len(audios), MAX_SAMPLES, dtype=torch.float32)
    lengths = []
    for i, a in enumerate(audios):
        a = np.asarray(a, dtype=np.float32)
        if a.ndim != 1:
            raise ValueError(f"audios[{i}] must be 1-D mono samples, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"audios[{i}] is empty")
        a = a[:MAX_SAMPLES]
        batch[i, : a.size] = torch.from_numpy(a)
        lengths.append(a.size)
    window = torch.hann_window(N_FFT)
    stft = torch.stft(batch, N_FFT, HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(n_mels).T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
    frames = MAX_SAMPLES // HOP
    mask = torch.zeros(len(audios), frames, dtype=torch.int32)
    for i, n in enumerate(lengths):
        mask[i, : math.ceil(n / HOP)] = 1
    return log_spec, mask


def image_patches(
    images: list[np.ndarray], *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL patches of RGB uint8 images (H, W, 3) whose sides are multiples of patch * merge.

    Returns pixel_values (sum of t*h*w, 3 * tp * p * p) float32 and image_grid_thw (N, 3) int64. An image is
    ``temporal_patch_size`` identical frames. Resizing is the caller's (the demo makes images at the right
    size; ``omni run`` uses transformers' processor).
    """
    factor = patch_size * merge_size
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    rows, grids = [], []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"images[{i}] must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
        h, w = img.shape[:2]
        if h % factor or w % factor:
            raise ValueError(f"images[{i}] sides must be multiples of {factor}, got {h}x{w}")
        x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255.0 - mean) / std
        frames = x.unsqueeze(0).expand(temporal_patch_size, -1, -1, -1)
        gh, gw = h // patch_size, w // patch_size
        x = frames.reshape(1, temporal_patch_size, 3, gh // merge_size, merge_size, patch_size, gw // merge_size,
                           merge_size, patch_size)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.append(x.reshape(gh * gw, 3 * temporal_patch_size * patch_size * patch_size))
        grids.append((1, gh, gw))
    return torch.cat(rows), torch.tensor(grids, dtype=torch.int64)


def audio_token_count(feature_len: int) -> int:
    """Tokens the audio encoder emits for ``feature_len`` mel frames (25 per second)."""
    return ((feature_len - 1) // 2 + 1 - 2) // 2 + 1


def video_patches(
    videos: list[np.ndarray], *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL patches of RGB uint8 videos (T, H, W, 3) whose sides are multiples of patch * merge: each patch spans
    ``temporal_patch_size`` consecutive frames (a last odd frame is repeated, as the Qwen2-VL processor pads).

    Returns pixel_values_videos (sum of t*h*w, 3 * tp * p * p) float32 and video_grid_thw (N, 3) int64, in the layout
    of :func:`image_patches` (an image is a video of ``temporal_patch_size`` identical frames).
    """
    factor = patch_size * merge_size
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    rows, grids = [], []
    for i, video in enumerate(videos):
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[3] != 3 or video.dtype != np.uint8 or video.shape[0] == 0:
            raise ValueError(f"videos[{i}] must be (T, H, W, 3) uint8 with T >= 1, got {video.shape} {video.dtype}")
        t, h, w = video.shape[:3]
        if h % factor or w % factor:
            raise ValueError(f"videos[{i}] sides must be multiples of {factor}, got {h}x{w}")
        x = (torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        if t % temporal_patch_size:
            x = torch.cat([x, x[-1:].expand(temporal_patch_size - t % temporal_patch_size, -1, -1, -1)])
        gt, gh, gw = x.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
        x = x.reshape(gt, temporal_patch_size, 3, gh // merge_size, merge_size, patch_size, gw // merge_size,
                      merge_size, patch_size)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.append(x.reshape(gt * gh * gw, 3 * temporal_patch_size * patch_size * patch_size))
        grids.append((gt, gh, gw))
    return torch.cat(rows), torch.tensor(grids, dtype=torch.int64)
