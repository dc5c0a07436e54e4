"""paged_decode_attention: one new query token per sequence attends over its paged KV cache.

Used by the Thinker and the Talker on every decode step (omni_model/engine): the token's own key and value
are already in the cache (store_kv_cache ran first), so sequence ``b`` attends to cached positions
``0 .. context_lens[b] - 1``; position ``t`` lives in block ``block_tables[b, t // P]`` at offset ``t % P``.
Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hk)``. A row with
``context_lens[b] == 0`` is a padded batch slot and gets an all-zero output.

Shapes: q (B, Hq, D) with a contiguous last dim (a view into a fused QKV output is fine);
k_cache, v_cache (NB, P, Hk, D); block_tables (B, max_blocks) int32 (entries past a sequence's last block
are never read, so they may hold anything); context_lens (B,) int32; output (B, Hq, D) in q's dtype.

Kernels (flash-decoding): the context of each sequence is cut into partitions; one program handles one
(sequence, kv head, partition) for all query heads of the GQA group, so every K/V row is loaded once per
group. When a sequence spans several partitions, each writes (max, sum, unnormalised accumulator) in fp32
and a second pass combines them. The partition size is chosen so that batch x kv heads x partitions fills
the GPU (see :func:`decode_partition`).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from omni_kernels import _backend, _cuda
from omni_kernels._checks import FLOAT_DTYPES, check_same_dtype, check_shape, check_tensor, indices_checkable

LOG2E = 1.4426950408889634


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain torch reference (the oracle): gathers each sequence's context and runs softmax attention in
    fp32 (fp64 for fp64 inputs)."""
    batch, num_q_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=compute, device=q.device)
    for b, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // page)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].to(compute)  # (n, Hk, D)
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].to(compute)
        k = k.repeat_interleave(group, dim=1)  # (n, Hq, D)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].to(compute), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------ partitioning

MAX_PARTITION = 512  # tokens; the CUDA kernel keeps one partition's scores in shared memory
MIN_PARTITION = 64


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU (the Triton interpreter): small, so that modest test shapes split too


def decode_partition(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Tokens per partition: the largest of 512, 256, 128, 64 that still gives 1.5 programs per SM
    (batch x kv heads x partitions >= 1.5 x SMs; the CUDA kernel fits 2 per SM), e.g. 128 for the 7B thinker
    (Hk 4) at batch 1 and 8k tokens on an H100 (132 SMs: 256 programs in one wave). ``max_context`` is the
    block-table bound ``max_blocks * P``, known on the host without a sync."""
    part = MAX_PARTITION
    while part > MIN_PARTITION and batch * num_kv_heads * -(-max_context // part) < 3 * num_sms // 2:
        part //= 2
    return part


def _split(batch, num_kv_heads, max_context, device, partition_size, multiple=1):
    """(tokens per partition, partitions); ``partition_size`` 0 picks it, ``multiple`` rounds it up."""
    part = partition_size or decode_partition(batch, num_kv_heads, max_context, _num_sms(device))
    part = -(-part // multiple) * multiple
    return part, max(1, -(-max_context // part))


try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, ctx_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        q_stride_b, q_stride_h, kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h,
        bt_stride_b, o_stride_b, o_stride_h,
        scale_log2, page_size, group_size, head_dim, num_q_heads, part_size, max_parts,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr, LOWP_DOT: tl.constexpr,
    ):
        # One program per (partition, kv head, sequence): the whole GQA group (padded to BLOCK_G rows) shares
        # every K/V tile; online softmax over the partition in tiles of BLOCK_N tokens.
        part = tl.program_id(0)
        kv_head = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        ctx = tl.load(ctx_ptr + b)
        start = part * part_size
        end = tl.minimum(start + part_size, ctx)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_mask = g < group_size
        d_mask = d < head_dim
        heads = (kv_head * group_size + g).to(tl.int64)
        q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if not LOWP_DOT:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        kv_head64 = kv_head.to(tl.int64)
        for n0 in range(start, end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            t_mask = t < end
            block = tl.load(bt_ptr + b * bt_stride_b + t // page_size, mask=t_mask, other=0).to(tl.int64)
            offset = (t % page_size).to(tl.int64)
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + block[:, None] * kc_stride_b + offset[:, None] * kc_stride_p
                        + kv_head64 * kc_stride_h + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + block[:, None] * vc_stride_b + offset[:, None] * vc_stride_p
                        + kv_head64 * vc_stride_h + d[None, :], mask=kv_mask, other=0.0)
            if LOWP_DOT:
                # bf16/fp16 operands, fp32 accumulation: every product is exact.
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            s = tl.where(t_mask[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if LOWP_DOT:
                # p in two low-precision halves (p = hi + lo to ~2^-17): P @ V stays on tensor cores without
                # the rounding of p to 8 mantissa bits.
                p_hi = p.to(v.dtype)
                p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
                acc = tl.dot(p_hi, v, acc)
                acc = tl.dot(p_lo, v, acc)
            else:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            m_i = m_new

        if SPLIT:
            row = (b * num_q_heads + heads) * max_parts + part
            tl.store(part_acc_ptr + row[:, None] * head_dim + d[None, :], acc,
                     mask=g_mask[:, None] & d_mask[None, :])
            tl.store(part_ml_ptr + 2 * row, m_i, mask=g_mask)
            tl.store(part_ml_ptr + 2 * row + 1, l_i, mask=g_mask)
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # context 0: zeros
            tl.store(out_ptr + b * o_stride_b + heads[:, None] * o_stride_h + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _paged_decode_reduce_kernel(
        part_acc_ptr, part_ml_ptr, ctx_ptr, out_ptr, o_stride_b, o_stride_h,
        head_dim, num_q_heads, part_size, max_parts,
        BLOCK_P: tl.constexpr, CHUNK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (sequence, query head): combines the partitions' (max, sum, accumulator).
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        ctx = tl.load(ctx_ptr + b)
        num_parts = (ctx + part_size - 1) // part_size
        base = (b * num_q_heads + h) * max_parts
        p_all = tl.arange(0, BLOCK_P)
        m_all = tl.load(part_ml_ptr + 2 * (base + p_all), mask=p_all < num_parts, other=float("-inf"))
        m_max = tl.max(m_all, 0)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        acc = tl.zeros([BLOCK_D], tl.float32)
        total = tl.zeros([CHUNK_P], tl.float32)
        for p0 in range(0, num_parts, CHUNK_P):
            p = p0 + tl.arange(0, CHUNK_P)
            valid = p < num_parts
            m = tl.load(part_ml_ptr + 2 * (base + p), mask=valid, other=0.0)
            l_p = tl.load(part_ml_ptr + 2 * (base + p) + 1, mask=valid, other=0.0)
            w = tl.where(valid, tl.exp2(m - m_max), 0.0)
            o = tl.load(part_acc_ptr + (base + p)[:, None] * head_dim + d[None, :],
                        mask=valid[:, None] & d_mask[None, :], other=0.0)
            acc += tl.sum(w[:, None] * o, 0)
            total += w * l_p
        denom = tl.sum(total, 0)
        out = acc / tl.where(denom > 0, denom, 1.0)  # context 0: acc is zero
        tl.store(out_ptr + b * o_stride_b + h * o_stride_h + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def store_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype Triton kernels write. The CPU interpreter truncates fp32 -> bf16 instead of rounding to
    nearest (twice the error of a GPU store), so there the kernels write fp32 and torch rounds."""
    return torch.float32 if q.device.type == "cpu" and q.dtype == torch.bfloat16 else q.dtype


def _partials(q, num_parts):
    batch, num_q_heads, head_dim = q.shape
    part_acc = torch.empty(batch, num_q_heads, num_parts, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(batch, num_q_heads, num_parts, 2, dtype=torch.float32, device=q.device)
    return part_acc, part_ml


def _paged_decode_attention_fake(q, k_cache, v_cache, block_tables, context_lens, scale, partition_size=0):
    return q.new_empty(q.shape)


@_backend.kernel_op("omni::paged_decode_attention_triton", mutates_args=(), fake=_paged_decode_attention_fake)
def _paged_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, partition_size: int = 0,
) -> torch.Tensor:
    batch, num_q_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(batch, num_q_heads, head_dim, dtype=store_dtype(q), device=q.device)
    max_context = block_tables.shape[1] * page
    if batch == 0 or max_context == 0:
        return out.zero_().to(q.dtype)
    block_n = 64 if q.device.type == "cuda" else 16
    part, num_parts = _split(batch, num_kv_heads, max_context, q.device, partition_size, multiple=block_n)
    split = num_parts > 1
    part_acc, part_ml = _partials(q, num_parts) if split else (out, out)
    group = num_q_heads // num_kv_heads
    lowp = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
    _paged_decode_kernel[(num_parts, num_kv_heads, batch)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1),
        scale * LOG2E, page, group, head_dim, num_q_heads, part, num_parts,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), SPLIT=split, LOWP_DOT=lowp,
        num_warps=4,
    )
    if split:
        _paged_decode_reduce_kernel[(batch, num_q_heads)](
            part_acc, part_ml, context_lens, out, out.stride(0), out.stride(1),
            head_dim, num_q_heads, part, num_parts,
            BLOCK_P=triton.next_power_of_2(num_parts), CHUNK_P=16,
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
        )
    return out.to(q.dtype)


# CUDA kernel limits (csrc/paged_decode_attention.cu): head dims it is compiled for, and 16-byte rows.
CUDA_HEAD_DIMS = (64, 128)


def _aligned16(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


def cuda_unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot take these arguments (None when it can)."""
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"the cuda backend supports head_dim {CUDA_HEAD_DIMS}, got {q.shape[-1]}"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not _aligned16(t):
            return f"the cuda backend needs {name} rows 16-byte aligned (data_ptr and strides), got {t.stride()}"
    return None


@_backend.kernel_op("omni::paged_decode_attention_cuda", mutates_args=(), fake=_paged_decode_attention_fake)
def _paged_decode_attention_cuda(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, partition_size: int = 0,
) -> torch.Tensor:
    batch, num_q_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    max_context = block_tables.shape[1] * page
    if batch == 0:
        return out
    if max_context == 0:
        return out.zero_()
    part, num_parts = _split(batch, num_kv_heads, max_context, q.device, min(partition_size, MAX_PARTITION))
    part_acc, part_ml = _partials(q, num_parts) if num_parts > 1 else (out, out)
    _cuda.ext().paged_decode_attention(
        _cuda.ref(q), _cuda.ref(k_cache), _cuda.ref(v_cache), _cuda.ref(block_tables), _cuda.ref(context_lens),
        _cuda.ref(out), _cuda.ref(part_acc), _cuda.ref(part_ml), float(scale), part, num_parts,
        _cuda.stream(q.device),
    )
    return out


def _torch_impl(q, k_cache, v_cache, block_tables, context_lens, scale, partition_size=0):
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale=scale)


_backend.register(
    "paged_decode_attention",
    torch=_torch_impl,
    triton=_paged_decode_attention_triton if triton is not None else None,
    cuda=_paged_decode_attention_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): faster than Triton at batch 1; Triton wins at
    # batch 8 and 16k tokens.
    prefer=("cuda", "triton", "torch"),
)


# ------------------------------------------------------------------------------------------ validation


def check_paged_kv(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, batch: int, scale,
) -> float:
    """Checks shared by the decode and prefill front doors; returns the softmax scale."""
    device = q.device
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_same_dtype(("q", "k_cache"), q, k_cache)
    check_same_dtype(("q", "v_cache"), q, v_cache)
    check_shape("k_cache", k_cache, (None, None, None, head_dim))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    num_blocks, page, num_kv_heads = k_cache.shape[:3]
    if page == 0 or num_kv_heads == 0:
        raise ValueError(f"k_cache must have at least one token per block and one head, got {tuple(k_cache.shape)}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q's head count ({num_q_heads}) must be a multiple of k_cache's kv head count "
                         f"({num_kv_heads}) for grouped-query attention")
    if head_dim == 0:
        raise ValueError("q must have a non-empty head dim")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    check_shape("block_tables", block_tables, (batch, None))
    check_tensor("context_lens", context_lens, ndim=1, dtypes=(torch.int32,), device=device)
    check_shape("context_lens", context_lens, (batch,))
    if scale is None:
        scale = head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if indices_checkable(context_lens) and batch > 0:
        bound = block_tables.shape[1] * page
        lo, hi = int(context_lens.min()), int(context_lens.max())
        if lo < 0 or hi > bound:
            raise ValueError(f"context_lens values must lie in [0, max_blocks * P = {bound}] (the block table "
                             f"width), got min {lo}, max {hi}")
        if indices_checkable(block_tables):
            used = (torch.arange(block_tables.shape[1], device=device)[None, :]
                    < ((context_lens.long() + page - 1) // page)[:, None])
            vals = block_tables[used]
            if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= num_blocks):
                raise ValueError(f"block_tables entries in use must lie in [0, {num_blocks}) (cache blocks), got "
                                 f"min {int(vals.min())}, max {int(vals.max())}")
    return float(scale)


def pick_backend(op: str, device: torch.device, backend: str | None, unsupported: str | None) -> str:
    """Resolves the backend; with ``backend=None`` a CUDA kernel that cannot take the shape gives way to the
    next preferred one (an explicit ``backend="cuda"`` raises instead)."""
    name = _backend.resolve(op, device, backend)
    if name == "cuda" and unsupported is not None:
        if (backend or os.environ.get("OMNI_BACKEND")) == "cuda":
            raise ValueError(f"{op}: {unsupported}")
        name = "triton" if "triton" in _backend.available(op, device) else "torch"
    return name


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV cache; returns (B, Hq, D) in q's dtype.

    q: (B, Hq, D), last dim contiguous (strided views accepted); k_cache, v_cache: (NB, P, Hk, D), Hq % Hk == 0;
    block_tables: (B, max_blocks) int32; context_lens: (B,) int32, the cached tokens to attend (the current
    token included, already stored); 0 marks a padded slot whose output is zeros. ``scale`` defaults to D**-0.5.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    batch = q.shape[0]
    scale = check_paged_kv(q, k_cache, v_cache, block_tables, context_lens, batch, scale)
    unsupported = cuda_unsupported(q, k_cache, v_cache) if q.device.type == "cuda" else None
    name = pick_backend("paged_decode_attention", q.device, backend, unsupported)
    return _backend.dispatch("paged_decode_attention", q.device, name)(
        q, k_cache, v_cache, block_tables, context_lens, scale
    )
