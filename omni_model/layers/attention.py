"""Attention modules. Every score computation goes through an ``omni_kernels`` front door: never a dense T x T mask.

* :class:`VisionAttention`: ViT self-attention over packed patches, inside windows or whole frames
  (``window_attention`` over the given cu_seqlens), 2-D rotary applied in fp32.
* :class:`AudioAttention`: Whisper-style self-attention inside each 2 s chunk (``window_attention``).
* :class:`PagedAttention` + :class:`DecoderAttention`: the causal Qwen2 decoder attention of the Thinker and the
  Talker over a paged KV cache, driven by the per-step :mod:`omni_model.layers.context`.

Packed shapes: T tokens, hidden -> (T, hidden).
"""

from __future__ import annotations

import torch
from torch import nn

from omni_kernels import (
    apply_tmrope,
    paged_decode_attention,
    paged_prefill_attention,
    store_kv_cache,
    tmrope_store_kv,
    window_attention,
)
from omni_model.layers.backend import get_backend
from omni_model.layers.context import get_context
from omni_model.layers.mlp import MergedLinear
from omni_model.layers.rotary import apply_rotary_half


class VisionAttention(nn.Module):
    """ViT attention: fused ``qkv`` (with bias; loaded from the checkpoint's ``q``/``k``/``v``), rotary, ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = MergedLinear(dim, [dim, dim, dim], bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, rotary_angles: torch.Tensor
    ) -> torch.Tensor:
        """x (T, dim); cu_seqlens (S+1,) int32 segments; rotary_angles (T, head_dim // 2) fp32."""
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        q = apply_rotary_half(q, rotary_angles)
        k = apply_rotary_half(k, rotary_angles)
        out = window_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen, backend=get_backend())
        return self.proj(out.reshape(t, -1))


class AudioAttention(nn.Module):
    """Whisper attention (``k_proj`` has no bias, as in the checkpoint) inside segments of packed frames."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x (T, dim); cu_seqlens (S+1,) int32: the 2 s chunks of every audio."""
        t = x.shape[0]
        shape = (t, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        out = window_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen, backend=get_backend())
        return self.out_proj(out.reshape(t, -1))


class PagedAttention(nn.Module):
    """Rotates q and k by TMRoPE, stores k and v in the paged cache, then attends over each sequence's context.

    Prefill: ``apply_tmrope`` + ``store_kv_cache`` + ``paged_prefill_attention`` (causal over the cached context);
    decode: the fused ``tmrope_store_kv`` (one launch for the small batch) + ``paged_decode_attention``.
    The cache and the step's metadata come from :func:`omni_model.layers.context.get_context`; this layer reads the
    cache tensors of its ``layer_index``.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, *, mrope_section: list[int], rope_theta: float,
        layer_index: int,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"sum(mrope_section) = {sum(mrope_section)} must be head_dim / 2 = {head_dim // 2}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.mrope_section = list(mrope_section)
        self.rope_theta = rope_theta
        self.scale = head_dim**-0.5
        self.layer_index = layer_index

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hk, D) (strided views are fine; q and k are rotated in place), positions (3, T)
        -> (T, Hq, D). In decode T is the batch (one token per sequence)."""
        ctx = get_context()
        k_cache, v_cache = ctx.kv_cache.layer(self.layer_index)
        backend = get_backend()
        rope = dict(mrope_section=self.mrope_section, rope_theta=self.rope_theta, backend=backend)
        if ctx.is_prefill:
            apply_tmrope(q, k, positions, **rope)
            store_kv_cache(k, v, k_cache, v_cache, ctx.slot_mapping, backend=backend)
            return paged_prefill_attention(
                q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.context_lens,
                scale=self.scale, backend=backend,
            )
        tmrope_store_kv(q, k, v, positions, k_cache, v_cache, ctx.slot_mapping, **rope)
        return paged_decode_attention(
            q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale=self.scale, backend=backend
        )


class DecoderAttention(nn.Module):
    """Qwen2 decoder attention: fused ``qkv_proj`` (bias), :class:`PagedAttention` with TMRoPE, ``o_proj``.

    ``qkv_proj`` rows are q (Hq*D), k (Hk*D), v (Hk*D), loaded from the checkpoint's q_proj/k_proj/v_proj.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        mrope_section: list[int],
        rope_theta: float,
        layer_index: int,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv_proj = MergedLinear(
            hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias=True
        )
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.attn = PagedAttention(num_heads, num_kv_heads, head_dim, mrope_section=mrope_section,
                                   rope_theta=rope_theta, layer_index=layer_index)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (T, hidden), positions (3, T) -> (T, hidden)."""
        t = x.shape[0]
        d = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q, k, v = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v.view(t, self.num_kv_heads, d)
        return self.o_proj(self.attn(q, k, v, positions).reshape(t, self.num_heads * d))
