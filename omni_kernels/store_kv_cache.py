"""store_kv_cache: write the keys and values of new tokens into the paged KV cache.

Used by the Thinker and the Talker on every prefill and decode step (omni_model/engine): the token at
position ``i`` goes to ``slot_mapping[i] = block * P + offset``; slot -1 marks a token to skip (padding,
or a token whose cache entry already exists through a shared prefix).

Shapes: k, v (T, Hk, D) with a contiguous last dim (views into a fused QKV output are fine);
k_cache, v_cache (NB, P, Hk, D); slot_mapping (T,) int32 or int64.
"""

from __future__ import annotations

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


def store_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Plain torch reference (the oracle)."""
    page = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // page, slots % page] = k[keep]
    v_cache[slots // page, slots % page] = v[keep]


try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

if triton is not None:

    @triton.jit
    def _store_kv_cache_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h,
        page_size, head_dim,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (token, kv head): a row of D elements, moved as is.
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        block = slot // page_size
        offset = slot % page_size
        d = tl.arange(0, BLOCK_D)
        mask = d < tl.where(slot >= 0, head_dim, 0)  # a skipped token (slot -1) moves nothing
        k = tl.load(k_ptr + token * k_stride_t + head * k_stride_h + d, mask=mask)
        v = tl.load(v_ptr + token * v_stride_t + head * v_stride_h + d, mask=mask)
        tl.store(k_cache_ptr + block * kc_stride_b + offset * kc_stride_p + head * kc_stride_h + d, k, mask=mask)
        tl.store(v_cache_ptr + block * vc_stride_b + offset * vc_stride_p + head * vc_stride_h + d, v, mask=mask)


def _store_kv_cache_fake(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


@_backend.kernel_op("omni::store_kv_cache_triton", mutates_args=("k_cache", "v_cache"), fake=_store_kv_cache_fake)
def _store_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_cache_kernel[(num_tokens, num_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@_backend.kernel_op("omni::store_kv_cache_cuda", mutates_args=("k_cache", "v_cache"), fake=_store_kv_cache_fake)
def _store_kv_cache_cuda(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    _cuda.ext().store_kv_cache(
        _cuda.ref(k), _cuda.ref(v), _cuda.ref(k_cache), _cuda.ref(v_cache), _cuda.ref(slot_mapping),
        _cuda.stream(k.device),
    )


_backend.register(
    "store_kv_cache",
    torch=store_kv_cache_ref,
    triton=_store_kv_cache_triton if triton is not None else None,
    cuda=_store_kv_cache_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): 1.4 TB/s on a 4k-token prefill, 2x Triton.
    prefer=("cuda", "triton", "torch"),
)


def check_store_kv_args(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """The argument checks of :func:`store_kv_cache`, shared with the fused decode op ``tmrope_store_kv``."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    device = k.device
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_shape("v", v, tuple(k.shape))
    check_same_dtype(("k", "v"), k, v)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    num_tokens, num_heads, head_dim = k.shape
    check_shape("k_cache", k_cache, (None, None, num_heads, head_dim))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_same_dtype(("k", "k_cache"), k, k_cache)
    check_same_dtype(("k", "v_cache"), k, v_cache)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    num_blocks, page_size = k_cache.shape[:2]
    check_index_range("slot_mapping", slot_mapping, -1, num_blocks * page_size)


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Writes ``k[i], v[i]`` to slot ``slot_mapping[i]`` of the paged caches, in place; slot -1 is skipped.

    k, v: (T, Hk, D); k_cache, v_cache: (NB, P, Hk, D) of the same dtype; slot_mapping: (T,) int32/int64.
    """
    check_store_kv_args(k, v, k_cache, v_cache, slot_mapping)
    device = k.device
    _backend.dispatch("store_kv_cache", device, backend)(k, v, k_cache, v_cache, slot_mapping)
