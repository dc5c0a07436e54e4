import pytest
import torch

from omni_kernels import store_kv_cache, store_kv_cache_ref
from omni_kernels.testing import backend_params

BACKENDS = backend_params("store_kv_cache")


def _case(num_tokens, num_heads, head_dim, num_blocks, page, dtype, device, *, fused=True, skip_some=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fused:
        # k and v as strided views into a fused QKV projection output, as the model produces them.
        qkv = torch.randn(num_tokens, 3 * num_heads * head_dim + 8, generator=g).to(dtype)
        k = qkv[:, num_heads * head_dim: 2 * num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        v = qkv[:, 2 * num_heads * head_dim: 3 * num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    else:
        k = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    # Distinct slots in random page order; some tokens skipped with -1.
    slots = torch.randperm(num_blocks * page, generator=g)[:num_tokens]
    if skip_some:
        slots[torch.rand(num_tokens, generator=g) < 0.2] = -1
    k_cache = torch.randn(num_blocks, page, num_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, num_heads, head_dim, generator=g).to(dtype)
    to = dict(device=device)
    return k.to(**to), v.to(**to), k_cache.to(**to), v_cache.to(**to), slots.to(**to)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens,num_heads,head_dim,num_blocks,page",
    [(1, 1, 64, 1, 1), (37, 4, 128, 8, 16), (131, 2, 80, 2, 256), (9, 1, 59, 5, 3)],
)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_reference(backend, device, dtype, num_tokens, num_heads, head_dim, num_blocks, page, index_dtype):
    k, v, k_cache, v_cache, slots = _case(num_tokens, num_heads, head_dim, num_blocks, page, dtype, device)
    slots = slots.to(index_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(k, v, k_ref, v_ref, slots)
    store_kv_cache(k, v, k_cache, v_cache, slots, backend=backend)
    # A copy: bit-exact, including the untouched slots.
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)
    written = slots[slots >= 0].long()
    assert torch.equal(k_cache.flatten(0, 1)[written], k[slots >= 0])


def test_reference_against_loop():
    # The oracle itself, against the most literal loop.
    k, v, k_cache, v_cache, slots = _case(23, 2, 16, 4, 8, torch.float64, "cpu", fused=False)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s // 8, s % 8] = k[i]
            expect_v[s // 8, s % 8] = v[i]
    store_kv_cache_ref(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_and_all_skipped(backend, device):
    k, v, k_cache, v_cache, slots = _case(5, 2, 32, 2, 4, torch.float32, device)
    before = k_cache.clone()
    store_kv_cache(k[:0], v[:0], k_cache, v_cache, slots[:0], backend=backend)
    store_kv_cache(k, v, k_cache, v_cache, torch.full_like(slots, -1), backend=backend)
    assert torch.equal(k_cache, before)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in __import__("omni_kernels").available("store_kv_cache", "cpu") else "torch"
    k, v, k_cache, v_cache, slots = _case(6, 2, 16, 2, 4, torch.float32, "cpu", skip_some=False)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(k, v, k_ref, v_ref, slots)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(k, v, k_cache, v_cache, slots):
        store_kv_cache(k * 1, v * 1, k_cache, v_cache, slots, backend=backend)
        return k_cache.sum()

    step(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(k=a["k"][0]), ValueError, "k must have 3 dims"),
        (lambda a: a.update(v=a["v"].half()), TypeError, "v must have the dtype of k"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :, :1]), ValueError, "k_cache must have shape"),
        (lambda a: a.update(v_cache=a["v_cache"][:1]), ValueError, "v_cache must have shape"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].float()), TypeError, "slot_mapping must be one of"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), ValueError, "slot_mapping must have shape"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] + 1000), ValueError, "slot_mapping values must lie"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] - 1000), ValueError, "slot_mapping values must lie"),
        (lambda a: a.update(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "k must have a contiguous last dim"),
        (lambda a: a.update(k_cache=a["k_cache"].to(torch.int32)), TypeError, "k_cache must be one of"),
        (lambda a: a.update(k="not a tensor"), TypeError, "k must be a torch.Tensor"),
    ],
)
def test_bad_arguments(mutate, exc, match):
    k, v, k_cache, v_cache, slots = _case(5, 2, 32, 2, 4, torch.float32, "cpu", fused=False, skip_some=False)
    args = dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
    before = k_cache.clone()
    mutate(args)
    with pytest.raises(exc, match=match):
        store_kv_cache(**args)
    assert torch.equal(k_cache, before), "a rejected call must not write"


def test_unknown_and_missing_backend():
    k, v, k_cache, v_cache, slots = _case(5, 2, 32, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        store_kv_cache(k, v, k_cache, v_cache, slots, backend="cutlass")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        store_kv_cache(k, v, k_cache, v_cache, slots, backend="cuda")
