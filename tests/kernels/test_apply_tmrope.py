import pytest
import torch

from omni_kernels import apply_tmrope, apply_tmrope_ref, available
from omni_kernels.apply_tmrope import rope_inv_freq, tmrope_cos_sin
from omni_kernels.testing import assert_close, assert_close_to_oracle, skip_unless_backend

BACKENDS = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu", marks=skip_unless_backend("apply_tmrope", "triton", "cpu")),
]
GPU_BACKENDS = [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=[pytest.mark.gpu, skip_unless_backend("apply_tmrope", b, "cuda")])
    for b in ("torch", "triton", "cuda")
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (num_q_heads, num_kv_heads, head_dim, mrope_section, rope_theta), from REFERENCE.md and the HF configs.
THINKER_7B = (28, 4, 128, (16, 24, 24), 1e6)
THINKER_3B = (16, 2, 128, (16, 24, 24), 1e6)
TALKER_7B = (12, 4, 128, (16, 24, 24), 1e6)
# 3B talker: 14 heads x 64, 2 KV heads (REFERENCE.md); mrope (16, 16, 0) is to be confirmed against the
# checkpoint's config.json (no copy here). Either way it covers head_dim 64 and an empty section.
TALKER_3B = (14, 2, 64, (16, 16, 0), 1e6)
TINY_THINKER = (4, 2, 8, (1, 1, 2), 1e6)
TINY_TALKER = (2, 1, 8, (1, 1, 2), 1e6)
ODD = (3, 1, 80, (10, 15, 15), 1e4)  # a head_dim whose half is not a power of two
CONFIGS = {"thinker-7b": THINKER_7B, "thinker-3b": THINKER_3B, "talker-7b": TALKER_7B, "talker-3b": TALKER_3B,
           "tiny-thinker": TINY_THINKER, "tiny-talker": TINY_TALKER, "odd-d80": ODD}


def _positions(num_tokens, max_pos, g):
    # Three different, non-monotonic axes (as video + audio interleaving gives), reaching max_pos - 1.
    pos = torch.randint(0, max_pos, (3, num_tokens), generator=g)
    if num_tokens:
        pos[:, -1] = max_pos - 1
        pos[1, 0] = 0
    return pos


def _case(num_tokens, config, dtype, device, *, pad=8, max_pos=40000, seed=0, scale=1.0):
    """q, k as strided views into a fused QKV output (T, (Hq + 2 Hk) D + pad), as the model produces them.

    pad 8 keeps every row 16-byte aligned for all dtypes; an odd pad misaligns the rows (the scalar CUDA path).
    """
    num_q_heads, num_kv_heads, head_dim, _, _ = config
    g = torch.Generator().manual_seed(seed)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = (scale * torch.randn(num_tokens, width + pad, generator=g)).to(dtype).to(device)
    q = qkv[:, :num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k, _positions(num_tokens, max_pos, g).to(device)


def _rotated_fp64(x, positions, config, cos_sin_dtype):
    """x rotated in fp64 by cos/sin rounded to ``cos_sin_dtype`` (fp64: HF's fp32 values, unrounded)."""
    _, _, head_dim, sections, theta = config
    cos, sin = tmrope_cos_sin(positions, rope_inv_freq(head_dim, theta, x.device), sections, cos_sin_dtype)
    x = x.double()
    rotated = torch.cat((-x[..., head_dim // 2:], x[..., :head_dim // 2]), dim=-1)
    return x * cos.double()[:, None, :] + rotated * sin.double()[:, None, :]


def _rounding_floor(oracle, dtype):
    # The two-times rule's floor: half an ulp of the largest output (no kernel avoids the final rounding; HF's
    # own error on a handful of elements can happen to be smaller), at least the default fp32 floor.
    return max(1e-5, 0.5 * torch.finfo(dtype).eps) * max(oracle.abs().max().item() if oracle.numel() else 0.0, 1.0)


def _check(backend, qkv, q, k, positions, config, dtype):
    """Runs ``backend`` in place on q and k, then checks each of them
    * against the reference (HF's arithmetic) in ``dtype``: the elementwise table;
    * against the fp64 oracle (the reference in fp64): flash-attention's two-times rule, because HF's own result
      is off by more than the table where x * cos and rotate_half(x) * sin cancel (it rounds cos/sin and both
      products to ``dtype``);
    * for the kernels, against their exact contract in fp64 (cos/sin rounded to ``dtype`` as HF does, the rest
      exact, one final rounding): the elementwise table.
    """
    num_q_heads, num_kv_heads, head_dim, sections, theta = config
    q_ref, k_ref = q.clone(), k.clone()
    apply_tmrope_ref(q_ref, k_ref, positions, mrope_section=sections, rope_theta=theta)
    q64, k64 = q.double(), k.double()
    apply_tmrope_ref(q64, k64, positions, mrope_section=sections, rope_theta=theta)
    contract = {"q": _rotated_fp64(q, positions, config, dtype), "k": _rotated_fp64(k, positions, config, dtype)}
    rest = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].clone()
    apply_tmrope(q, k, positions, mrope_section=list(sections), rope_theta=theta, backend=backend)
    for name, out, ref, oracle in (("q", q, q_ref, q64), ("k", k, k_ref, k64)):
        if dtype == torch.float32 or backend == "torch":
            # In fp16/bf16 HF's arithmetic rounds cos/sin and both products: where they cancel, its result is off
            # by more than the table, so there the oracle rules below are the criterion, not HF's numbers.
            assert_close(out, ref, msg=f"{name} against the reference in {dtype}")
        assert_close_to_oracle(out, ref, oracle, floor=_rounding_floor(oracle, out.dtype), name=name)
        if backend != "torch":
            assert_close(out, contract[name], dtype=dtype, msg=f"{name} against cos/sin in {dtype}, exact math")
    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim:], rest), "v and padding must not change"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config,num_tokens",
    [("tiny-thinker", 1), ("tiny-thinker", 7), ("tiny-thinker", 131), ("tiny-talker", 7), ("talker-3b", 7),
     ("talker-3b", 131), ("thinker-7b", 1), ("thinker-7b", 7), ("odd-d80", 7)],
)
def test_matches_reference(backend, device, dtype, config, num_tokens):
    config = CONFIGS[config]
    qkv, q, k, positions = _case(num_tokens, config, dtype, device)
    _check(backend, qkv, q, k, positions, config, dtype)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["thinker-7b", "thinker-3b", "talker-7b", "talker-3b", "tiny-thinker", "odd-d80"])
@pytest.mark.parametrize("num_tokens", [1, 131, 4099])
@pytest.mark.parametrize("pad", [8, 3])
def test_matches_reference_gpu(backend, device, dtype, config, num_tokens, pad):
    config = CONFIGS[config]
    qkv, q, k, positions = _case(num_tokens, config, dtype, device, pad=pad, seed=num_tokens)
    _check(backend, qkv, q, k, positions, config, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("pad", [8, 3])
def test_positions_layouts_and_alignment(backend, device, pad):
    # int32 positions; positions as a strided slice of get_rope_index's (3, B, L) output; transposed storage;
    # misaligned rows (odd pad); the largest position the front door accepts.
    config = TALKER_3B
    qkv, q, k, positions = _case(9, config, torch.bfloat16, device, pad=pad)
    _check(backend, qkv, q, k, positions.to(torch.int32), config, torch.bfloat16)
    batch = torch.randint(0, 40000, (3, 2, 9)).to(device)
    qkv, q, k, _ = _case(9, config, torch.float32, device, pad=pad, seed=1)
    _check(backend, qkv, q, k, batch[:, 1], config, torch.float32)
    qkv, q, k, positions = _case(9, config, torch.float16, device, pad=pad, seed=2)
    _check(backend, qkv, q, k, positions.t().contiguous().t(), config, torch.float16)
    qkv, q, k, positions = _case(9, config, torch.float32, device, pad=pad, seed=3, max_pos=2**24)
    _check(backend, qkv, q, k, positions, config, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS + GPU_BACKENDS)
def test_text_positions_match_plain_rope(backend, device):
    # With equal ids on the three axes TMRoPE is ordinary RoPE (a text-only prompt): an independent check of the
    # section bookkeeping against the textbook formula, in fp64 from HF's fp32 angles.
    num_q_heads, num_kv_heads, head_dim, sections, theta = THINKER_7B
    _, q, k, _ = _case(5, THINKER_7B, torch.float32, device)
    ids = torch.tensor([0, 1, 17, 4095, 32767], device=device)
    angle = (ids.float()[:, None] * rope_inv_freq(head_dim, theta, device)).double()
    angle = torch.cat((angle, angle), dim=-1)[:, None, :]
    expect_q = q.double() * angle.cos() + torch.cat((-q[..., 64:], q[..., :64]), -1).double() * angle.sin()
    apply_tmrope(q, k, ids.expand(3, -1), mrope_section=sections, rope_theta=theta, backend=backend)
    assert_close(q, expect_q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["tiny-thinker", "thinker-7b", "talker-7b", "talker-3b", "tiny-talker"])
def test_reference_equals_hf(dtype, config):
    # The oracle is HF 4.57.6's own arithmetic: Qwen2_5OmniRotaryEmbedding + apply_multimodal_rotary_pos_emb,
    # position_ids (3, 1, T), q/k in HF's (B, H, L, D) layout. Bit for bit.
    hf = pytest.importorskip("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni")
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
        Qwen2_5OmniTalkerConfig,
        Qwen2_5OmniTextConfig,
    )

    num_q_heads, num_kv_heads, head_dim, sections, theta = CONFIGS[config]
    rope_scaling = {"mrope_section": list(sections), "rope_type": "default", "type": "default"}
    if config.startswith("talker") or config == "tiny-talker":
        hf_config = Qwen2_5OmniTalkerConfig(hidden_size=16, num_attention_heads=num_q_heads, head_dim=head_dim,
                                            num_key_value_heads=num_kv_heads, rope_theta=theta,
                                            rope_scaling=rope_scaling)
    else:
        hf_config = Qwen2_5OmniTextConfig(hidden_size=num_q_heads * head_dim, num_attention_heads=num_q_heads,
                                          num_key_value_heads=num_kv_heads, rope_theta=theta,
                                          rope_scaling=rope_scaling)
    _, q, k, positions = _case(37, CONFIGS[config], dtype, "cpu", scale=3.0)
    rotary = hf.Qwen2_5OmniRotaryEmbedding(config=hf_config)
    assert torch.equal(rotary.inv_freq, rope_inv_freq(head_dim, theta, "cpu"))
    q_hf, k_hf = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
    cos, sin = rotary(q_hf, positions[:, None, :])
    q_hf, k_hf = hf.apply_multimodal_rotary_pos_emb(q_hf, k_hf, cos, sin, list(sections))
    apply_tmrope_ref(q, k, positions, mrope_section=sections, rope_theta=theta)
    assert torch.equal(q, q_hf[0].transpose(0, 1))
    assert torch.equal(k, k_hf[0].transpose(0, 1))


def test_cos_sin_sections():
    # Frequency index i takes its angle from the axis of its section, in both halves of the head.
    positions = torch.tensor([[3], [5], [7]])
    inv_freq = torch.ones(4)
    cos, _ = tmrope_cos_sin(positions, inv_freq, (1, 1, 2), torch.float64)
    axis = torch.tensor([0, 1, 2, 2, 0, 1, 2, 2])
    assert torch.equal(cos[0], positions[axis, 0].float().cos().double())


@pytest.mark.parametrize("backend,device", BACKENDS + GPU_BACKENDS)
def test_empty(backend, device):
    _, q, k, positions = _case(0, TINY_THINKER, torch.float32, device)
    apply_tmrope(q, k, positions, mrope_section=[1, 1, 2], rope_theta=1e6, backend=backend)


def test_custom_op_traces_under_compile():
    # q and k are views of one fused buffer, mutated in place inside a compiled graph.
    backend = "triton" if "triton" in available("apply_tmrope", "cpu") else "torch"
    qkv, q, k, positions = _case(6, TINY_THINKER, torch.float32, "cpu")
    q_ref, k_ref = q.clone(), k.clone()
    apply_tmrope_ref(q_ref, k_ref, positions, mrope_section=[1, 1, 2], rope_theta=1e6)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(qkv, positions):
        q = qkv[:, :32].view(6, 4, 8)
        k = qkv[:, 32:48].view(6, 2, 8)
        apply_tmrope(q, k, positions, mrope_section=[1, 1, 2], rope_theta=1e6, backend=backend)
        return qkv.sum()

    step(qkv, positions)
    assert_close(q, q_ref)
    assert_close(k, k_ref)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 3 dims"),
        (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, "q must be one of"),
        (lambda a: a.update(k=a["k"].double()), TypeError, "k must be one of"),
        (lambda a: a.update(k=a["k"].half()), TypeError, "k must have the dtype of q"),
        (lambda a: a.update(k=a["k"][:2]), ValueError, "k must have shape"),
        (lambda a: a.update(k=a["k"][..., :4]), ValueError, "k must have shape"),
        (lambda a: a.update(q=a["q"][..., :7], k=a["k"][..., :7]), ValueError, "head_dim must be even"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "q must have a contiguous last dim"),
        (lambda a: a.update(k="not a tensor"), TypeError, "k must be a torch.Tensor"),
        (lambda a: a.update(mrope_section=[1, 1, 1]), ValueError, "mrope_section must be 3 non-negative ints"),
        (lambda a: a.update(mrope_section=[3, 2, -1]), ValueError, "mrope_section must be 3 non-negative ints"),
        (lambda a: a.update(mrope_section=[2, 2]), TypeError, "mrope_section must be a sequence of 3 ints"),
        (lambda a: a.update(mrope_section=[1.0, 1, 2]), TypeError, "mrope_section must be a sequence of 3 ints"),
        (lambda a: a.update(mrope_section=torch.tensor([1, 1, 2])), TypeError, "mrope_section must be a sequence"),
        (lambda a: a.update(rope_theta="1e6"), TypeError, "rope_theta must be a float"),
        (lambda a: a.update(rope_theta=0.0), ValueError, "rope_theta must be finite and positive"),
        (lambda a: a.update(rope_theta=float("inf")), ValueError, "rope_theta must be finite and positive"),
        (lambda a: a.update(positions=a["positions"].float()), TypeError, "positions must be one of"),
        (lambda a: a.update(positions=a["positions"][0]), ValueError, "positions must have 2 dims"),
        (lambda a: a.update(positions=a["positions"][:2]), ValueError, "positions must have shape"),
        (lambda a: a.update(positions=a["positions"][:, :3]), ValueError, "positions must have shape"),
        (lambda a: a.update(positions=a["positions"] - 40000), ValueError, "positions values must lie"),
        (lambda a: a.update(positions=a["positions"] + 2**24), ValueError, "positions values must lie"),
    ],
)
def test_bad_arguments(mutate, exc, match):
    qkv, q, k, positions = _case(5, TINY_THINKER, torch.float32, "cpu")
    args = dict(q=q, k=k, positions=positions, mrope_section=[1, 1, 2], rope_theta=1e6)
    before = qkv.clone()
    mutate(args)
    with pytest.raises(exc, match=match):
        apply_tmrope(**args)
    assert torch.equal(qkv, before), "a rejected call must not write"


def test_unknown_and_missing_backend():
    _, q, k, positions = _case(5, TINY_THINKER, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        apply_tmrope(q, k, positions, mrope_section=[1, 1, 2], rope_theta=1e6, backend="flashinfer")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        apply_tmrope(q, k, positions, mrope_section=[1, 1, 2], rope_theta=1e6, backend="cuda")
