"""Block manager for the paged KV cache: a free list, reference counts and shared prompt prefixes.

Pure Python, no tensors: it hands out block ids; the runner turns them into block tables and slot mappings.

A full block is identified by a chained hash (:func:`hash_blocks`) of its tokens, the hash of the block before it
and the content digest of every media item whose placeholder tokens lie in it: media tokens are placeholders (one
id per audio frame or image patch), so equal ids do not mean equal content. Two requests whose prompts start alike
(a conversation's next turn, a shared system prompt) share the blocks of the common prefix, reference counted.
TMRoPE positions depend only on the tokens before them, so a shared prefix also has equal positions.

A freed block keeps its hash and goes to the back of the free list: it can be revived by a later equal prefix
until it is handed out again (an evictable block counts as free). A request that needs more blocks than are free
gets :class:`CacheFullError` and nothing changes.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
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
    num_tokens: int = 0  # tokens with a reserved slot
    num_cached_tokens: int = 0  # leading tokens whose KV entries came from shared prefix blocks


def block_hash(prev: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"\0")
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens))
    h.update(extra)
    return h.digest()


def hash_blocks(token_ids: Sequence[int], block_size: int, *, extra: Callable[[int, int], bytes] | None = None,
                prev: Sequence[bytes] = ()) -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids`` after the ``len(prev)`` blocks already hashed in ``prev``
    (which are not repeated in the result). ``extra(lo, hi)``: the media digests of tokens [lo, hi)."""
    out, last = [], (prev[-1] if prev else None)
    for i in range(len(prev), len(token_ids) // block_size):
        lo, hi = i * block_size, (i + 1) * block_size
        last = block_hash(last, token_ids[lo:hi], extra(lo, hi) if extra is not None else b"")
        out.append(last)
    return out


class BlockManager:
    """Allocates fixed-size blocks of ``block_size`` tokens out of ``num_blocks``."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (evictable cached blocks included)."""
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

    def _prefix_hits(self, num_tokens: int, hashes: Sequence[bytes], max_tokens: int | None) -> list[int]:
        """Cached blocks of the longest equal prefix; never the block holding the last token (the prefill must
        compute at least one token), never past ``max_tokens``."""
        if not self.enable_prefix_caching:
            return []
        limit = num_tokens - 1 if max_tokens is None else min(num_tokens - 1, max_tokens)
        hits = []
        for i, h in enumerate(hashes):
            if (i + 1) * self.block_size > limit:
                break
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # --------------------------------------------------------------------------------------------- public

    def free_blocks_needed(self, num_tokens: int, hashes: Sequence[bytes] = (), *,
                           max_reuse_tokens: int | None = None) -> int:
        """Free blocks :meth:`allocate` would take for this prompt (shared blocks that sit on the free list count)."""
        hits = self._prefix_hits(num_tokens, hashes, max_reuse_tokens)
        return self.blocks_needed(num_tokens) - len(hits) + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def allocate(self, num_tokens: int, hashes: Sequence[bytes] = (), *,
                 max_reuse_tokens: int | None = None) -> SeqBlocks:
        """Blocks for a new sequence of ``num_tokens`` tokens; reuses cached blocks of an equal prefix.

        ``hashes``: :func:`hash_blocks` of (a prefix of) its tokens, to look up the prefix; ``max_reuse_tokens``
        caps the reused prefix (0: compute everything). New blocks become shareable only through :meth:`register`,
        once their KV has been written (a chunked prefill writes them over several steps).
        """
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        hits = self._prefix_hits(num_tokens, hashes, max_reuse_tokens)
        needed = self.blocks_needed(num_tokens) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if needed + revived > len(self.free):
            raise CacheFullError(
                f"KV cache full: a sequence of {num_tokens} tokens needs {needed + revived} free blocks of "
                f"{self.block_size} tokens, {len(self.free)} are free"
            )
        seq = SeqBlocks(num_tokens=num_tokens, num_cached_tokens=len(hits) * self.block_size)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free.remove(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(needed):
            seq.block_table.append(self._take_free())
        return seq

    def register(self, seq: SeqBlocks, index: int, h: bytes) -> None:
        """Makes block ``index`` of ``seq`` (now full, its KV written) reusable by an equal prefix with hash ``h``."""
        if not self.enable_prefix_caching or h in self.hash_to_block:
            return
        block = self.blocks[seq.block_table[index]]
        if block.hash is None:
            block.hash = h
            self.hash_to_block[h] = block.block_id

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix (benchmarks compare runs without one); only when no sequence holds a block.
        Returns whether it did."""
        if len(self.free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.hash = None
        self.hash_to_block.clear()
        return True

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
        for h, block_id in self.hash_to_block.items():
            if self.blocks[block_id].hash != h:
                raise AssertionError(f"hash index points at block {block_id}, which holds another hash")
