"""window_attention: block-diagonal attention of the vision and audio encoders (TFLOP/s of the needed work).

Shapes (docs/model.md), bf16 on CUDA:
* image: a 1280x720 picture as Qwen2.5-VL's processor resizes it (multiples of 28: 1288x728, patch 14 -> a 52x92
  patch grid, 4784 patches, one temporal slice); window layers: 112 px windows (4x4 merged tokens = up to 64
  patches; 7 x 12 windows, the last row and column smaller), full layers: the whole slice; 16 heads x 80.
* video: a 2 s chunk, 4 frames at 2 fps of 448x252 (already multiples of 28: 18x32 patches per frame, temporal
  patch 2 -> 2 slices of 576 patches); window layers: 2 x 12 windows (64 and 16 patches), full layers: 2 segments.
* audio: 30 s (3000 mel frames -> 1500 encoder frames) in 2 s chunks of 100 frames; 20 heads x 64.
Work: 4 * sum(len_i ** 2) * D * H flops (QK^T and PV over the pairs inside segments only).

Providers: torch (the reference: a loop over segments, fp32 math), torch.compile (the reference's per-segment math
compiled with dynamic shapes, in the same loop; CUDA only), hf-sdpa-loop (HF 4.57.6's non-flash path: split by
cu_seqlens on the host, one SDPA call per segment, cat; the baseline), sdpa-dense-mask (one SDPA call with a (T, T)
block-diagonal boolean mask), flex (FlexAttention with a document mask, compiled; CUDA only), triton, cuda. The
dense mask and the BlockMask are built once per shape, outside the timed region (an encoder reuses them over its
layers); triton and cuda get max_seqlen, so they launch without a host sync, as the encoders call them.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_kernels import window_attention, window_attention_ref
from omni_kernels.testing import Record, bench_main
from omni_kernels.window_attention import _segment_attention

BENCH = "window_attention"
BASELINE = "hf-sdpa-loop"
PATCH, MERGE, WINDOW_PX, TEMPORAL_PATCH = 14, 2, 112, 2
VISION_HEADS, VISION_HEAD_DIM = 16, 80
AUDIO_HEADS, AUDIO_HEAD_DIM, AUDIO_CHUNK = 20, 64, 100  # encoder frames per 2 s chunk (25 tokens/s after pooling)


def smart_resize(height: int, width: int, factor: int = PATCH * MERGE, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2.5-VL's processor rule: the nearest multiples of 28, scaled into [min_pixels, max_pixels]."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def vision_grid(height: int, width: int, frames: int = 1) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of ``frames`` frames of height x width, as the processor resizes and patches them
    (also used by bench_vision_encoder, so both benches run the same inputs)."""
    h, w = smart_resize(height, width)
    return max(1, frames // TEMPORAL_PATCH), h // PATCH, w // PATCH


def vision_segments(height: int, width: int, frames: int = 1) -> tuple[list[int], list[int]]:
    """(window layer segments, full layer segments) in patches for ``frames`` frames of height x width."""
    grid_t, grid_h, grid_w = vision_grid(height, width, frames)
    mh, mw, win = grid_h // MERGE, grid_w // MERGE, WINDOW_PX // PATCH // MERGE
    windows = [min(win, mh - r) * min(win, mw - c) * MERGE * MERGE for r in range(0, mh, win)
               for c in range(0, mw, win)]
    return windows * grid_t, [grid_h * grid_w] * grid_t


def audio_segments(seconds: float) -> list[int]:
    frames = int(seconds * 100) // 2  # 100 mel frames per second, conv stride 2
    return [AUDIO_CHUNK] * (frames // AUDIO_CHUNK) + ([frames % AUDIO_CHUNK] if frames % AUDIO_CHUNK else [])


def shapes(quick: bool) -> list[tuple[str, list[int], int, int]]:
    """(name, segment lengths, heads, head dim)."""
    if quick:
        image = vision_segments(224, 224)
        return [("image-224 windows", image[0], VISION_HEADS, VISION_HEAD_DIM),
                ("image-224 full", image[1], VISION_HEADS, VISION_HEAD_DIM),
                ("audio-4s chunks", audio_segments(4), AUDIO_HEADS, AUDIO_HEAD_DIM)]
    image, video = vision_segments(720, 1280), vision_segments(252, 448, frames=4)
    return [("image-1280x720 windows", image[0], VISION_HEADS, VISION_HEAD_DIM),
            ("image-1280x720 full", image[1], VISION_HEADS, VISION_HEAD_DIM),
            ("video-2s-448x252 windows", video[0], VISION_HEADS, VISION_HEAD_DIM),
            ("video-2s-448x252 full", video[1], VISION_HEADS, VISION_HEAD_DIM),
            ("audio-30s chunks", audio_segments(30), AUDIO_HEADS, AUDIO_HEAD_DIM)]


def providers(dev: torch.device) -> list[str]:
    cuda = dev.type == "cuda"
    return ["torch", *(["torch.compile"] if cuda else []), BASELINE, "sdpa-dense-mask", *(["flex"] if cuda else []),
            *compiled_backends(BENCH, dev)]


def _providers(dev, q, k, v, cu, max_seqlen, compiled_segment) -> dict:
    num_tokens, num_heads, head_dim = q.shape
    scale = head_dim**-0.5
    heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, H, T, D), HF's layout

    def compiled_loop():
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            seg = (t[start:end].float() for t in (q, k, v))
            out[start:end] = compiled_segment(*seg, scale).to(q.dtype)
        return out

    def hf_loop():
        lengths = (cu[1:] - cu[:-1]).tolist()
        splits = [torch.split(t, lengths, dim=2) for t in heads_first]
        outs = [F.scaled_dot_product_attention(a, b, c, scale=scale).transpose(1, 2).contiguous()
                for a, b, c in zip(*splits)]
        return torch.cat(outs, dim=1).reshape(num_tokens, num_heads, head_dim)

    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=dev), cu.diff())
    dense_mask = seg[:, None] == seg[None, :]

    def dense():
        return F.scaled_dot_product_attention(*heads_first, attn_mask=dense_mask, scale=scale)[0].transpose(0, 1)

    providers = {"torch": lambda: window_attention_ref(q, k, v, cu)}
    if dev.type == "cuda":
        providers["torch.compile"] = compiled_loop
    providers[BASELINE] = hf_loop
    providers["sdpa-dense-mask"] = dense
    if dev.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def same_segment(b, h, q_idx, kv_idx):
            return seg[q_idx] == seg[kv_idx]

        block_mask = create_block_mask(same_segment, B=None, H=None, Q_LEN=num_tokens, KV_LEN=num_tokens, device=dev)
        flex = torch.compile(flex_attention)
        providers["flex"] = lambda: flex(*heads_first, block_mask=block_mask, scale=scale)[0].transpose(0, 1)
    for backend in compiled_backends(BENCH, dev):
        providers[backend] = lambda b=backend: window_attention(q, k, v, cu, max_seqlen=max_seqlen, backend=b)
    return providers


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per shape. The vision and audio encoders are the same in the 7B and 3B checkpoints: the preset
    changes nothing here."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    compiled_segment = torch.compile(_segment_attention, dynamic=True) if dev.type == "cuda" else None

    def build(lengths, num_heads, head_dim, label) -> list[Case]:
        num_tokens = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        qkv = torch.randn(num_tokens, 3, num_heads, head_dim, device=dev, dtype=dtype)
        q, k, v = qkv.unbind(1)  # views into a fused QKV output, as in the encoders
        flops = 4 * sum(n * n for n in lengths) * head_dim * num_heads
        # catch: a peer that cannot run this shape is recorded, not hidden.
        return [Case(BENCH, provider, label, dtype, fn, flops=flops, baseline=BASELINE, rep=10 if quick else 100,
                     catch=True, error_chars=300)
                for provider, fn in _providers(dev, q, k, v, cu, max(lengths), compiled_segment).items()]

    groups = []
    for name, lengths, num_heads, head_dim in shapes(quick):
        label = f"{name} T={sum(lengths)} segments={len(lengths)} max={max(lengths)} H={num_heads} D={head_dim}"
        groups.append(CaseGroup(keys(BENCH, providers(dev), label, dtype),
                                partial(build, lengths, num_heads, head_dim, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
