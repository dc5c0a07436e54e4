"""tmrope_store_kv: the decode step's fused TMRoPE + KV-cache write (apply_tmrope, then store_kv_cache, in one launch).

Used by the Thinker and the Talker on every decode step (omni_model/engine), where the batch is 1..64 tokens and
two launches cost more than their bytes. Semantics, on every backend:

* q and k are rotated in place exactly as :func:`omni_kernels.apply_tmrope` does (k is rotated in place too, so
  that the caller may still use it, e.g. for a prefill chunk whose attention reads k directly);
* the rotated k row and the v row of token ``i`` go to slot ``slot_mapping[i] = block * P + offset`` of the
  paged caches, as :func:`omni_kernels.store_kv_cache` does; slot -1 skips the cache write (q and k are still
  rotated).

Shapes: q (T, Hq, D), k, v (T, Hk, D), contiguous last dim, any other strides (views into a fused QKV output);
positions (3, T) int32/int64; k_cache, v_cache (NB, P, Hk, D); slot_mapping (T,) int32/int64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omni_kernels import _backend, _cuda
from omni_kernels.apply_tmrope import apply_tmrope_ref, check_tmrope_args, rope_inv_freq
from omni_kernels.store_kv_cache import check_store_kv_args, store_kv_cache_ref


def tmrope_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    mrope_section: Sequence[int],
    rope_theta: float,
) -> None:
    """Plain torch reference (the oracle): the two unfused references, one after the other."""
    apply_tmrope_ref(q, k, positions, mrope_section=mrope_section, rope_theta=rope_theta)
    store_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)


try:
    from omni_kernels.apply_tmrope import launch_tmrope_triton
except ImportError:  # pure-torch install: apply_tmrope defines no Triton launcher
    launch_tmrope_triton = None


def _tmrope_store_kv_fake(q, k, v, positions, k_cache, v_cache, slot_mapping, mrope_section, rope_theta) -> None:
    return None


@_backend.kernel_op(
    "omni::tmrope_store_kv_triton", mutates_args=("q", "k", "k_cache", "v_cache"), fake=_tmrope_store_kv_fake
)
def _tmrope_store_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    mrope_section: list[int],
    rope_theta: float,
) -> None:
    launch_tmrope_triton(q, k, positions, mrope_section, rope_theta, v, k_cache, v_cache, slot_mapping)


@_backend.kernel_op(
    "omni::tmrope_store_kv_cuda", mutates_args=("q", "k", "k_cache", "v_cache"), fake=_tmrope_store_kv_fake
)
def _tmrope_store_kv_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    mrope_section: list[int],
    rope_theta: float,
) -> None:
    inv_freq = rope_inv_freq(q.shape[-1], rope_theta, q.device)
    _cuda.ext().tmrope_store_kv(
        _cuda.ref(q), _cuda.ref(k), _cuda.ref(v), _cuda.ref(positions), _cuda.ref(inv_freq), _cuda.ref(k_cache),
        _cuda.ref(v_cache), _cuda.ref(slot_mapping), mrope_section[0], mrope_section[0] + mrope_section[1],
        _cuda.stream(q.device),
    )


def _tmrope_store_kv_torch(q, k, v, positions, k_cache, v_cache, slot_mapping, mrope_section, rope_theta) -> None:
    tmrope_store_kv_ref(q, k, v, positions, k_cache, v_cache, slot_mapping, mrope_section=mrope_section,
                        rope_theta=rope_theta)


_backend.register(
    "tmrope_store_kv",
    torch=_tmrope_store_kv_torch,
    triton=_tmrope_store_kv_triton if launch_tmrope_triton is not None else None,
    cuda=_tmrope_store_kv_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): faster than Triton and the unfused pair at batch 1-64.
    prefer=("cuda", "triton", "torch"),
)


def tmrope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    mrope_section: Sequence[int],
    rope_theta: float,
    backend: str | None = None,
) -> None:
    """Rotates q and k in place by TMRoPE and writes the rotated k and v to the paged caches (slot -1 skipped).

    q: (T, Hq, D), k, v: (T, Hk, D) of one float dtype; positions: (3, T) int32/int64; k_cache, v_cache:
    (NB, P, Hk, D) of the same dtype; slot_mapping: (T,) int32/int64 in [-1, NB * P). mrope_section and rope_theta
    as for :func:`omni_kernels.apply_tmrope`.
    """
    sections, theta = check_tmrope_args(q, k, positions, mrope_section, rope_theta)
    check_store_kv_args(k, v, k_cache, v_cache, slot_mapping)
    device = q.device
    _backend.dispatch("tmrope_store_kv", device, backend)(
        q, k, v, positions, k_cache, v_cache, slot_mapping, sections, theta
    )
