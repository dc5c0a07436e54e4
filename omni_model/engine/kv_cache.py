"""The paged KV cache of one decoder, sized from a token or memory budget.

Layout: one tensor ``storage`` (layers, 2, NB, P, Hk, D); layer i reads ``storage[i, 0]`` / ``storage[i, 1]``, the
(NB, P, Hk, D) layout every paged kernel takes. The cache is handed to the decoder's attention layers through the
step's :class:`~omni_model.layers.context.AttentionMetadata` (``kv_cache``), never bound to the modules: two caches
(the engine's and a transient one for ``thinker_logits``) serve the same model without touching each other.

``hidden_size`` adds a store of the decoder's final hidden state per cache slot ((NB * P + 1, hidden); the last row
is scratch for padded decode rows). The Thinker's cache keeps one so that the Talker's prompt, which is built from
the Thinker's hidden state of every prompt token, can be assembled also for tokens whose KV came from the prefix
cache (a conversation's earlier turns).
"""

from __future__ import annotations

import torch


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    hidden_size: int = 0) -> int:
    """Cache bytes one token takes: K and V of every layer, plus the hidden-state store when there is one."""
    return (2 * num_layers * num_kv_heads * head_dim + hidden_size) * element_size(dtype)


class KVCache:
    """K/V tensors (and optionally final hidden states) for every attention layer of one decoder."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, hidden_size: int = 0) -> None:
        if num_layers <= 0 or num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_layers, num_blocks and block_size must be positive, got {num_layers}, "
                             f"{num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.hidden = (torch.zeros(num_blocks * block_size + 1, hidden_size, dtype=dtype, device=device)
                       if hidden_size else None)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer ``index``, each (NB, P, Hk, D)."""
        return self.storage[index, 0], self.storage[index, 1]

    @property
    def scratch_slot(self) -> int:
        """The hidden store's row for padded decode rows (slot -1)."""
        return self.num_blocks * self.block_size

    def store_hidden(self, hidden: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Writes hidden (T, hidden) at the slots of ``slot_mapping`` (T,) (-1: the scratch row). No host sync."""
        if self.hidden is None:
            return
        slots = slot_mapping.long()
        slots = torch.where(slots < 0, torch.full_like(slots, self.scratch_slot), slots)
        self.hidden.index_copy_(0, slots, hidden.to(self.hidden.dtype))

    def read_hidden(self, slots: torch.Tensor) -> torch.Tensor:
        """The stored hidden states at ``slots`` (T,) -> (T, hidden)."""
        if self.hidden is None:
            raise RuntimeError("this KV cache keeps no hidden states")
        return self.hidden.index_select(0, slots.long())

    @property
    def nbytes(self) -> int:
        extra = 0 if self.hidden is None else self.hidden.numel() * self.hidden.element_size()
        return self.storage.numel() * self.storage.element_size() + extra
