"""sliding_block_attention: the Token2Wav DiT's block-banded attention, without a T x T mask.

The frames of a sequence are cut into blocks of ``block_size`` (block of frame ``t`` = ``t // block_size``, counted
from the start of its sequence); a query in block ``i`` sees every key of blocks ``i - look_back .. i + look_ahead``
of the same sequence. This is HF 4.57.6's rule (``Qwen2_5OmniToken2WavDiTModel._create_block_diff`` builds
``block_diff = block(key) - block(query)`` and each ``DiTDecoderLayer`` masks with
``-look_backward_block <= block_diff <= look_ahead_block``). The DiT uses blocks of 24 mel frames, 16 heads x 64,
look_back = 1 in layers 0 and 20, look_ahead = 1 in layer 10, 0 elsewhere; the guidance pair (conditional and
unconditional) is two sequences of one packed call.

Shapes: q, k, v (T, H, D) with a contiguous last dim (views into a fused QKV output are fine); cu_seqlens None
(one sequence) or (S + 1,) int32/int64, starting at 0, non-decreasing, ending at T; output (T, H, D) contiguous.

Since blocks are contiguous, the keys visible to query block ``i`` form one contiguous range of its sequence. The
kernels (Triton and CUDA) give each program one tile of one query block (24 rows padded to 32) and one head, and
loop flash-attention style (online softmax in fp32) over that key range only, so a masked tile is never computed.
Program ``p`` finds its (sequence, block) by a prefix sum over the per-sequence block counts, done in the kernel
(no host sync, no extra launch).
"""

from __future__ import annotations

import math

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

# The kernels keep a (rows, D) fp32 accumulator per program; the CUDA kernel instantiates padded head dims up to 256.
MAX_HEAD_DIM = 256


def _equal_sequences(q, k, v, block_size: int, look_back: int, look_ahead: int, scale: float) -> torch.Tensor:
    """The rule for S sequences of one length L, q, k, v (S, L, H, D): each query block against its stacked key
    blocks."""
    seqs, length, num_heads, head_dim = q.shape
    num_blocks = -(-length // block_size)
    back, ahead = min(look_back, num_blocks - 1), min(look_ahead, num_blocks - 1)
    width = back + 1 + ahead
    pad = num_blocks * block_size - length
    # (S, num_blocks, block_size, H, D), zero-padded at the end; then key windows (S, num_blocks, width * block_size,
    # H, D) holding blocks i - back .. i + ahead for query block i (zero blocks outside the sequence).
    qb, kb, vb = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(seqs, num_blocks, block_size, num_heads, head_dim)
                  for x in (q, k, v))
    kw, vw = (torch.stack([xb[:, w: w + num_blocks] for w in range(width)], dim=2).flatten(2, 3)
              for xb in (F.pad(x, (0, 0, 0, 0, 0, 0, back, ahead)) for x in (kb, vb)))
    block_ids = torch.arange(num_blocks, device=q.device)[:, None] - back + torch.arange(width, device=q.device)
    key_pos = (block_ids[:, :, None] * block_size + torch.arange(block_size, device=q.device)).flatten(1)
    visible = (key_pos >= 0) & (key_pos < length)  # (num_blocks, width * block_size)
    scores = torch.einsum("sbqhd,sbkhd->sbhqk", qb, kw) * scale
    scores = scores.masked_fill(~visible[None, :, None, None, :], float("-inf"))
    out = torch.einsum("sbhqk,sbkhd->sbqhd", torch.softmax(scores, dim=-1), vw)
    return out.reshape(seqs, num_blocks * block_size, num_heads, head_dim)[:, :length]


def sliding_block_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    look_back: int,
    look_ahead: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain torch reference (the oracle), computed in the dtype of q.

    Per sequence, each query block is scored against the stacked key blocks ``i - look_back .. i + look_ahead``
    (missing blocks and the padding of the last block masked out): O(T * window) memory, never T x T. Runs of
    sequences of one length are computed together.
    """
    num_tokens, num_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    bounds = [0, num_tokens] if cu_seqlens is None else [int(b) for b in cu_seqlens.tolist()]
    out = q.new_empty(num_tokens, num_heads, head_dim)
    i = 0
    while i < len(bounds) - 1:
        length = bounds[i + 1] - bounds[i]
        j = i + 1  # sequences i .. j - 1: a run of equal lengths, contiguous in the packed tensors
        while j < len(bounds) - 1 and bounds[j + 1] - bounds[j] == length:
            j += 1
        if length > 0:
            lo, hi = bounds[i], bounds[j]
            rows = (x[lo:hi].view(j - i, length, num_heads, head_dim) for x in (q, k, v))
            out[lo:hi] = _equal_sequences(*rows, block_size, look_back, look_ahead, scale).flatten(0, 1)
        i = j
    return out


try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

if triton is not None:

    @triton.jit
    def _sliding_block_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h,
        num_tokens, num_seqs, head_dim, block_size, look_back, look_ahead, tiles_per_block, scale_log2,
        HAS_CU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Program (p, head): tile `p % tiles_per_block` of the (p // tiles_per_block)-th query block, counting the
        # blocks of all sequences one after the other. Programs past the last block find an empty sequence.
        pid = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        blk = pid // tiles_per_block
        sub = pid % tiles_per_block
        if HAS_CU:
            # seq = number of sequences whose blocks all come before `blk`; first = their block count.
            seq = 0
            first = 0
            carry = 0
            for c in range(0, num_seqs, BLOCK_S):
                idx = c + tl.arange(0, BLOCK_S)
                in_range = idx < num_seqs
                lo = tl.load(cu_ptr + idx, mask=in_range, other=0).to(tl.int32)
                hi = tl.load(cu_ptr + idx + 1, mask=in_range, other=0).to(tl.int32)
                count = (hi - lo + block_size - 1) // block_size
                before = ((carry + tl.cumsum(count, 0)) <= blk) & in_range
                seq += tl.sum(before.to(tl.int32), 0)
                first += tl.sum(tl.where(before, count, 0), 0)
                carry += tl.sum(count, 0)
            found = seq < num_seqs
            seq = tl.minimum(seq, num_seqs - 1)
            start = tl.load(cu_ptr + seq).to(tl.int32)
            end = tl.where(found, tl.load(cu_ptr + seq + 1).to(tl.int32), start)
            b = blk - first
        else:
            start = 0
            end = num_tokens
            b = blk
        # Rows of this tile, and the one contiguous key range its block sees (blocks clamped to the sequence).
        num_blocks = (end - start + block_size - 1) // block_size
        q_lo = start + b * block_size + sub * BLOCK_M
        q_hi = tl.minimum(start + b * block_size + tl.minimum(block_size, (sub + 1) * BLOCK_M), end)
        k_lo = start + tl.maximum(b - look_back, 0) * block_size
        k_hi = tl.minimum(start + tl.minimum(b + look_ahead + 1, num_blocks) * block_size, end)

        offs_m = q_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        q_mask = (offs_m < q_hi)[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * q_stride_t + head * q_stride_h + offs_d[None, :],
                    mask=q_mask, other=0.0)
        if DOT_FP32:  # fp32 inputs, or the CPU interpreter (which mishandles bf16/fp16 dots)
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for kt in range(k_lo, k_hi, BLOCK_N):
            offs_n = kt + tl.arange(0, BLOCK_N)
            n_mask = offs_n < k_hi
            kv_mask = n_mask[:, None] & d_mask[None, :]
            rows = offs_n.to(tl.int64)[:, None]
            k = tl.load(k_ptr + rows * k_stride_t + head * k_stride_h + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + rows * v_stride_t + head * v_stride_h + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one visible key
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + offs_m.to(tl.int64)[:, None] * o_stride_t + head * o_stride_h + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=q_mask)


def _tile_rows(block_size: int) -> int:
    """Query rows per program (and keys per step): the block rounded up to a power of two, 16 to 64."""
    return max(16, min(64, 1 << (block_size - 1).bit_length()))


def _sliding_block_attention_fake(q, k, v, cu_seqlens, block_size, look_back, look_ahead, scale, allow_tf32):
    return q.new_empty(q.shape)


@_backend.kernel_op("omni::sliding_block_attention_triton", mutates_args=(), fake=_sliding_block_attention_fake)
def _sliding_block_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int,
    look_back: int, look_ahead: int, scale: float, allow_tf32: bool,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    num_seqs = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    block_m = _tile_rows(block_size)
    tiles_per_block = -(-block_size // block_m)
    # Blocks over all sequences: sum(ceil(len_s / bs)) <= ceil(T / bs) + S - 1.
    grid = ((-(-num_tokens // block_size) + num_seqs - 1) * tiles_per_block, num_heads)
    dot_fp32 = q.dtype == torch.float32 or _backend.triton_interpret()
    precision = "ieee" if q.dtype == torch.float32 and not allow_tf32 else "tf32"
    _sliding_block_attention_kernel[grid](
        q, k, v, out, cu_seqlens if cu_seqlens is not None else q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        num_tokens, num_seqs, head_dim, block_size, look_back, look_ahead, tiles_per_block, scale * math.log2(math.e),
        HAS_CU=cu_seqlens is not None, BLOCK_M=block_m, BLOCK_N=block_m,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_S=64, DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=4,
    )
    return out


@_backend.kernel_op("omni::sliding_block_attention_cuda", mutates_args=(), fake=_sliding_block_attention_fake)
def _sliding_block_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int,
    look_back: int, look_ahead: int, scale: float, allow_tf32: bool,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    _cuda.ext().sliding_block_attention(
        _cuda.ref(q), _cuda.ref(k), _cuda.ref(v), _cuda.ref(out),
        _cuda.ref(cu_seqlens) if cu_seqlens is not None else None,
        block_size, look_back, look_ahead, scale, allow_tf32, _cuda.stream(q.device),
    )
    return out


def _sliding_block_attention_torch(q, k, v, cu_seqlens, block_size, look_back, look_ahead, scale, allow_tf32):
    return sliding_block_attention_ref(q, k, v, block_size=block_size, look_back=look_back, look_ahead=look_ahead,
                                       cu_seqlens=cu_seqlens, scale=scale)


_backend.register(
    "sliding_block_attention",
    torch=_sliding_block_attention_torch,
    triton=_sliding_block_attention_triton if triton is not None else None,
    cuda=_sliding_block_attention_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): 22-62x HF's dense-mask SDPA at 3000 frames.
    prefer=("cuda", "triton", "torch"),
)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    """Starts at 0, non-decreasing, ends at T (checked where :func:`indices_checkable`: values need a sync)."""
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 values (one sequence), got shape {tuple(cu_seqlens.shape)}")
    if not indices_checkable(cu_seqlens):
        return
    cu = cu_seqlens.cpu()
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {num_tokens}, got {first} .. {last}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def sliding_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    look_back: int,
    look_ahead: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    allow_tf32: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Block-banded attention: a query in block ``i`` of its sequence sees the keys of blocks
    ``i - look_back .. i + look_ahead`` of that sequence (block of frame ``t`` = ``t // block_size``).

    q, k, v: (T, H, D), one float dtype; cu_seqlens: None (one sequence) or (S + 1,) int32/int64 sequence
    boundaries (0, ..., T); scale defaults to D ** -0.5. ``allow_tf32`` lets fp32 inputs use TF32 tensor cores
    (error of fp16-precision inputs, see the tests); without it fp32 stays fp32. Returns (T, H, D) contiguous.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    check_same_dtype(("q", "k"), q, k)
    check_same_dtype(("q", "v"), q, v)
    num_tokens, _, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim must lie in [1, {MAX_HEAD_DIM}], got {head_dim}")
    _check_int("block_size", block_size, 1)
    _check_int("look_back", look_back, 0)
    _check_int("look_ahead", look_ahead, 0)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
        _check_cu_seqlens(cu_seqlens, num_tokens)
    if scale is None:
        scale = head_dim**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    impl = _backend.dispatch("sliding_block_attention", device, backend)
    # More blocks than a sequence can have change nothing; clamping keeps the kernels' index math in 32 bits.
    max_blocks = -(-num_tokens // block_size)
    return impl(q, k, v, cu_seqlens, block_size, min(look_back, max_blocks), min(look_ahead, max_blocks),
                float(scale), allow_tf32)
