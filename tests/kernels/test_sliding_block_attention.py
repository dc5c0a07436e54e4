import types

import pytest
import torch

from omni_kernels import available, sliding_block_attention, sliding_block_attention_ref
from omni_kernels.testing import assert_close, assert_close_to_oracle, backend_params

OP = "sliding_block_attention"
BACKENDS = backend_params(OP)
GPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WINDOWS = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1)]


def _cu(lengths, index_dtype=torch.int32, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=index_dtype, device=device)


def _qkv(num_tokens, heads, head_dim, dtype, device, *, fused=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fused:
        # Views into a fused QKV projection output (T, 3, H, D), as the DiT produces them.
        qkv = torch.randn(num_tokens, 3, heads, head_dim, generator=g).to(dtype=dtype, device=device)
        return qkv.unbind(1)
    return tuple(torch.randn(num_tokens, heads, head_dim, generator=g).to(dtype=dtype, device=device)
                 for _ in range(3))


def _check(backend, device, dtype, lengths, heads, head_dim, block_size, back, ahead, *, index_dtype=torch.int32,
           scale=None, seed=0, name=""):
    cu = _cu(lengths, index_dtype, device)
    q, k, v = _qkv(sum(lengths), heads, head_dim, dtype, device, seed=seed)
    kwargs = dict(block_size=block_size, look_back=back, look_ahead=ahead, scale=scale)
    out = sliding_block_attention(q, k, v, cu_seqlens=cu, backend=backend, **kwargs)
    lowp = sliding_block_attention_ref(q, k, v, cu_seqlens=cu, **kwargs)
    oracle = sliding_block_attention_ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), cu_seqlens=cu.cpu(),
                                         **kwargs)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    err, ref_err = assert_close_to_oracle(out.cpu(), lowp.cpu(), oracle, name=name or f"{backend} {dtype}")
    print(f"{name}: {backend} {dtype} err {err:.2e} (torch {ref_err:.2e})")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("back,ahead", WINDOWS)
@pytest.mark.parametrize("lengths", [[1], [23], [24, 25], [61, 1, 0, 7]], ids=str)
def test_matches_oracle(backend, device, dtype, back, ahead, lengths):
    _check(backend, device, dtype, lengths, 2, 16, 24, back, ahead, name=f"lengths {lengths} window {back, ahead}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "lengths,heads,head_dim,block_size,back,ahead",
    [
        ([300], 2, 64, 24, 1, 0),  # DiT block size and head dim
        ([1, 1, 1], 1, 32, 24, 1, 1),  # sequences of one frame
        ([23, 13], 3, 59, 5, 2, 1),  # odd head dim, small blocks
        ([97], 1, 80, 40, 1, 1),  # block larger than the CUDA tile (two tiles per block)
        ([150, 20], 1, 16, 70, 0, 1),  # block larger than the Triton tile
        ([12], 2, 16, 1, 3, 2),  # one-frame blocks
        ([40], 1, 16, 24, 50, 50),  # windows wider than the sequence
    ],
)
def test_shapes(backend, device, lengths, heads, head_dim, block_size, back, ahead):
    for dtype in (torch.float32, torch.bfloat16):
        _check(backend, device, dtype, lengths, heads, head_dim, block_size, back, ahead, index_dtype=torch.int64,
               name=f"lengths {lengths} D {head_dim} bs {block_size} window {back, ahead}")


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frames", [300, 3000])
def test_dit_shapes(backend, device, dtype, frames):
    # The guidance pair at 16 heads x 64, blocks of 24, every window the DiT uses.
    for back, ahead in ((0, 0), (1, 0), (0, 1)):
        _check(backend, device, dtype, [frames, frames], 16, 64, 24, back, ahead, name=f"DiT {frames} {back, ahead}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_allow_tf32_error_budget(backend, device):
    # TF32 keeps 10 mantissa bits, as fp16 does: its error budget is twice that of torch's fp16 math (the same rule
    # as the fp16 kernels), measured against the fp64 oracle.
    lengths = [200, 77]
    cu = _cu(lengths, device=device)
    q, k, v = _qkv(sum(lengths), 4, 64, torch.float32, device)
    kwargs = dict(block_size=24, look_back=1, look_ahead=1, cu_seqlens=cu)
    out = sliding_block_attention(q, k, v, allow_tf32=True, backend=backend, **kwargs)
    fp16 = sliding_block_attention_ref(q.half(), k.half(), v.half(), **kwargs).float()
    oracle = sliding_block_attention_ref(q.double(), k.double(), v.double(), **kwargs)
    err, ref_err = assert_close_to_oracle(out.cpu(), fp16.cpu(), oracle.cpu(), name=f"{backend} tf32")
    print(f"tf32 {backend}: err {err:.2e}, torch fp16 {ref_err:.2e}")


def _hf_dense(q, k, v, block_size, back, ahead):
    """HF 4.57.6's DiT attention on a (B, T, H, D) batch: ``_create_block_diff``, the decoder layer's mask, SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavDiTModel

    batch, length, heads, _ = q.shape
    owner = types.SimpleNamespace(block_size=block_size, num_attention_heads=heads)
    block_diff = Qwen2_5OmniToken2WavDiTModel._create_block_diff(owner, torch.zeros(batch, length, 1))
    mask = (block_diff >= -float(back)) & (block_diff <= float(ahead))  # DiTDecoderLayer.forward
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = sdpa_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    attention_mask=mask, is_causal=False)
    return out  # (B, T, H, D)


@pytest.mark.parametrize("length", [1, 23, 24, 25, 61, 100])
@pytest.mark.parametrize("back,ahead", WINDOWS)
def test_reference_matches_hf_dense_mask(length, back, ahead):
    pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, length, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    expect = _hf_dense(q, k, v, 24, back, ahead)
    # The guidance pair as two packed sequences: blocks restart at the second one.
    got = sliding_block_attention_ref(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), block_size=24,
                                      look_back=back, look_ahead=ahead, cu_seqlens=_cu([length, length]))
    assert_close(got.view(2, length, 4, 16), expect)


def test_reference_against_dense_loop():
    # The oracle itself against the literal rule, per sequence, with uneven lengths and an empty sequence.
    lengths, block_size = [37, 0, 5, 80], 8
    q, k, v = _qkv(sum(lengths), 2, 8, torch.float64, "cpu", fused=False)
    for back, ahead in WINDOWS:
        got = sliding_block_attention_ref(q, k, v, block_size=block_size, look_back=back, look_ahead=ahead,
                                          cu_seqlens=_cu(lengths), scale=0.3)
        start = 0
        for length in lengths:
            rows = slice(start, start + length)
            blocks = torch.arange(length) // block_size
            diff = blocks[None, :] - blocks[:, None]  # key block - query block
            visible = (diff >= -back) & (diff <= ahead)
            scores = torch.einsum("qhd,khd->hqk", q[rows], k[rows]) * 0.3
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            assert_close(got[rows], torch.einsum("hqk,khd->qhd", probs, v[rows]))
            start += length


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_sequence_without_cu_seqlens(backend, device):
    q, k, v = _qkv(61, 2, 16, torch.float32, device)
    kwargs = dict(block_size=24, look_back=1, look_ahead=1, backend=backend)
    a = sliding_block_attention(q, k, v, **kwargs)
    b = sliding_block_attention(q, k, v, cu_seqlens=_cu([61], torch.int64, device), **kwargs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    oracle = sliding_block_attention_ref(q.double(), k.double(), v.double(), block_size=24, look_back=1, look_ahead=1)
    assert_close(a, oracle, dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    q, k, v = _qkv(0, 2, 16, torch.float32, device)
    out = sliding_block_attention(q, k, v, block_size=24, look_back=1, look_ahead=0, backend=backend,
                                  cu_seqlens=_cu([0, 0], device=device))
    assert out.shape == (0, 2, 16)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in available(OP, "cpu") else "torch"
    q, k, v = _qkv(50, 2, 16, torch.float32, "cpu")
    expect = sliding_block_attention_ref(q * 2, k, v, block_size=24, look_back=1, look_ahead=0)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(q, k, v):
        return sliding_block_attention(q * 2, k, v, block_size=24, look_back=1, look_ahead=0, backend=backend)

    assert_close(step(q, k, v), expect)


def _bad(mutate):
    q, k, v = _qkv(30, 2, 16, torch.float32, "cpu", fused=False)
    args = dict(q=q, k=k, v=v, block_size=24, look_back=1, look_ahead=0, cu_seqlens=_cu([10, 20]))
    mutate(args)
    return args


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 3 dims"),
        (lambda a: a.update(k=a["k"].half()), TypeError, "k must have the dtype of q"),
        (lambda a: a.update(v=a["v"][:, :1]), ValueError, "v must have shape"),
        (lambda a: a.update(q=a["q"].int()), TypeError, "q must be one of"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "q must have a contiguous last dim"),
        (lambda a: a.update(q=torch.zeros(30, 2, 300), k=torch.zeros(30, 2, 300), v=torch.zeros(30, 2, 300)),
         ValueError, "head dim must lie in"),
        (lambda a: a.update(block_size=0), ValueError, "block_size must be >= 1"),
        (lambda a: a.update(block_size=24.0), TypeError, "block_size must be an int"),
        (lambda a: a.update(look_back=-1), ValueError, "look_back must be >= 0"),
        (lambda a: a.update(look_ahead=True), TypeError, "look_ahead must be an int"),
        (lambda a: a.update(cu_seqlens=a["cu_seqlens"].float()), TypeError, "cu_seqlens must be one of"),
        (lambda a: a.update(cu_seqlens=a["cu_seqlens"][None]), ValueError, "cu_seqlens must have 1 dims"),
        (lambda a: a.update(cu_seqlens=a["cu_seqlens"][:1]), ValueError, "cu_seqlens must hold at least 2"),
        (lambda a: a.update(cu_seqlens=_cu([10, 10])), ValueError, "cu_seqlens must start at 0 and end at T"),
        (lambda a: a.update(cu_seqlens=torch.tensor([1, 10, 30], dtype=torch.int32)), ValueError, "start at 0"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 20, 10, 30], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        (lambda a: a.update(scale="0.1"), TypeError, "scale must be a finite float"),
        (lambda a: a.update(scale=float("nan")), TypeError, "scale must be a finite float"),
        (lambda a: a.update(allow_tf32=1), TypeError, "allow_tf32 must be a bool"),
        (lambda a: a.update(k="not a tensor"), TypeError, "k must be a torch.Tensor"),
    ],
)
def test_bad_arguments(mutate, exc, match):
    with pytest.raises(exc, match=match):
        sliding_block_attention(**_bad(mutate))


def test_unknown_and_missing_backend():
    args = _bad(lambda a: None)
    with pytest.raises(ValueError, match="backend must be one of"):
        sliding_block_attention(**args, backend="flash")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        sliding_block_attention(**args, backend="cuda")
