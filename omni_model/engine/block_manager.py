"""Block manager for the paged KV cache: a free list, reference counts and shared prompt prefixes.

Pure Python, no tensors: it hands out block ids; the runner turns them into block tables and slot mappings.

A full block is identified by a chained hash of its tokens and the hash of the block before it, so two
requests whose prompts start alike share the blocks of the common prefix (reference counted). The hash
covers a per-request ``salt`` from the first block that holds media onwards: media tokens are placeholders
(one id per image patch), so equal ids do not mean equal content there. TMRoPE positions depend only on
the tokens before them, so a shared prefix also has equal positions.

A request that needs more blocks than are free gets :class:`CacheFullError` and nothing changes: other
requests keep their blocks.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


class CacheFullError(RuntimeError):
    """The KV cache has too few free blocks for this request."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


@dataclass
class SeqBlocks:
    """What the block manager knows of one sequence."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_cached_tokens: int = 0  # tokens whose KV entries came from shared prefix blocks
    block_hashes: list[bytes] = field(default_factory=list)


def block_hash(prev: bytes | None, tokens: Sequence[int], salt: bytes | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"\0")
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens))
    if salt:
        h.update(salt)
    return h.digest()


class BlockManager:
    """Allocates fixed-size blocks of ``block_size`` tokens out of ``num_blocks``."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------- internals

    def _take_free(self) -> int:
        block_id = self.free.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"block {block_id} on the free list with {block.ref_count} references"
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]  # its old content is overwritten now
        block.hash = None
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than it was taken")
        block.ref_count -= 1
        if block.ref_count == 0:
            # Cached full blocks go to the back: they stay reusable by hash for as long as possible.
            self.free.append(block_id)

    def _prefix_hashes(self, token_ids: Sequence[int], media_start: int | None, salt: bytes | None) -> list[bytes]:
        hashes, prev = [], None
        for i in range(len(token_ids) // self.block_size):
            lo, hi = i * self.block_size, (i + 1) * self.block_size
            use_salt = salt if media_start is not None and hi > media_start else None
            prev = block_hash(prev, token_ids[lo:hi], use_salt)
            hashes.append(prev)
        return hashes

    # --------------------------------------------------------------------------------------------- public

    def allocate(
        self,
        token_ids: Sequence[int],
        *,
        media_start: int | None = None,
        salt: bytes | None = None,
        reuse_prefix: bool = True,
    ) -> SeqBlocks:
        """Blocks for a new prompt. Reuses cached full blocks of an equal prefix.

        ``media_start``: index of the first media placeholder token (None: text only); ``salt``: bytes that
        identify the media content (e.g. a hash of the features), mixed into the hashes from that block on.
        The last prompt block is never shared even when full, so that the prefill always computes at least
        one token (its logits start decoding). ``reuse_prefix=False`` computes every token (a caller that needs
        the hidden states of the whole prompt) but still registers the blocks for later requests.
        """
        num_tokens = len(token_ids)
        if num_tokens == 0:
            raise ValueError("token_ids must not be empty")
        hashes = self._prefix_hashes(token_ids, media_start, salt) if self.enable_prefix_caching else []
        reuse: list[int] = []
        for i, h in enumerate(hashes if reuse_prefix else []):
            if (i + 1) * self.block_size >= num_tokens:
                break
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            reuse.append(block_id)
        needed = self.blocks_needed(num_tokens) - len(reuse)
        # Reused blocks that sit on the free list (ref 0) are taken from it, so they count against it.
        revived = sum(1 for b in reuse if self.blocks[b].ref_count == 0)
        if needed + revived > len(self.free):
            raise CacheFullError(
                f"KV cache full: the prompt of {num_tokens} tokens needs {needed + revived} free blocks of "
                f"{self.block_size} tokens, {len(self.free)} are free"
            )
        seq = SeqBlocks(num_tokens=num_tokens, num_cached_tokens=len(reuse) * self.block_size)
        for block_id in reuse:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free.remove(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(needed):
            seq.block_table.append(self._take_free())
        # Register the new full blocks so later prompts can share them.
        for i in range(len(reuse), len(hashes)):
            self._register(seq.block_table[i], hashes[i])
        seq.block_hashes = hashes
        return seq

    def _register(self, block_id: int, h: bytes) -> None:
        self.blocks[block_id].hash = h
        self.hash_to_block[h] = block_id

    def can_append(self, seq: SeqBlocks, num_new_tokens: int = 1) -> bool:
        return self.blocks_needed(seq.num_tokens + num_new_tokens) - len(seq.block_table) <= len(self.free)

    def append(self, seq: SeqBlocks, num_new_tokens: int = 1) -> None:
        """Makes room for ``num_new_tokens`` more tokens (a decode step): takes new blocks when needed."""
        extra = self.blocks_needed(seq.num_tokens + num_new_tokens) - len(seq.block_table)
        if extra > len(self.free):
            raise CacheFullError(
                f"KV cache full: the sequence of {seq.num_tokens} tokens needs {extra} more blocks, "
                f"{len(self.free)} are free"
            )
        for _ in range(extra):
            seq.block_table.append(self._take_free())
        seq.num_tokens += num_new_tokens

    def free_seq(self, seq: SeqBlocks) -> None:
        """Returns the sequence's blocks (shared ones lose one reference). Idempotent."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_tokens = 0

    def slot(self, seq: SeqBlocks, position: int) -> int:
        """The cache slot of token ``position`` of ``seq``."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def check_invariants(self) -> None:
        """Every block is either free with no references or referenced and not free (used by tests)."""
        free = set(self.free)
        if len(free) != len(self.free):
            raise AssertionError("a block is on the free list twice")
        for block in self.blocks:
            if block.ref_count < 0:
                raise AssertionError(f"block {block.block_id} has {block.ref_count} references")
            if (block.ref_count == 0) != (block.block_id in free):
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count}, on the free list: {block.block_id in free}"
                )
