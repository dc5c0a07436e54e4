"""Per-step attention metadata for the paged-KV decoders (Thinker, later the Talker).

One object per forward step, set before the step and read by every attention layer, instead of threading
block tables through every signature (nano-vllm's ``utils/context.py``). Shapes (B sequences in the step,
T new tokens packed, P tokens per cache page):

* ``cu_seqlens_q`` (B+1,) int32: new-token offsets of each sequence in the packed batch (prefill).
* ``slot_mapping`` (T,) int32/int64: cache slot ``block * P + offset`` of each new token (-1: do not store).
* ``block_tables`` (B, max_blocks) int32: the cache blocks of each sequence, in order.
* ``context_lens`` (B,) int32: tokens of each sequence in the cache after this step (cached + new).

The helpers at the bottom build metadata from sequence lengths and block tables (host-side index math). The
engine has its own block manager; :func:`consecutive_block_tables` is only the transient layout that
``OmniModel.thinker_logits`` uses when no engine owns a cache.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """What a paged attention layer needs to store new keys/values and attend (see module docstring)."""

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 0

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])


_context: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar("omni_attn_ctx", default=None)


def set_context(meta: AttentionMetadata) -> None:
    _context.set(meta)


def get_context() -> AttentionMetadata:
    """The metadata of the current step; a RuntimeError when none was set (attention outside a step)."""
    meta = _context.get()
    if meta is None:
        raise RuntimeError("no attention metadata set: wrap the decoder call in attention_context(...)")
    return meta


def reset_context() -> None:
    _context.set(None)


@contextlib.contextmanager
def attention_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Sets ``meta`` for the body and restores the previous metadata afterwards."""
    token = _context.set(meta)
    try:
        yield meta
    finally:
        _context.reset(token)


def consecutive_block_tables(seq_lens: Sequence[int], page_size: int, device=None) -> tuple[torch.Tensor, int]:
    """Block tables giving each sequence its own consecutive run of blocks: ((B, max_blocks) int32, total blocks).

    Unused table entries are 0 (never read: the kernels stop at ``context_lens``).
    """
    lens = torch.as_tensor(list(seq_lens), dtype=torch.int64)
    blocks = (lens + page_size - 1) // page_size
    starts = torch.cumsum(blocks, 0) - blocks
    width = max(int(blocks.max()) if len(lens) else 0, 1)
    col = torch.arange(width)
    tables = torch.where(col[None, :] < blocks[:, None], starts[:, None] + col[None, :], 0)
    return tables.to(device=device, dtype=torch.int32), int(blocks.sum())


def slots_for(block_tables: torch.Tensor, start: torch.Tensor, end: torch.Tensor, page_size: int) -> torch.Tensor:
    """Cache slots of positions [start[b], end[b]) of every sequence b, packed in order: (sum(end - start),) int64."""
    block_tables = block_tables.long()
    start, end = start.to(block_tables.device).long(), end.to(block_tables.device).long()
    n = end - start
    seq = torch.repeat_interleave(torch.arange(len(n), device=block_tables.device), n)
    first = torch.cumsum(n, 0) - n
    pos = torch.arange(int(n.sum()), device=block_tables.device) - first[seq] + start[seq]
    return block_tables[seq, pos // page_size] * page_size + pos % page_size


def prefill_metadata(
    new_lens: Sequence[int],
    block_tables: torch.Tensor,
    page_size: int,
    cached_lens: Sequence[int] | None = None,
) -> AttentionMetadata:
    """Metadata for a prefill of ``new_lens[b]`` tokens per sequence after ``cached_lens[b]`` already cached."""
    device = block_tables.device
    new = torch.as_tensor(list(new_lens), dtype=torch.int64)
    cached = torch.zeros_like(new) if cached_lens is None else torch.as_tensor(list(cached_lens), dtype=torch.int64)
    total = cached + new
    cu = torch.zeros(len(new) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(new, 0)
    return AttentionMetadata(
        is_prefill=True,
        slot_mapping=slots_for(block_tables, cached, total, page_size),
        block_tables=block_tables,
        context_lens=total.to(device=device, dtype=torch.int32),
        cu_seqlens_q=cu.to(device),
        max_seqlen_q=int(new.max()) if len(new) else 0,
    )


def decode_metadata(context_lens: Sequence[int], block_tables: torch.Tensor, page_size: int) -> AttentionMetadata:
    """Metadata for one new token per sequence; ``context_lens[b]`` counts that token (cached + 1)."""
    device = block_tables.device
    lens = torch.as_tensor(list(context_lens), dtype=torch.int64)
    return AttentionMetadata(
        is_prefill=False,
        slot_mapping=slots_for(block_tables, lens - 1, lens, page_size),
        block_tables=block_tables,
        context_lens=lens.to(device=device, dtype=torch.int32),
        cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32, device=device),
        max_seqlen_q=1,
    )
