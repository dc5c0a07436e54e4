import math

import pytest
import torch

from omni_kernels import paged_decode_attention, paged_decode_attention_ref
from omni_kernels.paged_decode_attention import (
    CUDA_HEAD_DIMS,
    _paged_decode_attention_cuda,
    _paged_decode_attention_triton,
    decode_partition,
)
from omni_kernels.testing import assert_close_to_oracle, backend_params

OP = "paged_decode_attention"
BACKENDS = backend_params(OP)
SPLIT_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def paged_cache(contexts, num_kv_heads, head_dim, page, *, seed=0, spare_blocks=3):
    """Random K/V for each sequence's context, scattered over blocks in random page order. Every slot outside
    a context (the tail of a partial last page, the spare blocks) holds NaN and every unused block-table entry
    is -1, so a kernel that reads past a context shows it. Returns fp32 (k_cache, v_cache, block_tables)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // page) for c in contexts]
    num_blocks = sum(need) + spare_blocks
    max_blocks = max(need + [0]) + 1  # one spare column of padding
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((len(contexts), max_blocks), -1, dtype=torch.int32)
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


def fused_q(num_rows, num_q_heads, num_kv_heads, head_dim, dtype, device, *, seed=1):
    """q as the model produces it: a strided view into a fused QKV projection output."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_rows, (num_q_heads + 2 * num_kv_heads) * head_dim + 8, generator=g)
    return qkv.to(dtype=dtype, device=device)[:, : num_q_heads * head_dim].view(num_rows, num_q_heads, head_dim)


def _case(contexts, num_q_heads, num_kv_heads, head_dim, page, dtype, device, seed=0):
    k_cache, v_cache, block_tables = paged_cache(contexts, num_kv_heads, head_dim, page, seed=seed)
    q = fused_q(len(contexts), num_q_heads, num_kv_heads, head_dim, dtype, device, seed=seed + 1)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    to = dict(dtype=dtype, device=device)
    return q, k_cache.to(**to), v_cache.to(**to), block_tables.to(device), context_lens


def _oracles(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    cpu = [t.cpu() for t in (q, k_cache, v_cache, block_tables, context_lens)]
    oracle = paged_decode_attention_ref(*(t.double() if t.is_floating_point() else t for t in cpu), scale=scale)
    torch_lowp = paged_decode_attention_ref(*cpu, scale=scale)
    return torch_lowp, oracle


# (contexts, Hq, Hk, D, P): mixed lengths with a length-1 sequence, GQA 7:1, partial last pages, block sizes 1,
# 16 and 256, an odd head dim with a block size that is not a power of two, the 7B thinker's heads (28:4, 128)
# with a padded slot (context 0).
CASES = [
    pytest.param([1, 17, 300], 7, 1, 64, 16, id="mixed-gqa7-d64-p16"),
    pytest.param([17, 40], 7, 1, 128, 1, id="gqa7-d128-p1"),
    pytest.param([300, 1], 7, 1, 64, 256, id="gqa7-d64-p256"),
    pytest.param([40, 17], 4, 2, 59, 3, id="gqa2-d59-p3"),
    pytest.param([37, 0, 1], 28, 4, 128, 16, id="thinker7b-pad0"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contexts,num_q_heads,num_kv_heads,head_dim,page", CASES)
def test_matches_oracle(backend, device, dtype, contexts, num_q_heads, num_kv_heads, head_dim, page):
    if backend == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        pytest.skip(f"the cuda kernel is built for head_dim {CUDA_HEAD_DIMS}")
    args = _case(contexts, num_q_heads, num_kv_heads, head_dim, page, dtype, device)
    out = paged_decode_attention(*args, backend=backend)
    assert out.shape == args[0].shape and out.dtype == dtype and out.is_contiguous()
    torch_lowp, oracle = _oracles(*args)
    err, ref_err = assert_close_to_oracle(out.cpu(), torch_lowp, oracle, name=f"{backend}/{dtype}")
    print(f"{backend}/{device}/{dtype}: max err {err:.2e}, torch {ref_err:.2e}")
    for b, c in enumerate(contexts):
        if c == 0:
            assert torch.equal(out[b].cpu(), torch.zeros_like(out[b].cpu())), "a context-0 slot must be zeros"


@pytest.mark.parametrize("backend,device", SPLIT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partition", [32, 64])
def test_split_partitions(backend, device, dtype, partition):
    # Flash-decoding with a second reduce pass: 300 tokens over 10 (or 5) partitions, a sequence that ends on
    # a partition boundary (64), one shorter than a partition, a padded slot; explicit partition sizes.
    # Block size 3: partitions and pages do not align.
    contexts = [300, 64, 5, 0]
    args = _case(contexts, 7, 1, 64, 3, dtype, device, seed=3)
    q, k_cache, v_cache, block_tables, context_lens = args
    impl = _paged_decode_attention_triton if backend == "triton" else _paged_decode_attention_cuda
    out = impl(q, k_cache, v_cache, block_tables, context_lens, 64**-0.5, partition)
    torch_lowp, oracle = _oracles(*args)
    err, ref_err = assert_close_to_oracle(out.cpu(), torch_lowp, oracle, name=f"{backend}/{dtype}/part{partition}")
    print(f"{backend}/{dtype}/partition {partition}: max err {err:.2e}, torch {ref_err:.2e}")
    assert torch.equal(out[3].cpu(), torch.zeros_like(out[3].cpu()))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_context_thinker(backend, device, dtype):
    # The 7B thinker's decode shape at long context with the default partitioning (split over many CTAs).
    contexts = [8192, 1000, 0, 4097]
    args = _case(contexts, 28, 4, 128, 16, dtype, device, seed=5)
    out = paged_decode_attention(*args, backend=backend)
    torch_lowp, oracle = _oracles(*args)
    err, ref_err = assert_close_to_oracle(out.cpu(), torch_lowp, oracle, name=f"{backend}/{dtype}")
    print(f"{backend}/{dtype}: max err {err:.2e}, torch {ref_err:.2e}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [p for p in SPLIT_BACKENDS if p.values[1] == "cuda"])
def test_cuda_graph_replay(backend, device):
    # The engine captures decode steps in CUDA graphs: no host sync, and new context lengths (and tables)
    # written in place are honoured on replay, in the split path as well.
    args = _case([1500, 17, 0], 28, 4, 128, 16, torch.bfloat16, device, seed=9)
    q, k_cache, v_cache, block_tables, context_lens = args
    paged_decode_attention(*args, backend=backend)  # compile / warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_decode_attention(*args, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*args, backend=backend)
    context_lens.copy_(torch.tensor([700, 1, 17], dtype=torch.int32))
    block_tables[2].copy_(block_tables[1])
    graph.replay()
    torch.cuda.synchronize()
    torch_lowp, oracle = _oracles(*args)
    assert_close_to_oracle(out.cpu(), torch_lowp, oracle, name=f"{backend} graph replay")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_unsupported_head_dim_falls_back_on_cuda():
    args = _case([20, 3], 4, 2, 80, 16, torch.bfloat16, "cuda")
    out = paged_decode_attention(*args)  # backend=None: the cuda kernel has no head_dim 80 -> next backend
    torch_lowp, oracle = _oracles(*args)
    assert_close_to_oracle(out.cpu(), torch_lowp, oracle)
    with pytest.raises(ValueError, match="cuda backend supports head_dim"):
        paged_decode_attention(*args, backend="cuda")


def test_reference_against_loop():
    # The oracle itself, against the most literal per-head loop (fp64).
    contexts = [5, 0, 19]
    q, k_cache, v_cache, block_tables, context_lens = _case(contexts, 6, 2, 8, 4, torch.float64, "cpu")
    out = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale=0.3)
    for b, n in enumerate(contexts):
        for h in range(6):
            if n == 0:
                assert torch.equal(out[b, h], torch.zeros(8, dtype=torch.float64))
                continue
            keys = [k_cache[block_tables[b, t // 4], t % 4, h // 3] for t in range(n)]
            vals = [v_cache[block_tables[b, t // 4], t % 4, h // 3] for t in range(n)]
            s = [0.3 * float(q[b, h] @ k) for k in keys]
            w = [math.exp(x - max(s)) for x in s]
            expect = sum(wi * v for wi, v in zip(w, vals)) / sum(w)
            torch.testing.assert_close(out[b, h], expect, atol=1e-12, rtol=1e-12)


def test_partition_heuristic():
    # Batch 1 of the 7B thinker (Hk 4) on an H100 (132 SMs): 8k tokens -> 128-token partitions (256 CTAs).
    assert decode_partition(1, 4, 8192, 132) == 128
    assert decode_partition(1, 4, 16384, 132) == 256
    assert decode_partition(1, 4, 32768, 132) == 512
    assert decode_partition(8, 4, 8192, 132) == 512
    assert decode_partition(1, 4, 1024, 132) == 64  # never below 64 tokens


def test_scale_and_default():
    args = _case([30, 9], 4, 2, 16, 8, torch.float32, "cpu")
    out = paged_decode_attention(*args, scale=0.7)
    torch_lowp, oracle = _oracles(*args, scale=0.7)
    assert_close_to_oracle(out, torch_lowp, oracle)
    default = paged_decode_attention(*args)
    explicit = paged_decode_attention(*args, scale=16**-0.5)
    assert torch.equal(default, explicit)
    assert not torch.allclose(out, default)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in __import__("omni_kernels").available(OP, "cpu") else "torch"
    args = _case([9, 3], 4, 2, 16, 4, torch.float32, "cpu")
    expect = paged_decode_attention(*args, backend=backend)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(q, k_cache, v_cache, block_tables, context_lens):
        return paged_decode_attention(q * 1, k_cache, v_cache, block_tables, context_lens, backend=backend) + 0

    if backend == "torch":
        pytest.skip("the torch reference reads context_lens on the host (graph break)")
    torch.testing.assert_close(step(*args), expect)


def _bad_args():
    q, k_cache, v_cache, block_tables, context_lens = _case([5, 9], 4, 2, 16, 4, torch.float32, "cpu")
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)


BAD = [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 3 dims"),
    (lambda a: a.update(q=a["q"].double()), TypeError, "q must be one of"),
    (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "q must have a contiguous last dim"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache must have the dtype of q"),
    (lambda a: a.update(k_cache=a["k_cache"][..., :8]), ValueError, "k_cache must have shape"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :2]), ValueError, "v_cache must have shape"),
    (lambda a: a.update(k_cache=a["k_cache"].new_zeros(6, 4, 3, 16), v_cache=a["v_cache"].new_zeros(6, 4, 3, 16)),
     ValueError,
     "must be a multiple of k_cache's kv head count"),
    (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError, "block_tables must be one of int32"),
    (lambda a: a.update(block_tables=a["block_tables"][:1]), ValueError, "block_tables must have shape"),
    (lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError, "context_lens must have shape"),
    (lambda a: a.update(context_lens=a["context_lens"].long()), TypeError, "context_lens must be one of int32"),
    (lambda a: a.update(context_lens=a["context_lens"] + 100), ValueError, "context_lens values must lie"),
    (lambda a: a.update(context_lens=a["context_lens"] - 6), ValueError, "context_lens values must lie"),
    (lambda a: a["block_tables"].__setitem__((1, 0), 1000), ValueError, "block_tables entries in use must lie"),
    (lambda a: a["block_tables"].__setitem__((0, 1), -1), ValueError, "block_tables entries in use must lie"),
    (lambda a: a.update(scale="0.5"), TypeError, "scale must be a finite float"),
    (lambda a: a.update(scale=float("nan")), TypeError, "scale must be a finite float"),
    (lambda a: a.update(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("mutate,exc,match", BAD)
def test_bad_arguments(mutate, exc, match):
    args = _bad_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        paged_decode_attention(**args)


def test_unused_block_table_entries_are_not_checked():
    # Padding past a sequence's last block may hold anything (-1 here, and a huge value).
    args = _bad_args()
    args["block_tables"][:, -1] = 10**6
    paged_decode_attention(**args)


def test_unknown_and_missing_backend():
    args = _bad_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        paged_decode_attention(**args, backend="flashinfer")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        paged_decode_attention(**args, backend="cuda")


def test_empty_batch():
    args = _case([3], 4, 2, 16, 4, torch.float32, "cpu")
    q, k_cache, v_cache, block_tables, context_lens = args
    for backend in __import__("omni_kernels").available(OP, "cpu"):
        out = paged_decode_attention(q[:0], k_cache, v_cache, block_tables[:0], context_lens[:0], backend=backend)
        assert out.shape == (0, 4, 16)
