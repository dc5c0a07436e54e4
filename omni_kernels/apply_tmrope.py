"""apply_tmrope: rotate queries and keys in place by TMRoPE, Qwen2.5-Omni's 3-D rotary position embedding.

Used by every attention layer of the Thinker and the Talker (omni_model/layers), on prefill and decode. Each
token has three position ids (temporal, height, width; omni_model.rope_index builds them). The rotary frequency
index ``i < D/2`` takes its angle from one of the three axes: ``mrope_section = [s_t, s_h, s_w]`` (sums to D/2,
[16, 24, 24] for the Thinker) gives indices ``[0, s_t)`` to the temporal id, ``[s_t, s_t + s_h)`` to the height id
and the rest to the width id; the pair (d, d + D/2) of the rotate-half layout shares index d. Numbers follow
HF transformers 4.57.6 (``Qwen2_5OmniRotaryEmbedding`` + ``apply_multimodal_rotary_pos_emb``):

* ``inv_freq[i] = 1 / theta ** (2i / D)`` computed in fp32 on the CPU (HF's buffer, see :func:`rope_inv_freq`);
* the angle is the fp32 product ``float(position[axis(i)]) * inv_freq[i]``;
* cos and sin are evaluated in fp32 and then rounded to the activation dtype;
* ``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``.

HF rounds ``x * cos`` and ``rotate_half(x) * sin`` to the activation dtype before adding them; the Triton and CUDA
kernels add in fp32 from the same rounded cos/sin and round once, so they are at least as close to the exact result
(the tests bound both against an fp64 oracle). The kernels compute cos/sin from the positions themselves: no
(T, D) cos/sin tensor goes through global memory.

Shapes: q (T, Hq, D), k (T, Hk, D), same dtype, contiguous last dim, any token / head stride (views into a fused
QKV projection output are the normal case); positions (3, T) int32/int64, any strides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from omni_kernels import _backend, _cuda
from omni_kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_same_dtype,
    check_shape,
    check_tensor,
)

# Positions are turned into fp32 before the multiply (as HF does); ids below 2**24 are exact in fp32.
MAX_POSITION = 2**24

_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def rope_inv_freq(head_dim: int, rope_theta: float, device: torch.device | str) -> torch.Tensor:
    """HF's ``inv_freq`` (D/2,) fp32 on ``device``, cached per (head_dim, theta, device).

    Computed on the CPU with HF's own expression (``_compute_default_rope_parameters``: the model builds the buffer
    on the CPU and moves it), so the values are bit-identical to HF's. The first call for a device copies the
    table to it: make that call before capturing a CUDA graph (any warm-up step does).
    """
    device = torch.device(device)
    key = (int(head_dim), float(rope_theta), device)
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
        inv_freq = (1.0 / (float(rope_theta) ** exponent)).to(device)
        _INV_FREQ[key] = inv_freq
    return inv_freq


def tmrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, D) in ``dtype``, built the HF way: fp32 angles for all three axes, cos/sin in fp32, the section
    of each frequency index taken from its axis (sections repeat for the second half), then the cast."""
    freqs = positions.to(torch.float32)[:, :, None] * inv_freq[None, None, :]  # (3, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (3, T, D)
    split = [int(s) for s in mrope_section] * 2
    cos = torch.cat([c[j % 3] for j, c in enumerate(emb.cos().split(split, dim=-1))], dim=-1)
    sin = torch.cat([s[j % 3] for j, s in enumerate(emb.sin().split(split, dim=-1))], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_tmrope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, mrope_section: Sequence[int], rope_theta: float
) -> None:
    """Plain torch reference (the oracle): HF's arithmetic in q's dtype, written back into q and k.

    Run with float64 q and k it is the fp64 oracle of the tests (angles and cos/sin still in fp32, as HF defines
    them; everything after exact).
    """
    cos, sin = tmrope_cos_sin(positions, rope_inv_freq(q.shape[-1], rope_theta, q.device), mrope_section, q.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q.copy_(q * cos + _rotate_half(q) * sin)
    k.copy_(k * cos + _rotate_half(k) * sin)


# ------------------------------------------------------------------------------------------------ validation


def check_tmrope_args(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, mrope_section, rope_theta
) -> tuple[list[int], float]:
    """Validates the TMRoPE arguments (shared with :mod:`omni_kernels.tmrope_store_kv`).

    Returns ``mrope_section`` as a list of ints and ``rope_theta`` as a float.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    num_tokens, _, head_dim = q.shape
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_shape("k", k, (num_tokens, None, head_dim))
    check_same_dtype(("q", "k"), q, k)
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"q head_dim must be even and positive (rotate-half pairs), got {head_dim}")
    if (
        isinstance(mrope_section, (str, bytes, torch.Tensor))
        or not isinstance(mrope_section, Sequence)
        or len(mrope_section) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in mrope_section)
    ):
        raise TypeError(f"mrope_section must be a sequence of 3 ints (temporal, height, width), got {mrope_section!r}")
    sections = [int(s) for s in mrope_section]
    if min(sections) < 0 or sum(sections) != head_dim // 2:
        raise ValueError(
            f"mrope_section must be 3 non-negative ints summing to head_dim // 2 = {head_dim // 2}, got {sections}"
        )
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)):
        raise TypeError(f"rope_theta must be a float, got {type(rope_theta).__name__}")
    if not (math.isfinite(rope_theta) and rope_theta > 0):
        raise ValueError(f"rope_theta must be finite and positive, got {rope_theta}")
    check_tensor("positions", positions, ndim=2, dtypes=INDEX_DTYPES, device=device, last_contiguous=False)
    check_shape("positions", positions, (3, num_tokens))
    check_index_range("positions", positions, 0, MAX_POSITION)
    return sections, float(rope_theta)


# ------------------------------------------------------------------------------------------------ triton

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pure-torch install
    triton = None

if triton is not None:

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        # x (fp32) rounded to `dtype` and back to fp32, to nearest even. bf16 is rounded on the bits because the
        # CPU interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even, which this reproduces).
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        else:
            y = x.to(dtype).to(tl.float32)
        return y

    @triton.jit
    def _rotate_rows(ptr, row0, stride_h, num_heads, half, cos, sin,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # Rotates the (num_heads, D) rows of one token in place; returns the rotated halves (fp32, already
        # rounded to the storage dtype) for callers that store them again.
        h = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
        i = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < num_heads) & (i < half)
        offs = row0 + h * stride_h + i
        x1 = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
        o1 = _round_to(x1 * cos - x2 * sin, ptr.dtype.element_ty)
        o2 = _round_to(x2 * cos + x1 * sin, ptr.dtype.element_ty)
        tl.store(ptr + offs, o1.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + offs + half, o2.to(ptr.dtype.element_ty), mask=mask)
        return o1, o2

    @triton.jit
    def _tmrope_kernel(
        q_ptr, k_ptr, pos_ptr, inv_freq_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, pos_stride_axis, pos_stride_t,
        v_stride_t, v_stride_h, kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h,
        num_q_heads, num_k_heads, half, section_t, section_th, page_size,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
        STORE: tl.constexpr, LIBDEVICE: tl.constexpr,
    ):
        # One program per token: cos/sin of its D/2 frequencies once, then every q and k head. With STORE (the
        # fused decode op, tmrope_store_kv) the rotated k and the v rows also go to the paged cache.
        token = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_HALF)
        pos_t = tl.load(pos_ptr + token * pos_stride_t).to(tl.float32)
        pos_h = tl.load(pos_ptr + pos_stride_axis + token * pos_stride_t).to(tl.float32)
        pos_w = tl.load(pos_ptr + 2 * pos_stride_axis + token * pos_stride_t).to(tl.float32)
        position = tl.where(i < section_t, pos_t, tl.where(i < section_th, pos_h, pos_w))
        angle = position * tl.load(inv_freq_ptr + i, mask=i < half, other=0.0)
        if LIBDEVICE:  # accurate cosf/sinf on GPUs (angles reach 1e4 and more); the interpreter has no libdevice
            cos = libdevice.cos(angle)
            sin = libdevice.sin(angle)
        else:
            cos = tl.cos(angle)
            sin = tl.sin(angle)
        # HF casts cos/sin to the activation dtype before multiplying.
        cos = _round_to(cos, q_ptr.dtype.element_ty)[None, :]
        sin = _round_to(sin, q_ptr.dtype.element_ty)[None, :]
        _rotate_rows(q_ptr, token * q_stride_t, q_stride_h, num_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_HALF)
        k1, k2 = _rotate_rows(k_ptr, token * k_stride_t, k_stride_h, num_k_heads, half, cos, sin,
                              BLOCK_HK, BLOCK_HALF)
        if STORE:
            slot = tl.load(slot_ptr + token).to(tl.int64)
            block = slot // page_size
            offset = slot % page_size
            h = tl.arange(0, BLOCK_HK)[:, None].to(tl.int64)
            d = tl.arange(0, BLOCK_HALF)[None, :]
            mask = (h < tl.where(slot >= 0, num_k_heads, 0)) & (d < half)  # slot -1: rotated, not cached
            kc = block * kc_stride_b + offset * kc_stride_p + h * kc_stride_h + d
            tl.store(k_cache_ptr + kc, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_cache_ptr + kc + half, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            vr = token * v_stride_t + h * v_stride_h + d
            vc = block * vc_stride_b + offset * vc_stride_p + h * vc_stride_h + d
            tl.store(v_cache_ptr + vc, tl.load(v_ptr + vr, mask=mask, other=0.0), mask=mask)
            tl.store(v_cache_ptr + vc + half, tl.load(v_ptr + vr + half, mask=mask, other=0.0), mask=mask)

    def launch_tmrope_triton(q, k, positions, sections, rope_theta, v=None, k_cache=None, v_cache=None,
                             slot_mapping=None) -> None:
        """Launches :func:`_tmrope_kernel` (with the cache store when ``v`` is given)."""
        num_tokens, num_q_heads, head_dim = q.shape
        if num_tokens == 0:
            return
        inv_freq = rope_inv_freq(head_dim, rope_theta, q.device)
        store = v is not None
        if store:
            cache = (v, k_cache, v_cache, slot_mapping)
            cache_strides = (v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], k_cache.shape[1])
        else:  # placeholders, never read
            cache = (q, q, q, positions)
            cache_strides = (0,) * 9
        v_stride_t, v_stride_h, kc_b, kc_p, kc_h, vc_b, vc_p, vc_h, page_size = cache_strides
        _tmrope_kernel[(num_tokens,)](
            q, k, positions, inv_freq, *cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), positions.stride(0), positions.stride(1),
            v_stride_t, v_stride_h, kc_b, kc_p, kc_h, vc_b, vc_p, vc_h,
            num_q_heads, k.shape[1], head_dim // 2, sections[0], sections[0] + sections[1], page_size,
            BLOCK_HQ=triton.next_power_of_2(max(num_q_heads, 1)),
            BLOCK_HK=triton.next_power_of_2(max(k.shape[1], 1)),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            STORE=store,
            LIBDEVICE=q.device.type == "cuda",
        )


def _apply_tmrope_fake(q, k, positions, mrope_section, rope_theta) -> None:
    return None


@_backend.kernel_op("omni::apply_tmrope_triton", mutates_args=("q", "k"), fake=_apply_tmrope_fake)
def _apply_tmrope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, mrope_section: list[int], rope_theta: float
) -> None:
    launch_tmrope_triton(q, k, positions, mrope_section, rope_theta)


@_backend.kernel_op("omni::apply_tmrope_cuda", mutates_args=("q", "k"), fake=_apply_tmrope_fake)
def _apply_tmrope_cuda(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, mrope_section: list[int], rope_theta: float
) -> None:
    inv_freq = rope_inv_freq(q.shape[-1], rope_theta, q.device)
    _cuda.ext().apply_tmrope(
        _cuda.ref(q), _cuda.ref(k), _cuda.ref(positions), _cuda.ref(inv_freq),
        mrope_section[0], mrope_section[0] + mrope_section[1], _cuda.stream(q.device),
    )


def _apply_tmrope_torch(q, k, positions, mrope_section, rope_theta) -> None:
    apply_tmrope_ref(q, k, positions, mrope_section=mrope_section, rope_theta=rope_theta)


_backend.register(
    "apply_tmrope",
    torch=_apply_tmrope_torch,
    triton=_apply_tmrope_triton if triton is not None else None,
    cuda=_apply_tmrope_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): 2.9 TB/s at 64k tokens, 10.6x HF; Triton 2.4 TB/s.
    prefer=("cuda", "triton", "torch"),
)


def apply_tmrope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    *,
    mrope_section: Sequence[int],
    rope_theta: float,
    backend: str | None = None,
) -> None:
    """Rotates ``q`` and ``k`` in place by TMRoPE (rotate-half layout, HF Qwen2.5-Omni numbers).

    q: (T, Hq, D), k: (T, Hk, D) of one float dtype, contiguous last dim, any other strides; positions: (3, T)
    int32/int64 (temporal, height, width ids, each in [0, 2**24)); mrope_section: 3 ints summing to D // 2;
    rope_theta: the rotary base (1e6 for Qwen2.5-Omni).
    """
    sections, theta = check_tmrope_args(q, k, positions, mrope_section, rope_theta)
    _backend.dispatch("apply_tmrope", q.device, backend)(q, k, positions, sections, theta)
