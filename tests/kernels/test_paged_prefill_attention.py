import pytest
import torch
import torch.nn.functional as F

from omni_kernels import paged_decode_attention_ref, paged_prefill_attention, paged_prefill_attention_ref
from omni_kernels.paged_decode_attention import CUDA_HEAD_DIMS
from omni_kernels.testing import assert_close_to_oracle, backend_params

OP = "paged_prefill_attention"
BACKENDS = backend_params(OP)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def paged_cache(contexts, num_kv_heads, head_dim, page, *, seed=0, spare_blocks=3):
    """Random K/V for each sequence's context in random page order; every slot outside a context holds NaN
    and unused block-table entries are -1, so reading past a context shows. fp32 (k_cache, v_cache, tables)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // page) for c in contexts]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((len(contexts), max(need + [0]) + 1), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, page, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for b, (c, nb) in enumerate(zip(contexts, need)):
        blocks = perm[used: used + nb]
        used += nb
        block_tables[b, :nb] = blocks.int()
        t = torch.arange(c)
        k_cache[blocks[t // page], t % page] = torch.randn(c, num_kv_heads, head_dim, generator=g)
        v_cache[blocks[t // page], t % page] = torch.randn(c, num_kv_heads, head_dim, generator=g)
    return k_cache, v_cache, block_tables


def _case(seqs, num_q_heads, num_kv_heads, head_dim, page, dtype, device, seed=0):
    """seqs: (new tokens, context length) per sequence. q is a strided view into a fused QKV output."""
    new = [n for n, _ in seqs]
    contexts = [c for _, c in seqs]
    k_cache, v_cache, block_tables = paged_cache(contexts, num_kv_heads, head_dim, page, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    num_tokens = sum(new)
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim + 8, generator=g)
    q = qkv.to(dtype=dtype, device=device)[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    cu = torch.tensor([0] + new, dtype=torch.int32).cumsum(0).to(torch.int32)
    to = dict(dtype=dtype, device=device)
    return (q, k_cache.to(**to), v_cache.to(**to), block_tables.to(device), cu.to(device),
            torch.tensor(contexts, dtype=torch.int32, device=device))


def _oracles(*args, scale=None):
    cpu = [t.cpu() for t in args]
    oracle = paged_prefill_attention_ref(*(t.double() if t.is_floating_point() else t for t in cpu), scale=scale)
    return paged_prefill_attention_ref(*cpu, scale=scale), oracle


# (new tokens, context) per sequence: chunks over a cached prefix (n < context), full prefills (n == context),
# a single token, a sequence without new tokens; block sizes 1, 16, 256 and 3 (with an odd head dim, and with the
# 7B thinker's heads 28:4, 128); GQA 7:1.
CASES = [
    pytest.param([(1, 1), (17, 17), (37, 300), (0, 5), (20, 40)], 7, 1, 64, 16, id="mixed-gqa7-d64-p16"),
    pytest.param([(17, 17), (9, 30)], 7, 1, 128, 1, id="gqa7-d128-p1"),
    pytest.param([(40, 300), (1, 1)], 7, 1, 64, 256, id="gqa7-d64-p256"),
    pytest.param([(23, 23), (6, 40)], 4, 2, 59, 3, id="gqa2-d59-p3"),
    pytest.param([(16, 16), (5, 20)], 28, 4, 128, 3, id="thinker7b-p3"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqs,num_q_heads,num_kv_heads,head_dim,page", CASES)
def test_matches_oracle(backend, device, dtype, seqs, num_q_heads, num_kv_heads, head_dim, page):
    if backend == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        pytest.skip(f"the cuda kernel is built for head_dim {CUDA_HEAD_DIMS}")
    args = _case(seqs, num_q_heads, num_kv_heads, head_dim, page, dtype, device)
    out = paged_prefill_attention(*args, backend=backend)
    assert out.shape == args[0].shape and out.dtype == dtype and out.is_contiguous()
    torch_lowp, oracle = _oracles(*args)
    err, ref_err = assert_close_to_oracle(out.cpu(), torch_lowp, oracle, name=f"{backend}/{dtype}")
    print(f"{backend}/{device}/{dtype}: max err {err:.2e}, torch {ref_err:.2e}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_long_chunks_thinker(backend, device, dtype):
    # Several query tiles per sequence, tiles that straddle the causal diagonal at odd offsets, prefix reuse.
    seqs = [(300, 1500), (128, 128), (1, 777), (65, 65), (0, 3)]
    args = _case(seqs, 28, 4, 128, 16, dtype, device, seed=5)
    out = paged_prefill_attention(*args, backend=backend)
    torch_lowp, oracle = _oracles(*args)
    err, ref_err = assert_close_to_oracle(out.cpu(), torch_lowp, oracle, name=f"{backend}/{dtype}")
    print(f"{backend}/{dtype}: max err {err:.2e}, torch {ref_err:.2e}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_unsupported_head_dim_falls_back_on_cuda():
    args = _case([(9, 20)], 4, 2, 80, 16, torch.bfloat16, "cuda")
    out = paged_prefill_attention(*args)
    torch_lowp, oracle = _oracles(*args)
    assert_close_to_oracle(out.cpu(), torch_lowp, oracle)
    with pytest.raises(ValueError, match="cuda backend supports head_dim"):
        paged_prefill_attention(*args, backend="cuda")


def test_reference_full_prefill_equals_sdpa():
    # A full prefill is causal self-attention: the oracle against SDPA on the contiguous sequence (fp64).
    args = _case([(13, 13), (29, 29)], 6, 2, 16, 4, torch.float64, "cpu")
    q, k_cache, v_cache, block_tables, cu, ctx = args
    out = paged_prefill_attention_ref(*args)
    for b, (s0, s1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        n = s1 - s0
        blocks = block_tables[b, : -(-n // 4)].long()
        k = k_cache[blocks].reshape(-1, 2, 16)[:n].repeat_interleave(3, dim=1)
        v = v_cache[blocks].reshape(-1, 2, 16)[:n].repeat_interleave(3, dim=1)
        expect = F.scaled_dot_product_attention(q[s0:s1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[s0:s1], expect, atol=1e-12, rtol=1e-12)


def test_reference_last_token_equals_decode():
    # The last new token of each sequence sees the whole context: the decode oracle's answer.
    args = _case([(5, 20), (1, 7), (11, 11)], 6, 2, 16, 4, torch.float64, "cpu")
    q, k_cache, v_cache, block_tables, cu, ctx = args
    out = paged_prefill_attention_ref(*args)
    last = cu[1:].long() - 1
    expect = paged_decode_attention_ref(q[last], k_cache, v_cache, block_tables, ctx)
    torch.testing.assert_close(out[last], expect, atol=1e-12, rtol=1e-12)


def test_chunked_prefill_equals_full_prefill():
    # Two chunks over a shared cache give the rows of one full prefill (every available backend on CPU).
    full = _case([(24, 24)], 7, 1, 32, 16, torch.float32, "cpu", seed=7)
    q, k_cache, v_cache, block_tables, _, ctx = full
    for backend in __import__("omni_kernels").available(OP, "cpu"):
        whole = paged_prefill_attention(*full, backend=backend)
        first = paged_prefill_attention(q[:10], k_cache, v_cache, block_tables,
                                        torch.tensor([0, 10], dtype=torch.int32), torch.tensor([10], dtype=torch.int32),
                                        backend=backend)
        second = paged_prefill_attention(q[10:], k_cache, v_cache, block_tables,
                                         torch.tensor([0, 14], dtype=torch.int32), ctx, backend=backend)
        torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=1e-5)


def test_scale():
    args = _case([(7, 12)], 4, 2, 16, 4, torch.float32, "cpu")
    out = paged_prefill_attention(*args, scale=0.3)
    torch_lowp, oracle = _oracles(*args, scale=0.3)
    assert_close_to_oracle(out, torch_lowp, oracle)
    assert torch.equal(paged_prefill_attention(*args), paged_prefill_attention(*args, scale=16**-0.5))


def test_custom_op_traces_under_compile():
    if "triton" not in __import__("omni_kernels").available(OP, "cpu"):
        pytest.skip("the torch reference reads cu_seqlens_q on the host (graph break)")
    args = _case([(3, 9), (4, 4)], 4, 2, 16, 4, torch.float32, "cpu")
    expect = paged_prefill_attention(*args, backend="triton")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(q, *rest):
        return paged_prefill_attention(q * 1, *rest, backend="triton") + 0

    torch.testing.assert_close(step(*args), expect)


def _bad_args():
    q, k_cache, v_cache, block_tables, cu, ctx = _case([(3, 5), (4, 9)], 4, 2, 16, 4, torch.float32, "cpu")
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, cu_seqlens_q=cu, context_lens=ctx)


BAD = [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 3 dims"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache must have the dtype of q"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :2]), ValueError, "v_cache must have shape"),
    (lambda a: a.update(k_cache=a["k_cache"].new_zeros(6, 4, 3, 16), v_cache=a["v_cache"].new_zeros(6, 4, 3, 16)),
     ValueError, "must be a multiple of k_cache's kv head count"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q must be one of int32"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:0]), ValueError, r"cu_seqlens_q must have shape \(B \+ 1,\)"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:2]), ValueError, "block_tables must have shape"),
    (lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError, "context_lens must have shape"),
    (lambda a: a["cu_seqlens_q"].__setitem__(2, 6), ValueError, "cu_seqlens_q must start at 0 and end at T"),
    (lambda a: a["cu_seqlens_q"].__setitem__(0, 1), ValueError, "cu_seqlens_q must start at 0 and end at T"),
    (lambda a: a["cu_seqlens_q"].__setitem__(1, 8), ValueError, "cu_seqlens_q must be non-decreasing"),
    (lambda a: a["context_lens"].__setitem__(0, 2), ValueError, r"n_b <= context_lens\[b\]"),
    (lambda a: a["context_lens"].__setitem__(1, 100), ValueError, "context_lens values must lie"),
    (lambda a: a["block_tables"].__setitem__((1, 2), 99), ValueError, "block_tables entries in use must lie"),
    (lambda a: a.update(scale=[1.0]), TypeError, "scale must be a finite float"),
]


@pytest.mark.parametrize("mutate,exc,match", BAD)
def test_bad_arguments(mutate, exc, match):
    args = _bad_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        paged_prefill_attention(**args)


def test_unknown_and_missing_backend():
    args = _bad_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        paged_prefill_attention(**args, backend="flashinfer")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        paged_prefill_attention(**args, backend="cuda")


def test_empty():
    args = _bad_args()
    for backend in __import__("omni_kernels").available(OP, "cpu"):
        out = paged_prefill_attention(args["q"][:0], args["k_cache"], args["v_cache"], args["block_tables"],
                                      torch.zeros(3, dtype=torch.int32), args["context_lens"], backend=backend)
        assert out.shape == (0, 4, 16)
