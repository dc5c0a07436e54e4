"""window_attention: non-causal attention inside each segment of packed tokens (block-diagonal attention).

Omni uses it in the vision encoder (windows of at most 64 patches, 16 heads x 80, in 28 of its 32 blocks; whole
temporal slices of a frame, up to thousands of patches, in blocks 7, 15, 23, 31) and in the audio encoder (2 s
chunks of 100 frames, 20 heads x 64). Segment ``i`` is the token range ``[cu_seqlens[i], cu_seqlens[i+1])``; a
query attends to every key of its own segment and to nothing else; empty segments are allowed.

Shapes: q, k, v (T, H, D) with a contiguous last dim (views into a fused QKV (T, 3, H, D) are fine);
cu_seqlens (S + 1,) int32/int64, starting at 0, non-decreasing, ending at T; output (T, H, D) contiguous.

Kernels (Triton and CUDA) are flash-attention style: online softmax in fp32 over key blocks, one program per
(query tile, head). Two tilings, picked on the host from ``max_seqlen`` (:func:`_plan`):

* per segment ("varlen"): program ``i`` takes rows ``[j * BLOCK_M, (j + 1) * BLOCK_M)`` of segment ``i //
  tiles_per_seg`` (``j = i % tiles_per_seg``) against the keys of that segment only. With BLOCK_M = 64 a 64-patch
  vision window is one program that loads its keys once; tiles past the end of a shorter segment do nothing.
* packed (segments of at most 16 tokens): program ``i`` takes the packed rows ``[i * BLOCK_M, (i + 1) * BLOCK_M)``,
  whatever segments they belong to, loops over the keys of the union of those segments and masks each score by
  segment id (``seg_ids``, built with ``torch.searchsorted`` on the device): one program serves several short
  segments instead of one mostly masked program each.

Neither needs a host sync when ``max_seqlen`` is given; the whole (T, T) mask is never built.

With ``backend=None`` on CUDA, calls whose segments may exceed ``SDPA_MIN_SEQLEN`` tokens (the vision encoder's
whole-frame layers) go to torch's SDPA instead, batched per run of equal-length segments
(:func:`window_attention_sdpa`): flash attention beats both kernels on rows of thousands of keys (measured).

Head dims: Triton splits D into two power-of-two column blocks (80 = 64 + 16: no padding to 128; odd D such as 59
are masked), D <= 256. CUDA (csrc/window_attention.cu) takes any D <= 128: bf16/fp16 on tensor cores (mma.sync,
D zero-padded to 64, 80 or 128 in shared memory), fp32 on a SIMT kernel with exact fp32 products. Triton's fp32
dots are exact too (``input_precision="ieee"``, no TF32): the tests hold fp32 to fp32's error budget.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from omni_kernels import _backend, _cuda
from omni_kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_dtype,
    check_shape,
    check_tensor,
    indices_checkable,
)

# Largest head dim per compiled backend: Triton keeps a (BLOCK_M, D) accumulator in registers; the CUDA kernels
# instantiate padded head dims 64, 80 and 128 (bf16/fp16 tensor cores) and 64, 128 (fp32 SIMT).
MAX_HEAD_DIM = {"triton": 256, "cuda": 128}
# Segments this short are packed several to a program (see the module docstring).
PACK_MAX_SEQLEN = 16
# With backend=None on CUDA, segments longer than this go to torch's SDPA (flash / memory-efficient kernels), one
# batched call per run of equal-length segments. H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): on a
# 4784-patch whole frame SDPA took 0.46 ms, our Triton 0.66 ms and CUDA 1.04 ms; on two 576-patch frames CUDA took
# 0.11 ms and a per-segment SDPA loop 0.21 ms. The crossover lies between 576 and 4784; 1024 is not measured.
SDPA_MIN_SEQLEN = 1024


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for one segment; q, k, v (L, H, D), computed in their own dtype."""
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, L, D)
    probs = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * scale, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1)


def window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain torch reference (the oracle): a loop over segments, matmul + softmax per segment.

    Computes in fp32 (fp64 for fp64 inputs) and returns the input dtype. ``upcast=False`` does the same math in
    the input dtype (the "torch in low precision" term of the tolerance rule).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seg = (t[start:end].to(compute) for t in (q, k, v))
            out[start:end] = _segment_attention(*seg, scale).to(q.dtype)
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _plan(max_seqlen: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiling of the Triton kernel for segments of at most ``max_seqlen`` tokens (see the module docstring).

    Per-segment tiles match the segment: 64 rows for the 64-patch vision windows (one program, keys loaded once),
    128 x 64 for long segments. fp32 (exact fp32 dots) keeps its operands in shared memory at twice the bytes:
    smaller tiles and two stages keep it within the 227 KB of an H100 up to D = 256.
    """
    if dtype == torch.float32:
        return dict(packed=max_seqlen <= PACK_MAX_SEQLEN, block_m=32 if head_dim > 128 else 64, block_n=32,
                    num_warps=4, num_stages=2)
    if max_seqlen <= PACK_MAX_SEQLEN:
        return dict(packed=True, block_m=64, block_n=32, num_warps=4, num_stages=2)
    if max_seqlen <= 64 or head_dim > 128:
        block = max(32, _next_pow2(max_seqlen)) if max_seqlen <= 64 else 64
        return dict(packed=False, block_m=block, block_n=block, num_warps=4, num_stages=2)
    return dict(packed=False, block_m=128, block_n=64, num_warps=8, num_stages=2)


def _head_dim_split(head_dim: int) -> tuple[int, int]:
    """Head dim as BLOCK_D0 + BLOCK_D1 power-of-two parts (each >= 16 for tl.dot): 80 = 64 + 16, 59 = 32 + 32,
    64 = 64 + 0. Head dim 80 thus costs 80 columns, not the 128 of a padded block."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (max(16, _next_pow2(rest)) if rest > 0 else 0)


try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

if triton is not None:

    @triton.jit
    def _dot_operand(x, DOT_FP32: tl.constexpr):
        # The CPU interpreter gets tl.dot of bf16 wrong: there the (already rounded) operands are multiplied in fp32.
        if DOT_FP32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _window_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, seg_ptr,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h,
        num_tokens, tiles_per_seg, head_dim, qk_scale,
        PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_D1: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        # The tile: query rows [q_lo, q_hi) and the key range [k_lo, k_hi) that covers their segments.
        if PACKED:
            q_lo = tile * BLOCK_M
            q_hi = tl.minimum(q_lo + BLOCK_M, num_tokens)
            k_lo = tl.load(cu_ptr + tl.load(seg_ptr + q_lo))
            k_hi = tl.load(cu_ptr + tl.load(seg_ptr + q_hi - 1) + 1)
        else:
            seg = tile // tiles_per_seg
            seg_lo = tl.load(cu_ptr + seg)
            seg_hi = tl.load(cu_ptr + seg + 1)
            q_lo = seg_lo + (tile % tiles_per_seg) * BLOCK_M
            q_hi = tl.minimum(q_lo + BLOCK_M, seg_hi)
            k_lo = seg_lo
            k_hi = tl.where(q_lo < seg_hi, seg_hi, seg_lo)  # a tile past the segment's end loops over nothing

        rows = q_lo + tl.arange(0, BLOCK_M)
        row_ok = rows < q_hi
        rows64 = rows.to(tl.int64)
        d0 = tl.arange(0, BLOCK_D0)
        d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d0_ok = d0 < head_dim
        d1_ok = d1 < head_dim
        q_base = q_ptr + rows64[:, None] * q_stride_t + head * q_stride_h
        q0 = _dot_operand(tl.load(q_base + d0[None, :], mask=row_ok[:, None] & d0_ok[None, :], other=0.0), DOT_FP32)
        if HAS_D1:
            q1 = _dot_operand(tl.load(q_base + d1[None, :], mask=row_ok[:, None] & d1_ok[None, :], other=0.0), DOT_FP32)
        if PACKED:
            seg_q = tl.load(seg_ptr + rows, mask=row_ok, other=-1)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
        for start_n in range(k_lo, k_hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < k_hi
            cols64 = cols.to(tl.int64)
            k_base = k_ptr + cols64[:, None] * k_stride_t + head * k_stride_h
            v_base = v_ptr + cols64[:, None] * v_stride_t + head * v_stride_h
            mask0 = col_ok[:, None] & d0_ok[None, :]
            mask1 = col_ok[:, None] & d1_ok[None, :]
            k0 = _dot_operand(tl.load(k_base + d0[None, :], mask=mask0, other=0.0), DOT_FP32)
            s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
            if HAS_D1:
                k1 = _dot_operand(tl.load(k_base + d1[None, :], mask=mask1, other=0.0), DOT_FP32)
                s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            valid = col_ok[None, :]
            if PACKED:
                seg_k = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
                valid = valid & (seg_q[:, None] == seg_k[None, :])
            s = tl.where(valid, s * qk_scale, float("-inf"))  # qk_scale includes log2(e): exp2 below
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no valid key so far keeps m = -inf; subtract 0 instead so that no inf - inf appears.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # P is rounded to the input dtype before P @ V, as flash-attention does (fp32 math in between).
            p = _dot_operand(p.to(q_ptr.dtype.element_ty), DOT_FP32)
            v0 = _dot_operand(tl.load(v_base + d0[None, :], mask=mask0, other=0.0), DOT_FP32)
            acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=PRECISION)
            if HAS_D1:
                v1 = _dot_operand(tl.load(v_base + d1[None, :], mask=mask1, other=0.0), DOT_FP32)
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)
            m_i = m_new

        inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)  # l > 0 for every stored row: it sees its own key
        o_base = o_ptr + rows64[:, None] * o_stride_t + head * o_stride_h
        out_ty = o_ptr.dtype.element_ty
        tl.store(o_base + d0[None, :], (acc0 * inv_l[:, None]).to(out_ty), mask=row_ok[:, None] & d0_ok[None, :])
        if HAS_D1:
            tl.store(o_base + d1[None, :], (acc1 * inv_l[:, None]).to(out_ty), mask=row_ok[:, None] & d1_ok[None, :])


def _segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(T,) int32: the segment of each token (empty segments own no token). Device-side, no host sync."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).to(torch.int32)


def _launch_triton(q, k, v, cu_seqlens, max_seqlen, scale) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    plan = _plan(max_seqlen, head_dim, q.dtype)
    block_m = plan["block_m"]
    num_segments = cu_seqlens.numel() - 1
    if plan["packed"]:
        seg_ids = _segment_ids(cu_seqlens, num_tokens)
        grid = (triton.cdiv(num_tokens, block_m), num_heads)
        tiles_per_seg = 1
    else:
        seg_ids = cu_seqlens  # unused
        tiles_per_seg = triton.cdiv(max_seqlen, block_m)
        grid = (num_segments * tiles_per_seg, num_heads)
    d0, d1 = _head_dim_split(head_dim)
    _window_attention_kernel[grid](
        q, k, v, out, cu_seqlens, seg_ids,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        num_tokens, tiles_per_seg, head_dim, scale * math.log2(math.e),
        PACKED=plan["packed"], BLOCK_M=block_m, BLOCK_N=plan["block_n"],
        BLOCK_D0=d0, BLOCK_D1=max(d1, 16), HAS_D1=d1 > 0,
        DOT_FP32=q.device.type == "cpu", PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    return out


# The custom ops take cu_seqlens as int32 (the front door converts) and max_seqlen > 0 as a host int.


def _window_attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape)


@_backend.kernel_op("omni::window_attention_triton", mutates_args=(), fake=_window_attention_fake)
def _window_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    return _launch_triton(q, k, v, cu_seqlens, max_seqlen, scale)


@_backend.kernel_op("omni::window_attention_cuda", mutates_args=(), fake=_window_attention_fake)
def _window_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    num_tokens = q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    packed = max_seqlen <= PACK_MAX_SEQLEN
    seg_ids = _segment_ids(cu_seqlens, num_tokens) if packed else cu_seqlens
    _cuda.ext().window_attention(
        _cuda.ref(q), _cuda.ref(k), _cuda.ref(v), _cuda.ref(out), _cuda.ref(cu_seqlens), _cuda.ref(seg_ids),
        packed, max_seqlen, scale, _cuda.stream(q.device),
    )
    return out


def _window_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale):
    return window_attention_ref(q, k, v, cu_seqlens, scale=scale)


def window_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int], scale: float):
    """Segments of long, mostly equal lengths (whole frames) through ``F.scaled_dot_product_attention``.

    ``cu`` holds the segment bounds on the host. Each run of consecutive segments of one length is one batched
    SDPA call on (n, H, L, D) views of q, k, v (no copies when the inputs are views of a fused QKV output).
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    start = 0
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    i = 0
    while i < len(lengths):
        length, n = lengths[i], 1
        while i + n < len(lengths) and lengths[i + n] == length:
            n += 1
        end = start + n * length
        if length:
            q4, k4, v4 = (t[start:end].unflatten(0, (n, length)).transpose(1, 2) for t in (q, k, v))
            attn = F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
            out[start:end] = attn.transpose(1, 2).flatten(0, 1)
        start, i = end, i + n
    return out


def routes_to_sdpa(device: torch.device, backend: str | None, max_seqlen: int) -> bool:
    """True when ``backend=None`` on CUDA meets segments long enough for SDPA to win (see ``SDPA_MIN_SEQLEN``)."""
    return (backend is None and not os.environ.get("OMNI_BACKEND") and device.type == "cuda"
            and max_seqlen > SDPA_MIN_SEQLEN)


_backend.register(
    "window_attention",
    torch=_window_attention_torch,
    triton=_window_attention_triton if triton is not None else None,
    cuda=_window_attention_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): 38x the HF per-window loop on 1280x720 windows;
    # SDPA wins on whole frames: the front door routes those to it (SDPA_MIN_SEQLEN).
    prefer=("cuda", "triton", "torch"),
)


def _check_cu_seqlens(cu: list[int], num_tokens: int) -> None:
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={num_tokens}, got {cu[0]} ... {cu[-1]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Non-causal attention inside each segment ``[cu_seqlens[i], cu_seqlens[i+1])`` of the packed tokens.

    q, k, v: (T, H, D) of one float dtype, last dim contiguous (strided views of a fused QKV are fine).
    cu_seqlens: (S + 1,) int32/int64 from 0 to T, non-decreasing (empty segments allowed).
    max_seqlen: an upper bound on the segment lengths (host int). Given, the launch needs no host sync; None
    reads cu_seqlens on the host (a sync) and also checks its values.
    scale: the softmax scale, default D ** -0.5. Returns (T, H, D) contiguous, in the dtype of q.
    The CUDA backend takes D <= 128, the Triton backend D <= 256, the torch reference any D. With backend None on
    CUDA, segments longer than ``SDPA_MIN_SEQLEN`` go to SDPA (reading cu_seqlens on the host).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    check_same_dtype(("q", "k"), q, k)
    check_same_dtype(("q", "v"), q, v)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    num_tokens, num_heads, head_dim = q.shape
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one value (0), got an empty tensor")
    if num_tokens >= 2**31:
        raise ValueError(f"q: at most 2**31 - 1 tokens, got {num_tokens}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    name = _backend.resolve("window_attention", device, backend)
    if name in MAX_HEAD_DIM and head_dim > MAX_HEAD_DIM[name]:
        raise ValueError(f"q: the {name} backend supports head dims up to {MAX_HEAD_DIM[name]}, got D={head_dim}")
    if max_seqlen is None or indices_checkable(cu_seqlens):
        cu = cu_seqlens.tolist()
        _check_cu_seqlens(cu, num_tokens)
        real_max = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)
        if max_seqlen is not None and max_seqlen < real_max:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest segment of cu_seqlens ({real_max})")
        max_seqlen = real_max if max_seqlen is None else max_seqlen
    scale = head_dim**-0.5 if scale is None else float(scale)
    if num_tokens == 0 or num_heads == 0 or head_dim == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=device)
    if max_seqlen == 0:
        raise ValueError(f"max_seqlen=0 but q has T={num_tokens} tokens")
    max_seqlen = min(max_seqlen, num_tokens)
    if routes_to_sdpa(device, backend, max_seqlen):
        # Whole-frame layers: the bounds are needed on the host (one sync per call; encoders are not graphed).
        return window_attention_sdpa(q, k, v, cu_seqlens.tolist(), scale)
    return _backend.dispatch("window_attention", device, name)(
        q, k, v, cu_seqlens.to(torch.int32), max_seqlen, scale
    )
