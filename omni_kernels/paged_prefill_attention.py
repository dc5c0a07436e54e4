"""paged_prefill_attention: causal attention of new tokens over their whole paged context.

Used by the Thinker and the Talker for prompt prefill, chunked prefill and prefix reuse (omni_model/engine):
sequence ``b`` brings ``n_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` new query tokens, which are the LAST
``n_b`` tokens of its context of ``context_lens[b]`` tokens; their keys and values are already in the cache
(store_kv_cache ran first). New token ``j`` (0-based) sits at position ``context_lens[b] - n_b + j`` and sees
the cached positions ``0 ..`` that position, inclusive. ``n_b == context_lens[b]`` is a plain prefill,
``n_b < context_lens[b]`` a chunk over a cached prefix. Grouped-query attention by ``Hq // Hk``.

Shapes: q (T, Hq, D) packed new tokens, last dim contiguous; k_cache, v_cache (NB, P, Hk, D);
block_tables (B, max_blocks) int32; cu_seqlens_q (B + 1,) int32; context_lens (B,) int32;
output (T, Hq, D) in q's dtype.

Kernels: one program per (tile of BLOCK_M new tokens of one sequence, query head), online softmax over key
tiles gathered through the block table; the tiles are laid out as ``cu_seqlens_q[b] // BLOCK_M + b + j``
so that the grid (T // BLOCK_M + B tiles) is known on the host without reading cu_seqlens_q, and a program
finds its sequence by binary search. Key tiles wholly below the causal diagonal run without masks.
"""

from __future__ import annotations

import torch

from omni_kernels import _backend, _cuda
from omni_kernels._checks import FLOAT_DTYPES, check_tensor, indices_checkable
from omni_kernels.paged_decode_attention import (
    LOG2E,
    check_paged_kv,
    cuda_unsupported,
    pick_backend,
    store_dtype,
)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain torch reference (the oracle): per sequence, gathers the context and runs causal softmax
    attention in fp32 (fp64 for fp64 inputs)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    bounds = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        s0, s1 = bounds[b], bounds[b + 1]
        n = s1 - s0
        if n == 0:
            continue
        blocks = block_tables[b, : -(-ctx // page)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].to(compute)  # (ctx, Hk, D)
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].to(compute)
        k = k.repeat_interleave(group, dim=1)  # (ctx, Hq, D)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q[s0:s1].to(compute), k) * scale  # (Hq, n, ctx)
        pos = torch.arange(ctx - n, ctx, device=q.device)
        visible = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]  # (n, ctx): this sequence only
        scores = scores.masked_fill(~visible, float("-inf"))
        out[s0:s1] = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v)
    return out.to(q.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

if triton is not None:

    @triton.jit
    def _attend_tile(
        q, acc, m_i, l_i, n0, pos, kv_end, b, kv_head64,
        k_cache_ptr, v_cache_ptr, bt_ptr, d, d_mask,
        kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h, bt_stride_b,
        scale_log2, page_size,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, LOWP_DOT: tl.constexpr,
    ):
        t = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            t_mask = t < kv_end
            kv_mask = t_mask[:, None] & d_mask[None, :]
        else:
            t_mask = t >= 0
            kv_mask = d_mask[None, :]
        block = tl.load(bt_ptr + b * bt_stride_b + t // page_size, mask=t_mask, other=0).to(tl.int64)
        offset = (t % page_size).to(tl.int64)
        k = tl.load(k_cache_ptr + block[:, None] * kc_stride_b + offset[:, None] * kc_stride_p
                    + kv_head64 * kc_stride_h + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * vc_stride_b + offset[:, None] * vc_stride_p
                    + kv_head64 * vc_stride_h + d[None, :], mask=kv_mask, other=0.0)
        if LOWP_DOT:
            s = tl.dot(q, tl.trans(k))  # bf16/fp16 operands, fp32 accumulation: exact products
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        s = s * scale_log2
        if MASKED:
            s = tl.where(t[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if LOWP_DOT:
            # p = hi + lo in the low precision (to ~2^-17): P @ V on tensor cores without rounding p to 8 bits.
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            acc = tl.dot(p_hi, v, acc)
            acc = tl.dot(p_lo, v, acc)
        else:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        return acc, m_new, l_i

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr,
        q_stride_t, q_stride_h, kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h,
        bt_stride_b, o_stride_t, o_stride_h,
        scale_log2, page_size, group_size, head_dim, num_seqs,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LOWP_DOT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        # Sequence of this tile: the largest b with cu[b] // BLOCK_M + b <= pid (strictly increasing in b).
        lo = pid * 0
        hi = lo + num_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            take = tl.load(cu_ptr + mid) // BLOCK_M + mid <= pid
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
        b = lo.to(tl.int64)
        seq_start = tl.load(cu_ptr + b)
        n = tl.load(cu_ptr + b + 1) - seq_start
        i0 = (pid - (seq_start // BLOCK_M + lo)) * BLOCK_M
        rows = tl.minimum(n - i0, BLOCK_M)  # <= 0: a spare tile of the layout, nothing to do
        ctx = tl.load(ctx_ptr + b)

        offs_m = i0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n
        # Rows past the sequence end take the last row's position: finite maths, never stored.
        pos = ctx - n + tl.minimum(offs_m, n - 1)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        tok = (seq_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * q_stride_t + h.to(tl.int64) * q_stride_h + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if not LOWP_DOT:
            q = q.to(tl.float32)

        kv_head64 = (h // group_size).to(tl.int64)
        kv_end = tl.where(rows > 0, ctx - n + i0 + rows, 0)  # keys [0, kv_end) feed this tile
        full_end = tl.where(rows > 0, ((ctx - n + i0 + 1) // BLOCK_N) * BLOCK_N, 0)  # seen by every row
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, n0, pos, kv_end, b, kv_head64, k_cache_ptr, v_cache_ptr, bt_ptr, d, d_mask,
                kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h, bt_stride_b,
                scale_log2, page_size, BLOCK_N=BLOCK_N, MASKED=False, LOWP_DOT=LOWP_DOT)
        for n0 in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, n0, pos, kv_end, b, kv_head64, k_cache_ptr, v_cache_ptr, bt_ptr, d, d_mask,
                kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h, bt_stride_b,
                scale_log2, page_size, BLOCK_N=BLOCK_N, MASKED=True, LOWP_DOT=LOWP_DOT)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * o_stride_t + h.to(tl.int64) * o_stride_h + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def num_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """Programs along the token axis: tile j of sequence b is program ``cu[b] // block_m + b + j``."""
    return num_tokens // block_m + num_seqs


def _paged_prefill_attention_fake(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    return q.new_empty(q.shape)


@_backend.kernel_op("omni::paged_prefill_attention_triton", mutates_args=(), fake=_paged_prefill_attention_fake)
def _paged_prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=store_dtype(q), device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out.to(q.dtype)
    on_gpu = q.device.type == "cuda"
    block_m, block_n = (64, 64) if on_gpu else (16, 16)
    block_d = max(16, triton.next_power_of_2(head_dim))
    lowp = on_gpu and q.dtype in (torch.float16, torch.bfloat16)
    _paged_prefill_kernel[(num_tiles(num_tokens, num_seqs, block_m), num_q_heads)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1),
        scale * LOG2E, page, num_q_heads // num_kv_heads, head_dim, num_seqs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, LOWP_DOT=lowp,
        num_warps=4 if block_d <= 64 else 8, num_stages=2,
    )
    return out.to(q.dtype)


CUDA_BLOCK_M = 64  # query tokens per CTA in csrc/paged_prefill_attention.cu


@_backend.kernel_op("omni::paged_prefill_attention_cuda", mutates_args=(), fake=_paged_prefill_attention_fake)
def _paged_prefill_attention_cuda(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or context_lens.shape[0] == 0:
        return out
    _cuda.ext().paged_prefill_attention(
        _cuda.ref(q), _cuda.ref(k_cache), _cuda.ref(v_cache), _cuda.ref(block_tables), _cuda.ref(cu_seqlens_q),
        _cuda.ref(context_lens), _cuda.ref(out), float(scale), _cuda.stream(q.device),
    )
    return out


def _torch_impl(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=scale)


_backend.register(
    "paged_prefill_attention",
    torch=_torch_impl,
    triton=_paged_prefill_attention_triton if triton is not None else None,
    cuda=_paged_prefill_attention_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-model.json): 2048 new tokens at the 7B shape took
    # 0.42 ms in Triton and 0.85 ms in CUDA (0.0 cached), 2.5 vs 4.5 ms over 6144 cached: Triton first.
    prefer=("triton", "cuda", "torch"),
)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their whole paged context; returns (T, Hq, D) in q's dtype.

    q: (T, Hq, D), last dim contiguous; sequence b owns rows ``cu_seqlens_q[b] : cu_seqlens_q[b+1]``, the last
    ``n_b`` tokens of its ``context_lens[b]`` cached tokens (n_b <= context_lens[b]); new token j sees positions
    ``0 .. context_lens[b] - n_b + j``. k_cache, v_cache: (NB, P, Hk, D), Hq % Hk == 0; block_tables:
    (B, max_blocks) int32; cu_seqlens_q: (B + 1,) int32 from 0 to T; context_lens: (B,) int32.
    ``scale`` defaults to D**-0.5.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens_q.shape[0] == 0:
        raise ValueError("cu_seqlens_q must have shape (B + 1,), got (0,)")
    batch = cu_seqlens_q.shape[0] - 1
    scale = check_paged_kv(q, k_cache, v_cache, block_tables, context_lens, batch, scale)
    if indices_checkable(cu_seqlens_q):
        cu = cu_seqlens_q.long()
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0]:
            raise ValueError(f"cu_seqlens_q must start at 0 and end at T = {q.shape[0]}, got {int(cu[0])} and "
                             f"{int(cu[-1])}")
        lens = cu[1:] - cu[:-1]
        if batch and int(lens.min()) < 0:
            raise ValueError("cu_seqlens_q must be non-decreasing")
        if indices_checkable(context_lens) and batch:
            over = lens > context_lens.long()
            if bool(over.any()):
                b = int(over.nonzero()[0, 0])
                raise ValueError(f"sequence {b} has {int(lens[b])} new tokens (cu_seqlens_q) but context_lens[{b}] "
                                 f"= {int(context_lens[b])}: the new tokens are part of the context, so n_b <= "
                                 f"context_lens[b]")
    unsupported = None
    if q.device.type == "cuda":
        unsupported = cuda_unsupported(q, k_cache, v_cache)
        if unsupported is None and not (q.data_ptr() % 16 == 0
                                        and all((s * q.element_size()) % 16 == 0 for s in q.stride()[:-1])):
            unsupported = f"the cuda backend needs q rows 16-byte aligned (data_ptr and strides), got {q.stride()}"
    name = pick_backend("paged_prefill_attention", q.device, backend, unsupported)
    return _backend.dispatch("paged_prefill_attention", q.device, name)(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale
    )
