import math

import pytest
import torch

from omni_kernels import available, window_attention, window_attention_ref
from omni_kernels.testing import assert_close_to_oracle, backend_params
from omni_kernels.window_attention import SDPA_MIN_SEQLEN, routes_to_sdpa, window_attention_sdpa

OP = "window_attention"
BACKENDS = backend_params(OP)
GPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cu(lengths, device="cpu", dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=dtype, device=device)


def _case(lengths, num_heads, head_dim, dtype, device, *, fused=True, seed=0):
    """q, k, v (T, H, D) and cu_seqlens; fused: strided views of a (T, 3, H, D) QKV output, as the encoders make."""
    g = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    if fused:
        qkv = torch.randn(num_tokens, 3, num_heads, head_dim, generator=g).to(dtype=dtype, device=device)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype=dtype, device=device)
                   for _ in range(3))
    return q, k, v, _cu(lengths, device)


def _check(backend, q, k, v, cu, *, max_seqlen=None, scale=None, name=""):
    out = window_attention(q, k, v, cu, max_seqlen=max_seqlen, scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    oracle = window_attention_ref(q.double(), k.double(), v.double(), cu, scale=scale)
    torch_lowp = window_attention_ref(q, k, v, cu, scale=scale, upcast=False)
    err, ref_err = assert_close_to_oracle(out, torch_lowp, oracle, name=name)
    print(f"{name}: max error {err:.2e}, torch {q.dtype} {ref_err:.2e}")
    return out


# Segment lengths: the odd ones (1, 23, 25, 61, 64, 100) with an empty segment, vision windows (64 and the
# 32/16 of edge windows), audio chunks (100 and a short last one), short segments (the packed tiling), one segment
# longer than a tile.
CASES = [
    pytest.param([1, 23, 25, 0, 61, 64, 100], 2, 80, id="odd-lengths-d80"),
    pytest.param([64, 64, 32, 64, 16], 2, 80, id="vision-windows-d80"),
    pytest.param([100, 100, 37], 2, 64, id="audio-chunks-d64"),
    pytest.param([3, 16, 1, 0, 9, 12, 7, 15, 5, 14, 2, 11], 2, 64, id="short-packed-d64"),  # one spans rows 63-67
    pytest.param([23, 1, 25], 3, 59, id="odd-d59"),
    pytest.param([0, 131, 0], 1, 128, id="long-d128-empty-ends"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,num_heads,head_dim", CASES)
def test_matches_oracle(backend, device, dtype, lengths, num_heads, head_dim):
    q, k, v, cu = _case(lengths, num_heads, head_dim, dtype, device)
    _check(backend, q, k, v, cu, name=f"{backend}/{device} {dtype} {lengths} D={head_dim}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("max_seqlen_slack", [0, 40])
@pytest.mark.parametrize("lengths", [[3, 16, 1, 0, 9, 12, 7], [64, 5, 64, 30]], ids=["short", "windows"])
def test_max_seqlen_given(backend, device, max_seqlen_slack, lengths):
    # A given bound (exact or loose) skips the host sync; a loose one also switches short segments from the packed
    # tiling to the per-segment one. int64 cu_seqlens and separate (non-fused) tensors on the way.
    q, k, v, cu = _case(lengths, 2, 64, torch.bfloat16, device, fused=False, seed=1)
    _check(backend, q, k, v, cu.long(), max_seqlen=max(lengths) + max_seqlen_slack, name=f"{backend} {lengths}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scale(backend, device):
    q, k, v, cu = _case([23, 25], 2, 64, torch.float32, device)
    out = _check(backend, q, k, v, cu, scale=0.3, name="scale=0.3")
    assert not torch.allclose(out, window_attention(q, k, v, cu, backend="torch"), atol=1e-3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_segments_do_not_interact(backend, device):
    # Changing the keys and values of one segment changes its rows and no other row (bit for bit).
    lengths = [3, 16, 1, 9, 64, 12]
    q, k, v, cu = _case(lengths, 2, 64, torch.float16, device, fused=False)
    before = window_attention(q, k, v, cu, backend=backend)
    lo, hi = cu[4].item(), cu[5].item()
    k2, v2 = k.clone(), v.clone()
    k2[lo:hi] = torch.randn_like(k2[lo:hi])
    v2[lo:hi] = torch.randn_like(v2[lo:hi])
    after = window_attention(q, k2, v2, cu, backend=backend)
    assert torch.equal(before[:lo], after[:lo]) and torch.equal(before[hi:], after[hi:])
    assert not torch.equal(before[lo:hi], after[lo:hi])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0]], ids=["no-segment", "one-empty", "three-empty"])
def test_no_tokens(backend, device, lengths):
    q, k, v, cu = _case(lengths, 2, 64, torch.float32, device)
    out = window_attention(q, k, v, cu, backend=backend)
    assert out.shape == (0, 2, 64)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_token_segments_return_v(backend, device, dtype):
    # softmax over one key is exactly 1: each output row is its own v row, bit for bit.
    q, k, v, cu = _case([1] * 70, 2, 80, dtype, device)
    assert torch.equal(window_attention(q, k, v, cu, backend=backend), v)


def test_reference_against_dense_mask():
    # The oracle itself, against the most literal formula: one softmax over a (T, T) block-diagonal mask.
    lengths = [5, 0, 12, 1, 7]
    q, k, v, cu = _case(lengths, 3, 16, torch.float64, "cpu", fused=False)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(16)
    scores = scores.masked_fill(seg[None, :, None] != seg[None, None, :], float("-inf"))
    expect = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)
    torch.testing.assert_close(window_attention_ref(q, k, v, cu), expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [[40, 40, 40], [0, 33, 33, 7, 0, 7, 7, 50], [1], [0, 0]])
def test_sdpa_route_matches_oracle(dtype, lengths):
    # The whole-frame route (batched SDPA per run of equal lengths), on CPU where it can be run directly.
    q, k, v, cu = _case(lengths, 2, 80, dtype, "cpu")
    out = window_attention_sdpa(q, k, v, cu.tolist(), 80**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    oracle = window_attention_ref(q.double(), k.double(), v.double(), cu)
    torch_lowp = window_attention_ref(q, k, v, cu, upcast=False)
    assert_close_to_oracle(out, torch_lowp, oracle, name=f"sdpa {lengths}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_default_backend_routes_whole_frames_gpu(dtype, monkeypatch):
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    lengths = [SDPA_MIN_SEQLEN + 76] * 2 + [300]
    q, k, v, cu = _case(lengths, 4, 80, dtype, "cuda")
    _check(None, q, k, v, cu, max_seqlen=max(lengths), name="default route")


def test_sdpa_route_choice(monkeypatch):
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    long = SDPA_MIN_SEQLEN + 1
    assert routes_to_sdpa(cuda, None, long)
    assert not routes_to_sdpa(cuda, None, SDPA_MIN_SEQLEN)  # windows and audio chunks stay on the kernels
    assert not routes_to_sdpa(cpu, None, long)  # CPU keeps the reference
    assert not routes_to_sdpa(cuda, "cuda", long)  # an explicit backend is obeyed
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    assert not routes_to_sdpa(cuda, None, long)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in available(OP, "cpu") else "torch"
    q, k, v, cu = _case([5, 16, 11], 2, 32, torch.float32, "cpu")
    expect = window_attention_ref(q, k, v, cu)

    @torch.compile(backend="aot_eager", fullgraph=backend != "torch")
    def layer(q, k, v, cu):
        return window_attention(q * 1, k, v, cu, max_seqlen=16, backend=backend) + 1

    torch.testing.assert_close(layer(q, k, v, cu) - 1, expect, atol=1e-5, rtol=1e-5)


def _bad(**kw):
    q, k, v, cu = _case([5, 0, 7], 2, 32, torch.float32, "cpu", fused=False)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(q=torch.randn(12, 64)), ValueError, "q must have 3 dims"),
        (dict(k=torch.randn(12, 2, 16)), ValueError, "k must have shape"),
        (dict(v=torch.randn(11, 2, 32)), ValueError, "v must have shape"),
        (dict(v=torch.randn(12, 2, 32).half()), TypeError, "v must have the dtype of q"),
        (dict(q=torch.randn(12, 2, 32).to(torch.int32)), TypeError, "q must be one of"),
        (dict(k=torch.randn(12, 32, 2).transpose(1, 2)), ValueError, "k must have a contiguous last dim"),
        (dict(q="q"), TypeError, "q must be a torch.Tensor"),
        (dict(cu_seqlens=torch.tensor([0.0, 5.0, 12.0])), TypeError, "cu_seqlens must be one of"),
        (dict(cu_seqlens=torch.tensor([[0, 5, 12]])), ValueError, "cu_seqlens must have 1 dims"),
        (dict(cu_seqlens=torch.tensor([], dtype=torch.int32)), ValueError, "cu_seqlens must hold at least one"),
        (dict(cu_seqlens=torch.tensor([1, 5, 12])), ValueError, "cu_seqlens must start at 0 and end at T=12"),
        (dict(cu_seqlens=torch.tensor([0, 5, 11])), ValueError, "cu_seqlens must start at 0 and end at T=12"),
        (dict(cu_seqlens=torch.tensor([0, 7, 5, 12])), ValueError, "cu_seqlens must be non-decreasing"),
        (dict(max_seqlen=6), ValueError, "max_seqlen=6 is below the longest segment of cu_seqlens"),
        (dict(max_seqlen=-1), ValueError, "max_seqlen must be a non-negative int"),
        (dict(max_seqlen=7.0), ValueError, "max_seqlen must be a non-negative int"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
        (dict(backend="flash"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        window_attention(**_bad(**kw))


def test_backend_limits():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        window_attention(**_bad(), backend="cuda")
    if "triton" in available(OP, "cpu"):
        q, k, v, cu = _case([3], 1, 257, torch.float32, "cpu")
        with pytest.raises(ValueError, match="the triton backend supports head dims up to 256, got D=257"):
            window_attention(q, k, v, cu, backend="triton")


# ------------------------------------------------------------------------- real Omni shapes (GPU only)


def _vision_windows(grid_h: int, grid_w: int, merge: int = 2, window: int = 4) -> list[int]:
    """Window lengths in patches for one temporal slice, in the vision encoder's window order."""
    mh, mw = grid_h // merge, grid_w // merge
    return [min(window, mh - r) * min(window, mw - c) * merge * merge
            for r in range(0, mh, window) for c in range(0, mw, window)]


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lengths,num_heads,head_dim",
    [
        pytest.param(_vision_windows(52, 92), 16, 80, id="vision-windows-1288x728"),
        pytest.param([52 * 92], 16, 80, id="vision-full-frame-1288x728"),
        pytest.param([576, 576], 16, 80, id="vision-full-video-2-slices"),
        pytest.param([100] * 15, 20, 64, id="audio-30s"),
        pytest.param([1, 2, 3, 5, 8, 13] * 40, 4, 128, id="tiny-segments-d128"),
    ],
)
def test_omni_shapes_gpu(backend, device, dtype, lengths, num_heads, head_dim):
    q, k, v, cu = _case(lengths, num_heads, head_dim, dtype, device)
    _check(backend, q, k, v, cu, name=f"{backend} {dtype} T={sum(lengths)} H={num_heads} D={head_dim}")
    _check(backend, q, k, v, cu, max_seqlen=max(lengths), name="max_seqlen given")
