import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_model.engine.block_manager import BlockManager, CacheFullError, hash_blocks


def _refs_from_live(bm, live):
    counts = [0] * len(bm.blocks)
    for seq in live:
        for b in seq.block_table:
            counts[b] += 1
    return counts


def _alloc(bm, ids, extra=None):
    """Allocates a sequence for ``ids`` and offers its full blocks to the prefix cache (as if computed)."""
    hashes = hash_blocks(ids, bm.block_size, extra=extra)
    seq = bm.allocate(len(ids), hashes)
    for i, h in enumerate(hashes):
        bm.register(seq, i, h)
    return seq


def test_prefix_sharing_and_release():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _alloc(bm, list(range(10)))  # 2 full blocks + 1 partial
    b = _alloc(bm, list(range(8)) + [99, 98, 97])  # same first 2 blocks
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.num_free_blocks == 8 - 4
    bm.free_seq(a)
    bm.free_seq(b)
    bm.free_seq(b)  # idempotent
    bm.check_invariants()
    assert bm.num_free_blocks == 8
    # The freed blocks keep their hashes: a third equal prompt reuses them from the free list.
    ids = list(range(9))
    assert bm.free_blocks_needed(9, hash_blocks(ids, 4)) == 3, "revived cached blocks come off the free list too"
    c = bm.allocate(9, hash_blocks(ids, 4))
    assert c.num_cached_tokens == 8
    bm.check_invariants()


def test_only_registered_blocks_are_shared():
    """A block becomes shareable once its KV is written (registered), not when it is allocated: a chunked prefill
    writes the prompt over several steps."""
    bm = BlockManager(num_blocks=16, block_size=4)
    ids = list(range(9))
    hashes = hash_blocks(ids, 4)
    a = bm.allocate(9, hashes)
    assert bm.allocate(9, hashes).num_cached_tokens == 0
    bm.register(a, 0, hashes[0])
    assert bm.allocate(9, hashes).num_cached_tokens == 4
    assert bm.allocate(9, hashes, max_reuse_tokens=0).num_cached_tokens == 0


def test_last_block_is_never_shared():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _alloc(bm, list(range(8)))
    b = _alloc(bm, list(range(8)))
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert b.num_cached_tokens == 4


def test_media_digests_separate_equal_placeholders():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = [1, 2, 3, 4] + [7] * 8 + [5]

    def media(digest):  # placeholder tokens 4..11 belong to one image with this content digest
        return lambda lo, hi: digest if lo < 12 and hi > 4 else b""

    a = _alloc(bm, prompt, media(b"image-a"))
    b = _alloc(bm, prompt, media(b"image-b"))
    c = _alloc(bm, prompt, media(b"image-a"))
    assert b.block_table[0] == a.block_table[0], "the text block before the media is shared"
    assert b.block_table[1] != a.block_table[1], "different media content must not share blocks"
    assert c.block_table[:3] == a.block_table[:3]


def test_full_cache_fails_only_the_request():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _alloc(bm, list(range(10)))
    before = [blk.ref_count for blk in bm.blocks], list(bm.free)
    with pytest.raises(CacheFullError, match="KV cache full"):
        _alloc(bm, list(range(100, 110)))
    assert ([blk.ref_count for blk in bm.blocks], list(bm.free)) == before
    bm.append(a, 2)  # 12 tokens: still 3 blocks
    bm.append(a, 1)  # 13 tokens: the 4th block
    with pytest.raises(CacheFullError):
        bm.append(a, 4)
    assert a.num_tokens == 13
    bm.check_invariants()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    with pytest.raises(ValueError, match="num_tokens"):
        BlockManager(4, 4).allocate(0)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.lists(st.integers(0, 3), min_size=1, max_size=40), st.booleans()),
        st.tuples(st.just("append"), st.integers(0, 20), st.integers(1, 9)),
        st.tuples(st.just("free"), st.integers(0, 20), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4, 16]))
def test_never_leaks_or_double_frees(ops, num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    live = []
    for op, arg, extra in ops:
        if op == "alloc":
            try:
                live.append(_alloc(bm, arg, (lambda lo, hi: b"m") if extra else None))
            except CacheFullError:
                pass
        elif op == "append" and live:
            seq = live[arg % len(live)]
            n = seq.num_tokens
            try:
                bm.append(seq, extra)
                assert seq.num_tokens == n + extra
                assert len(seq.block_table) * block_size >= seq.num_tokens
            except CacheFullError:
                assert seq.num_tokens == n
        elif op == "free" and live:
            bm.free_seq(live.pop(arg % len(live)))
        bm.check_invariants()
        assert [blk.ref_count for blk in bm.blocks] == _refs_from_live(bm, live)
        # Slots of one sequence are distinct, and no two live sequences write the same slot past their
        # shared (cached) prefix.
        owners = {}
        for i, seq in enumerate(live):
            for pos in range(seq.num_cached_tokens, seq.num_tokens):
                s = bm.slot(seq, pos)
                assert owners.setdefault(s, i) == i, "two sequences write one slot"
    for seq in live:
        bm.free_seq(seq)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks
