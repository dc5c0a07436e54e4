import pytest
import torch
import torch.nn.functional as F

from omni_kernels import available, w4a16_linear, w4a16_linear_ref
from omni_kernels.testing import assert_close_to_oracle, backend_params
from omni_kernels.w4a16_linear import (
    KBLOCK,
    dequantize_w4a16,
    pack_w4a16,
    split_k,
    unpack_w4a16,
)

OP = "w4a16_linear"
BACKENDS = backend_params(OP)
GPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cuda"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _case(m, k, n, group_size, dtype, device, *, zeros=True, perm=False, bias=True, x_pad=0, seed=0):
    """Random int4 values, scales around 0.01 (outputs of order one), zero points over their whole range 0..16
    (16: a GPTQ v1 zero of 0 stored as 15, read back plus one), x (M, K) as a column slice of a wider buffer when
    ``x_pad`` > 0 (a row stride other than K)."""
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    q = torch.randint(0, 16, (k, n), generator=g)
    args = dict(
        qweight=pack_w4a16(q).to(device),
        scales=(torch.rand(groups, n, generator=g) * 0.02 + 0.005).to(dtype=dtype, device=device),
        zeros=torch.randint(0, 17, (groups, n), generator=g).to(dtype=dtype, device=device) if zeros else None,
        perm=torch.randperm(k, generator=g).int().to(device) if perm else None,
        bias=(torch.randn(n, generator=g) * 0.1).to(dtype=dtype, device=device) if bias else None,
    )
    x = torch.randn(m, k + x_pad, generator=g).to(dtype=dtype, device=device)[:, :k]
    return x, args


def _oracle(x, args, group_size):
    """fp64 (on the device of x), from the very same scales and zeros: the only errors are the kernels' roundings."""
    wide = {name: (t.double() if t is not None and t.is_floating_point() else t) for name, t in args.items()}
    return w4a16_linear_ref(x.double(), group_size=group_size, **wide).cpu()


def _check(backend, x, args, group_size, msg=""):
    out = w4a16_linear(x, group_size=group_size, backend=backend, **args)
    n = args["qweight"].shape[1]
    assert out.shape == (x.shape[0], n) and out.dtype == x.dtype and out.is_contiguous(), msg
    oracle = _oracle(x, args, group_size)
    # The same torch math in the kernel's precision: the weight rounded to x's dtype, one low-precision matmul.
    torch_lowp = w4a16_linear_ref(x, group_size=group_size, **args).cpu()
    err, ref_err = assert_close_to_oracle(out.cpu(), torch_lowp, oracle, name=f"{backend} {msg}")
    print(f"{backend} {msg}: error {err:.3e}, torch {ref_err:.3e}")
    return out


# --------------------------------------------------------------------------------------------- the layout


def test_layout_is_the_mma_operand_order():
    """Word (4b + t, n), nibble i holds row 32b + 2t + (i >> 2) + 8 (i & 3): for lane t of an mma.m16n8k16 quad,
    nibble pairs (s, s + 4) are the two halves of its B registers b0, b1 of k-step 0 (s = 0, 1) and of k-step 1
    (s = 2, 3): rows 2t, 2t+1 | 2t+8, 2t+9 of each 16-row step (PTX ISA, "Matrix Fragments for mma.m16n8k16")."""
    g = torch.Generator().manual_seed(0)
    k, n = 96, 16
    q = torch.randint(0, 16, (k, n), generator=g)
    qweight = pack_w4a16(q)
    assert qweight.shape == (k // 8, n) and qweight.dtype == torch.int32
    assert (qweight < 0).any(), "a nibble >= 8 in bits 28-31 makes the word negative: unpacking must mask"
    assert torch.equal(unpack_w4a16(qweight), q.int())
    words = qweight.long() & 0xFFFFFFFF
    for b in range(k // KBLOCK):
        for t in range(4):
            for s in range(4):
                step, reg = divmod(s, 2)  # k-step of 16 rows, b0 or b1
                for half in range(2):  # the lower-indexed row sits in the low 16 bits
                    row = KBLOCK * b + 16 * step + 8 * reg + 2 * t + half
                    nibble = (words[4 * b + t] >> (4 * (s + 4 * half))) & 0xF
                    assert torch.equal(nibble, q[row]), (b, t, s, half)


def test_pack_refuses_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_w4a16(torch.zeros(48, 8, dtype=torch.int64))


def test_reference_is_a_dense_linear():
    x, args = _case(5, 64, 24, 32, torch.float64, "cpu", perm=True)
    w = dequantize_w4a16(args["qweight"], args["scales"], args["zeros"], group_size=32)
    expected = F.linear(x[:, args["perm"].long()], w.t(), args["bias"])
    torch.testing.assert_close(w4a16_linear_ref(x, group_size=32, **args), expected, rtol=1e-12, atol=1e-12)
    q = unpack_w4a16(args["qweight"]).double()
    z = args["zeros"].repeat_interleave(32, 0)
    torch.testing.assert_close(w, (q - z) * args["scales"].repeat_interleave(32, 0), rtol=0, atol=0)
    sym = dequantize_w4a16(args["qweight"], args["scales"], None, group_size=32)
    torch.testing.assert_close(sym, (q - 8) * args["scales"].repeat_interleave(32, 0), rtol=0, atol=0)


def test_split_k_plan():
    for n_programs, k_tiles, sms, cap in [(1, 3, 4, None), (28, 592, 132, 32), (296, 112, 132, 256), (2, 1, 4, 8),
                                          (36, 112, 132, 4)]:
        per, splits = split_k(n_programs, k_tiles, sms, cap)
        assert per >= 1 and splits >= 1
        assert (splits - 1) * per < k_tiles <= splits * per, "every tile in exactly one split, none empty"
        if cap is not None:
            assert per <= cap
    assert split_k(28, 592, 132) == (60, 10)  # the 7B down_proj of the docstring
    assert split_k(296, 112, 132)[1] == 1  # enough column blocks: no split


# --------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_matches_oracle(backend, device, dtype, m):
    """Three groups of 32 rows (an odd count), zero points, bias; M on both sides of the decode/prefill switch."""
    x, args = _case(m, 96, 40, 32, dtype, device, seed=m)
    _check(backend, x, args, 32, msg=f"{dtype} M={m} K=96 N=40 g=32")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("m", [1, 17])
def test_desc_act_permutation(backend, device, dtype, m):
    """GPTQ desc_act: activation columns read through perm; symmetric (no zeros); five groups of 32; no bias."""
    x, args = _case(m, 160, 24, 32, dtype, device, zeros=False, perm=True, bias=False, seed=10 + m)
    _check(backend, x, args, 32, msg=f"{dtype} M={m} perm sym")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("m,k,group_size", [(3, 384, 128), (20, 192, 64)], ids=["g128", "g64"])
def test_group_sizes_and_strided_x(backend, device, m, k, group_size):
    """The published group size 128 (3 groups), and 64; x a column slice with a row stride other than K."""
    x, args = _case(m, k, 48, group_size, torch.bfloat16, device, perm=m > 8, x_pad=8, seed=k)
    assert x.stride(0) == k + 8
    _check(backend, x, args, group_size, msg=f"strided M={m} K={k} g={group_size}")


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 64, 300])
@pytest.mark.parametrize(
    "k,n,perm",
    # 7B Thinker: fused qkv (3584 -> 4608), down (18944 -> 3584, the split-K case), gate_up (3584 -> 37888); a
    # desc_act layer; 3B o_proj (2048 -> 2048).
    [(3584, 4608, False), (18944, 3584, False), (3584, 37888, False), (3584, 3584, True), (2048, 2048, False)],
    ids=["qkv7b", "down7b", "gate_up7b", "desc_act", "o3b"],
)
def test_gpu_shapes(backend, device, dtype, m, k, n, perm):
    x, args = _case(m, k, n, 128, dtype, device, perm=perm, seed=m)
    _check(backend, x, args, 128, msg=f"{dtype} M={m} K={k} N={n}")


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 8, 21])
def test_gpu_fp32(backend, device, m):
    """fp32 activations: the CUDA backend runs its CUDA-core kernel in chunks of 8 rows."""
    x, args = _case(m, 512, 136, 128, torch.float32, device, perm=True, seed=m)
    _check(backend, x, args, 128, msg=f"fp32 M={m}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    x, args = _case(0, 64, 16, 32, torch.float16, device)
    assert w4a16_linear(x, group_size=32, backend=backend, **args).shape == (0, 16)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in available(OP, "cpu") else "torch"
    x, args = _case(3, 64, 16, 32, torch.float32, "cpu")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def layer(x):
        return w4a16_linear(x * 1, group_size=32, backend=backend, **args) + 1

    torch.testing.assert_close(layer(x), w4a16_linear_ref(x, group_size=32, **args) + 1, rtol=1e-5, atol=1e-5)


def _bad(**changes):
    x, args = _case(3, 64, 16, 32, torch.float16, "cpu", perm=True)
    kwargs = dict(args, x=x, group_size=32)
    for key, fn in changes.items():
        kwargs[key] = fn(kwargs[key])
    return kwargs


@pytest.mark.parametrize(
    "changes,exc,match",
    [
        (dict(x=lambda t: t[0]), ValueError, "x must have 2 dims"),
        (dict(x=lambda t: t.int()), TypeError, "x must be one of"),
        (dict(x=lambda t: t[:, :48]), ValueError, "x: K = x.shape.1. must be a positive multiple of 32"),
        (dict(x=lambda t: t.t().contiguous().t()), ValueError, "x must have a contiguous last dim"),
        (dict(qweight=lambda t: t.float()), TypeError, "qweight must be one of int32"),
        (dict(qweight=lambda t: t[:4]), ValueError, r"qweight must have shape \(8, \*\)"),
        (dict(qweight=lambda t: t[:, :12]), ValueError, "qweight: N = qweight.shape.1. must be a positive multiple"),
        (dict(qweight=lambda t: torch.cat([t, t], 1)[:, :16]), ValueError, "qweight must be contiguous"),
        (dict(group_size=lambda g: 48), ValueError, "group_size must be a positive multiple of 32 dividing K=64"),
        (dict(group_size=lambda g: 128), ValueError, "group_size must be a positive multiple of 32 dividing K=64"),
        (dict(group_size=lambda g: 32.0), TypeError, "group_size must be an int"),
        (dict(scales=lambda t: t[:1]), ValueError, r"scales must have shape \(2, 16\)"),
        (dict(scales=lambda t: t.float()), TypeError, "scales must have the dtype of x"),
        (dict(scales=lambda t: torch.cat([t, t], 1)[:, :16]), ValueError, "scales must be contiguous"),
        (dict(zeros=lambda t: t.int()), TypeError, "zeros must be one of"),
        (dict(zeros=lambda t: t[:, :8]), ValueError, r"zeros must have shape \(2, 16\)"),
        (dict(perm=lambda t: t.long()), TypeError, "perm must be one of int32"),
        (dict(perm=lambda t: t[:10]), ValueError, r"perm must have shape \(64\)"),
        (dict(perm=lambda t: t + 1), ValueError, r"perm values must lie in \[0, 64\)"),
        (dict(bias=lambda t: t.float()), TypeError, "bias must have the dtype of x"),
        (dict(bias=lambda t: t[:4]), ValueError, r"bias must have shape \(16\)"),
    ],
)
def test_bad_arguments(changes, exc, match):
    # backend="cuda" cannot run on CPU tensors: the argument error must come first, before any dispatch.
    with pytest.raises(exc, match=match):
        w4a16_linear(**_bad(**changes), backend="cuda")


def test_unknown_and_missing_backend():
    kwargs = _bad()
    with pytest.raises(ValueError, match="backend must be one of"):
        w4a16_linear(**kwargs, backend="marlin")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        w4a16_linear(**kwargs, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_extension_binding_without_gpu():
    from omni_kernels import _cuda
    from omni_kernels._backend import cuda_extension

    if cuda_extension() is None:
        pytest.skip("omni_kernels._C is not built")
    x, args = _case(2, 64, 16, 32, torch.float16, "cpu")
    out = torch.empty(2, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="CUDA device"):
        cuda_extension().w4a16_linear(_cuda.ref(x), _cuda.ref(args["qweight"]), _cuda.ref(args["scales"]),
                                      _cuda.ref(args["zeros"]), None, None, _cuda.ref(out), None, 32, 2, 0)
