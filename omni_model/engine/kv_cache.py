"""The paged KV cache of one decoder: one tensor per layer pair, sized from free GPU memory.

Layout per layer: k_cache, v_cache (NB, P, Hk, D), the layout every paged kernel reads. The cache binds itself
to the decoder's :class:`~omni_model.layers.attention.PagedAttention` modules (their ``k_cache``/``v_cache``
attributes), so model code never sees where the memory came from.
"""

from __future__ import annotations

import torch
from torch import nn


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def blocks_for_budget(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_fraction: float,
    max_tokens: int | None,
) -> int:
    """How many blocks fit: ``memory_fraction`` of the device's free memory on CUDA, capped by ``max_tokens``
    (required on CPU, where there is no free-memory figure to size from)."""
    per_block = bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
    cap = None if max_tokens is None else -(-max_tokens // block_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fit = int(free * memory_fraction) // per_block
        blocks = fit if cap is None else min(fit, cap)
    else:
        if cap is None:
            raise ValueError("max_tokens is required for a KV cache on CPU")
        blocks = cap
    if blocks <= 0:
        raise RuntimeError(
            f"no room for a KV cache: one block of {block_size} tokens needs {per_block / 2**20:.1f} MiB"
        )
    return blocks


class KVCache:
    """K/V tensors for every attention layer of one decoder, bound to its PagedAttention modules."""

    def __init__(
        self,
        attention_layers: list[nn.Module],
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if not attention_layers:
            raise ValueError("attention_layers must not be empty")
        first = attention_layers[0]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        shape = (len(attention_layers), 2, num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = attention_layers
        for i, layer in enumerate(attention_layers):
            layer.k_cache, layer.v_cache = self.storage[i, 0], self.storage[i, 1]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def release(self) -> None:
        """Unbinds the cache from the layers and drops the memory."""
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None
        self.storage = None
