import pytest
import torch

from omni_kernels import apply_tmrope, apply_tmrope_ref, available, tmrope_store_kv, tmrope_store_kv_ref
from omni_kernels.testing import assert_close, assert_close_to_oracle, skip_unless_backend

BACKENDS = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=skip_unless_backend("tmrope_store_kv", "triton", "cpu")),
]
GPU_BACKENDS = [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=[pytest.mark.gpu, skip_unless_backend("tmrope_store_kv", b, "cuda")])
    for b in ("torch", "triton", "cuda")
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (num_q_heads, num_kv_heads, head_dim, mrope_section, rope_theta), as in test_apply_tmrope.py.
CONFIGS = {
    "thinker-7b": (28, 4, 128, (16, 24, 24), 1e6),
    "talker-3b": (14, 2, 64, (16, 16, 0), 1e6),
    "tiny-thinker": (4, 2, 8, (1, 1, 2), 1e6),
    "odd-d80": (3, 1, 80, (10, 15, 15), 1e4),
}


def _case(num_tokens, config, dtype, device, *, num_blocks=None, page=16, pad=8, skip_some=True, seed=0):
    """q, k, v as views into a fused QKV output, distinct slots in random page order (some -1), random caches."""
    num_q_heads, num_kv_heads, head_dim, _, _ = config
    num_blocks = num_blocks or max(4, -(-2 * num_tokens // page))
    g = torch.Generator().manual_seed(seed)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width + pad, generator=g).to(dtype).to(device)
    q = qkv[:, :num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k, v = qkv[:, num_q_heads * head_dim:width].view(num_tokens, 2, num_kv_heads, head_dim).unbind(1)
    positions = torch.randint(0, 40000, (3, num_tokens), generator=g)
    slots = torch.randperm(num_blocks * page, generator=g)[:num_tokens]
    if skip_some:
        slots[torch.rand(num_tokens, generator=g) < 0.2] = -1
    k_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g).to(dtype)
    return [qkv, q, k, v] + [t.to(device) for t in (positions, k_cache, v_cache, slots)]


def _rounding_floor(oracle, dtype):
    # The two-times rule's floor: half an ulp of the largest output (no kernel avoids the final rounding; HF's
    # own error on a handful of elements can happen to be smaller), at least the default fp32 floor.
    return max(1e-5, 0.5 * torch.finfo(dtype).eps) * max(oracle.abs().max().item() if oracle.numel() else 0.0, 1.0)


def _check(backend, config, qkv, q, k, v, positions, k_cache, v_cache, slots):
    _, _, _, sections, theta = config
    q_ref, k_ref, kc_ref, vc_ref = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    tmrope_store_kv_ref(q_ref, k_ref, v, positions, kc_ref, vc_ref, slots, mrope_section=sections, rope_theta=theta)
    q64, k64 = q.double(), k.double()
    apply_tmrope_ref(q64, k64, positions, mrope_section=sections, rope_theta=theta)
    # The same backend's unfused op: the fused kernel must rotate identically.
    q_unfused, k_unfused = q.clone(), k.clone()
    apply_tmrope(q_unfused, k_unfused, positions, mrope_section=sections, rope_theta=theta, backend=backend)
    v_before, kc_before, vc_before = v.clone(), k_cache.clone(), v_cache.clone()

    tmrope_store_kv(q, k, v, positions, k_cache, v_cache, slots, mrope_section=list(sections), rope_theta=theta,
                    backend=backend)

    for name, out, ref, oracle, unfused in (("q", q, q_ref, q64, q_unfused), ("k", k, k_ref, k64, k_unfused)):
        if out.dtype == torch.float32 or backend == "torch":
            # fp16/bf16: HF's rounding of both products can exceed the table where they cancel (see
            # test_apply_tmrope); the oracle rule below is the criterion there.
            assert_close(out, ref, msg=f"{name} against the reference")
        assert_close_to_oracle(out, ref, oracle, floor=_rounding_floor(oracle, out.dtype), name=name)
        # The fused kernel is a different instantiation: the compiler may contract multiply-adds differently.
        assert_close(out, unfused, msg=f"{name}: fused and unfused rotation differ")
    keep = slots >= 0
    written = slots[keep].long()
    untouched = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=slots.device)
    untouched[written] = False
    assert torch.equal(k_cache.flatten(0, 1)[untouched], kc_before.flatten(0, 1)[untouched])
    assert torch.equal(k_cache.flatten(0, 1)[written], k[keep]), "the cache holds the rotated k, as k does"
    if k.dtype == torch.float32 or backend == "torch":
        # In fp16/bf16 the cached k differs from HF's doubly rounded one like k itself (checked above against the
        # oracle); the equality with the rotated k two lines up is the criterion there.
        assert_close(k_cache, kc_ref, msg="k_cache against the reference")
    assert torch.equal(v_cache, vc_ref), "v is copied as is"
    assert torch.equal(v, v_before)
    assert torch.equal(v_cache.flatten(0, 1)[untouched], vc_before.flatten(0, 1)[untouched])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config,num_tokens",
    [("tiny-thinker", 1), ("tiny-thinker", 7), ("tiny-thinker", 131), ("thinker-7b", 1), ("thinker-7b", 7),
     ("talker-3b", 7), ("odd-d80", 7)],
)
def test_matches_reference(backend, device, dtype, config, num_tokens):
    config = CONFIGS[config]
    _check(backend, config, *_case(num_tokens, config, dtype, device, seed=num_tokens))


@pytest.mark.parametrize("backend,device", BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("pad", [8, 3])
def test_index_dtypes_and_alignment(backend, device, pad):
    # int32 slots and positions; misaligned rows (odd pad) and a page size of 1.
    config = CONFIGS["talker-3b"]
    qkv, q, k, v, positions, k_cache, v_cache, slots = _case(9, config, torch.bfloat16, device, pad=pad)
    _check(backend, config, qkv, q, k, v, positions.to(torch.int32), k_cache, v_cache, slots.to(torch.int32))
    _check(backend, config, *_case(5, config, torch.float16, device, num_blocks=64, page=1, pad=pad, seed=1))


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 131, 4099])
@pytest.mark.parametrize("pad", [8, 3])
def test_matches_reference_gpu(backend, device, dtype, config, num_tokens, pad):
    config = CONFIGS[config]
    _check(backend, config, *_case(num_tokens, config, dtype, device, pad=pad, seed=num_tokens))


@pytest.mark.parametrize("backend,device", BACKENDS + GPU_BACKENDS)
def test_empty_and_all_skipped(backend, device):
    config = CONFIGS["tiny-thinker"]
    qkv, q, k, v, positions, k_cache, v_cache, slots = _case(5, config, torch.float32, device)
    kc_before, vc_before = k_cache.clone(), v_cache.clone()
    tmrope_store_kv(q[:0], k[:0], v[:0], positions[:, :0], k_cache, v_cache, slots[:0], mrope_section=[1, 1, 2],
                    rope_theta=1e6, backend=backend)
    q_ref, k_ref = q.clone(), k.clone()
    apply_tmrope_ref(q_ref, k_ref, positions, mrope_section=[1, 1, 2], rope_theta=1e6)
    tmrope_store_kv(q, k, v, positions, k_cache, v_cache, torch.full_like(slots, -1), mrope_section=[1, 1, 2],
                    rope_theta=1e6, backend=backend)
    assert torch.equal(k_cache, kc_before) and torch.equal(v_cache, vc_before)
    assert_close(q, q_ref)
    assert_close(k, k_ref), "skipped tokens are still rotated"


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in available("tmrope_store_kv", "cpu") else "torch"
    config = CONFIGS["tiny-thinker"]
    qkv, q, k, v, positions, k_cache, v_cache, slots = _case(6, config, torch.float32, "cpu", skip_some=False)
    q_ref, k_ref, kc_ref, vc_ref = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    tmrope_store_kv_ref(q_ref, k_ref, v, positions, kc_ref, vc_ref, slots, mrope_section=[1, 1, 2], rope_theta=1e6)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(qkv, positions, k_cache, v_cache, slots):
        q = qkv[:, :32].view(6, 4, 8)
        k = qkv[:, 32:48].view(6, 2, 8)
        v = qkv[:, 48:64].view(6, 2, 8)
        tmrope_store_kv(q, k, v, positions, k_cache, v_cache, slots, mrope_section=[1, 1, 2], rope_theta=1e6,
                        backend=backend)
        return k_cache.sum()

    step(qkv, positions, k_cache, v_cache, slots)
    assert_close(q, q_ref)
    assert_close(k_cache, kc_ref)
    assert torch.equal(v_cache, vc_ref)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 3 dims"),
        (lambda a: a.update(k=a["k"][:2]), ValueError, "k must have shape"),
        (lambda a: a.update(mrope_section=[1, 1, 1]), ValueError, "mrope_section must be 3 non-negative ints"),
        (lambda a: a.update(rope_theta=-1.0), ValueError, "rope_theta must be finite and positive"),
        (lambda a: a.update(positions=a["positions"][:, :2]), ValueError, "positions must have shape"),
        (lambda a: a.update(v=a["v"].half()), TypeError, "v must have the dtype of k"),
        (lambda a: a.update(v=a["v"][:, :1]), ValueError, "v must have shape"),
        (lambda a: a.update(v=a["v"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "v must have a contiguous last dim"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :, :1]), ValueError, "k_cache must have shape"),
        (lambda a: a.update(v_cache=a["v_cache"][:1]), ValueError, "v_cache must have shape"),
        (lambda a: a.update(k_cache=a["k_cache"].to(torch.int32)), TypeError, "k_cache must be one of"),
        (lambda a: a.update(v_cache=a["v_cache"].double()), TypeError, "v_cache must be one of"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].float()), TypeError, "slot_mapping must be one of"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), ValueError, "slot_mapping must have shape"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] + 1000), ValueError, "slot_mapping values must lie"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] - 1000), ValueError, "slot_mapping values must lie"),
    ],
)
def test_bad_arguments(mutate, exc, match):
    config = CONFIGS["tiny-thinker"]
    qkv, q, k, v, positions, k_cache, v_cache, slots = _case(5, config, torch.float32, "cpu", skip_some=False)
    args = dict(q=q, k=k, v=v, positions=positions, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots,
                mrope_section=[1, 1, 2], rope_theta=1e6)
    before = [t.clone() for t in (qkv, k_cache, v_cache)]
    mutate(args)
    with pytest.raises(exc, match=match):
        tmrope_store_kv(**args)
    assert all(torch.equal(a, b) for a, b in zip((qkv, k_cache, v_cache), before)), "a rejected call must not write"


def test_unknown_and_missing_backend():
    qkv, q, k, v, positions, k_cache, v_cache, slots = _case(5, CONFIGS["tiny-thinker"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        tmrope_store_kv(q, k, v, positions, k_cache, v_cache, slots, mrope_section=[1, 1, 2], rope_theta=1e6,
                        backend="vllm")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        tmrope_store_kv(q, k, v, positions, k_cache, v_cache, slots, mrope_section=[1, 1, 2], rope_theta=1e6,
                        backend="cuda")
