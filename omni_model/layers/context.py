"""Per-step attention metadata for the paged-KV decoders (the Thinker's LM and the Talker).

One object per forward step, set around the decoder call and read by every attention layer, instead of threading
block tables through every signature (nano-vllm's ``utils/context.py``). It also carries the KV cache itself, so
no module holds cache tensors: the engine's cache and a transient one can serve the same model. Shapes (B sequences
in the step, T new tokens packed, P tokens per cache block):

* ``kv_cache``: the decoder's :class:`~omni_model.engine.kv_cache.KVCache`; layer i reads ``kv_cache.layer(i)``.
* ``cu_seqlens_q`` (B+1,) int32: new-token offsets of each sequence in the packed batch (prefill).
* ``slot_mapping`` (T,) int64: cache slot ``block * P + offset`` of each new token (-1: do not store).
* ``block_tables`` (B, max_blocks) int32: the cache blocks of each sequence, in order.
* ``context_lens`` (B,) int32: tokens of each sequence in the cache after this step (cached + new).

The runner (:mod:`omni_model.engine.runner`) builds the metadata on the host from its block manager.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """What a paged attention layer needs to store new keys/values and attend (see module docstring)."""

    is_prefill: bool
    kv_cache: Any  # KVCache (typed loosely: layers must not import the engine)
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 0


_context: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar("omni_attn_ctx", default=None)


def get_context() -> AttentionMetadata:
    """The metadata of the current step; a RuntimeError when none was set (attention outside a step)."""
    meta = _context.get()
    if meta is None:
        raise RuntimeError("no attention metadata set: run the decoder through a DecoderRunner "
                           "(omni_model.engine.runner), which sets it with attention_context(...)")
    return meta


@contextlib.contextmanager
def attention_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Sets ``meta`` for the body and restores the previous metadata afterwards."""
    token = _context.set(meta)
    try:
        yield meta
    finally:
        _context.reset(token)
