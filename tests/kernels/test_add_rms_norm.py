import importlib
import math

import pytest
import torch

from omni_kernels import add_rms_norm, add_rms_norm_ref, available
from omni_kernels.testing import assert_close, assert_close_to_oracle, backend_params

OP = "add_rms_norm"
BACKENDS = backend_params(OP)
GPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cuda"]
TRITON_BACKENDS = [p for p in BACKENDS if p.values[0] == "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6  # Qwen2.5-Omni's rms_norm_eps
# The module itself (``omni_kernels.add_rms_norm`` the attribute is the front door function).
MODULE = importlib.import_module("omni_kernels.add_rms_norm")


def _case(num_rows, hidden, dtype, device, *, residual=True, row_pad=0, col_offset=0, seed=0):
    """x (and residual) as column slices of wider buffers when ``row_pad``/``col_offset`` are given (a row stride
    other than H; an offset that breaks 16-byte alignment); weight around 1 with both signs, as trained norms."""
    g = torch.Generator().manual_seed(seed)
    width = hidden + row_pad + col_offset

    def rows():
        base = torch.randn(num_rows, width, generator=g).to(dtype=dtype, device=device)
        return base[:, col_offset: col_offset + hidden]

    x = rows()
    res = 4 * rows() if residual else None  # the residual stream is larger than a layer's output
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype=dtype, device=device)
    return x, res, weight


def _check(backend, x, res, weight, *, msg=""):
    """Runs the op and checks both outputs against the torch reference in the same dtype and the fp64 oracle."""
    dtype = x.dtype
    normed, new_res = add_rms_norm(x, res, weight, eps=EPS, backend=backend)
    assert normed.shape == x.shape and normed.dtype == dtype and normed.is_contiguous(), msg
    torch_normed, torch_res = add_rms_norm_ref(x, res, weight, eps=EPS)
    if res is None:
        assert new_res is x, "without a residual, new_residual is x itself"
    else:
        assert new_res.shape == x.shape and new_res.dtype == dtype and new_res.is_contiguous(), msg
        # One fp32 add, one rounding: bit for bit the model's ``x + residual``.
        assert torch.equal(new_res, torch_res), f"{msg}: new_residual differs from x + residual"
        assert_close(new_res.cpu(), x.cpu().double() + res.cpu().double(), dtype=dtype, msg=msg)
    # normed is RMSNorm(new_residual): the oracle runs the same formula in fp64 on the same (rounded) input.
    oracle, _ = add_rms_norm_ref(torch_res.cpu().double(), None, weight.cpu().double(), eps=EPS)
    assert_close_to_oracle(normed.cpu(), torch_normed.cpu(), oracle, name=f"{backend} normed {msg}")
    if dtype != torch.float32:
        # The two roundings of HF's order (h * rrms, then weight *) leave only the sum-of-squares order and rsqrt
        # to differ from torch: few elements, by a unit or two in the last place. Rounding once instead (or
        # casting after the weight multiply) changes about a quarter of them.
        diff = normed.cpu().double() - torch_normed.cpu().double()
        differ = diff != 0
        count = int(differ.sum())
        assert count <= max(2, 0.02 * diff.numel()), f"{msg}: {count} of {diff.numel()} differ from torch"
        ulp = torch.finfo(dtype).eps * torch_normed.cpu().double().abs()
        assert (diff.abs() <= 2 * ulp)[differ].all(), f"{msg}: normed differs from torch by more than two ulps"
    return normed, new_res


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [7, 64, 896, 3584])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_matches_oracle(backend, device, dtype, hidden, with_residual):
    x, res, weight = _case(3, hidden, dtype, device, residual=with_residual, seed=hidden)
    _check(backend, x, res, weight, msg=f"{dtype} H={hidden}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_pad,col_offset", [(8, 0), (3, 1)], ids=["row-stride", "misaligned"])
def test_strided_rows(backend, device, dtype, row_pad, col_offset):
    # Views into wider buffers: a row stride other than H, and (misaligned) an offset that rules out 16-byte vectors.
    x, res, weight = _case(5, 64, dtype, device, row_pad=row_pad, col_offset=col_offset)
    assert x.stride(0) != 64
    _check(backend, x, res, weight, msg=f"strided {dtype}")
    _check(backend, x, None, weight, msg=f"strided {dtype} no residual")


@pytest.mark.parametrize("backend,device", TRITON_BACKENDS)
@pytest.mark.parametrize("hidden", [37, 64])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_triton_chunked_rows(backend, device, hidden, with_residual, monkeypatch):
    # Rows wider than one program's register tile take the two-pass path; force it at small widths.
    monkeypatch.setattr(MODULE, "_MAX_BLOCK", 16)
    x, res, weight = _case(3, hidden, torch.bfloat16, device, residual=with_residual, seed=hidden)
    _check(backend, x, res, weight, msg=f"chunked H={hidden}")


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_rows,hidden",
    # Thinker prefill; one CTA of 1024 threads (bf16 and fp32 at 8192); 4 vectors per thread; the streaming
    # CUDA variant and the chunked Triton path (20000 fp32, 70000); unaligned width (8193: no 16-byte vectors).
    [(1024, 3584), (4, 8192), (4, 20000), (3, 70000), (5, 8193), (4096, 896)],
)
def test_gpu_shapes(backend, device, dtype, num_rows, hidden):
    x, res, weight = _case(num_rows, hidden, dtype, device, seed=hidden)
    _check(backend, x, res, weight, msg=f"{dtype} T={num_rows} H={hidden}")
    _check(backend, x, None, weight, msg=f"{dtype} T={num_rows} H={hidden} no residual")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    x, res, weight = _case(0, 64, torch.float32, device)
    normed, new_res = add_rms_norm(x, res, weight, eps=EPS, backend=backend)
    assert normed.shape == (0, 64) and new_res.shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_reference_is_the_model_code(dtype, with_residual):
    # HF's Qwen2RMSNorm after the decoder layer's ``x = x + out``, bit for bit; and the model's RMSNorm (which runs
    # this op) with its default backend.
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    from omni_model.layers.norm import RMSNorm

    x, res, weight = _case(4, 96, dtype, "cpu", residual=with_residual)
    hf = qwen2.Qwen2RMSNorm(96, eps=EPS).to(dtype)
    ours = RMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(weight)
        ours.weight.copy_(weight)
        h = x + res if with_residual else x
        expect = hf(h)
        normed, new_res = add_rms_norm_ref(x, res, weight, eps=EPS)
        assert torch.equal(new_res, h) and torch.equal(normed, expect)
        assert torch.equal(ours(h), expect)
        layer_normed, layer_res = ours.add_forward(x, res)
        assert torch.equal(layer_normed, expect) and torch.equal(layer_res, h)


def test_reference_in_float64():
    # The oracle stays in float64 (no fp32 upcast that would round), and is the textbook formula.
    x, res, weight = _case(3, 50, torch.float64, "cpu")
    normed, new_res = add_rms_norm_ref(x, res, weight, eps=EPS)
    h = x + res
    expect = weight * h / torch.sqrt((h * h).mean(-1, keepdim=True) + EPS)
    assert normed.dtype == torch.float64
    torch.testing.assert_close(normed, expect, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(new_res, h, atol=0, rtol=0)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in available(OP, "cpu") else "torch"
    x, res, weight = _case(4, 32, torch.float32, "cpu")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def layer(x, res, weight):
        normed, new_res = add_rms_norm(x * 1, res, weight, eps=EPS, backend=backend)
        first, same = add_rms_norm(x * 1, None, weight, eps=EPS, backend=backend)
        return normed, new_res, first, same

    normed, new_res, first, same = layer(x, res, weight)
    expect_normed, expect_res = add_rms_norm_ref(x, res, weight, eps=EPS)
    torch.testing.assert_close(normed, expect_normed)
    torch.testing.assert_close(new_res, expect_res, atol=0, rtol=0)
    torch.testing.assert_close(first, add_rms_norm_ref(x, None, weight, eps=EPS)[0])
    torch.testing.assert_close(same, x, atol=0, rtol=0)


def _bad(**changes):
    x, res, weight = _case(3, 16, torch.float32, "cpu")
    args = dict(x=x, residual=res, weight=weight, eps=EPS)
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return args


@pytest.mark.parametrize(
    "changes,exc,match",
    [
        (dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
        (dict(x=lambda a: a["x"][None]), ValueError, "x must have 2 dims"),
        (dict(x=lambda a: a["x"][0]), ValueError, "x must have 2 dims"),
        (dict(x=lambda a: a["x"].to(torch.int32)), TypeError, "x must be one of"),
        (dict(x=lambda a: a["x"].double()), TypeError, "x must be one of"),
        (dict(x=lambda a: a["x"].t().contiguous().t()), ValueError, "x must have a contiguous last dim"),
        (dict(x=lambda a: a["x"][:, :0], residual=None, weight=lambda a: a["weight"][:0]), ValueError,
         "x must have a non-empty last dim"),
        (dict(residual=lambda a: a["residual"][:2]), ValueError, "residual must have shape"),
        (dict(residual=lambda a: a["residual"][:, :8]), ValueError, "residual must have shape"),
        (dict(residual=lambda a: a["residual"].half()), TypeError, "residual must have the dtype of x"),
        (dict(residual=lambda a: a["residual"][:, None]), ValueError, "residual must have 2 dims"),
        (dict(residual=lambda a: a["residual"].t().contiguous().t()), ValueError,
         "residual must have a contiguous last dim"),
        (dict(residual=lambda a: a["residual"].to("meta")), ValueError, "residual is on meta"),
        (dict(weight=lambda a: a["weight"][:8]), ValueError, "weight must have shape"),
        (dict(weight=lambda a: a["weight"][None]), ValueError, "weight must have 1 dims"),
        (dict(weight=lambda a: a["weight"].bfloat16()), TypeError, "weight must have the dtype of x"),
        (dict(weight=lambda a: a["weight"].repeat(2)[::2]), ValueError, "weight must have a contiguous last dim"),
        (dict(weight=lambda a: a["weight"].to("meta")), ValueError, "weight is on meta"),
        (dict(eps=0.0), ValueError, "eps must be finite and > 0"),
        (dict(eps=-1e-6), ValueError, "eps must be finite and > 0"),
        (dict(eps=math.nan), ValueError, "eps must be finite and > 0"),
        (dict(eps=math.inf), ValueError, "eps must be finite and > 0"),
        (dict(eps="1e-6"), TypeError, "eps must be a float"),
        (dict(eps=True), TypeError, "eps must be a float"),
        (dict(eps=torch.tensor(1e-6)), TypeError, "eps must be a float"),
    ],
)
def test_bad_arguments(changes, exc, match):
    args = _bad(**changes)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    # backend="cuda" cannot run on CPU tensors: the argument error must come first, before any dispatch.
    with pytest.raises(exc, match=match):
        add_rms_norm(**args, backend="cuda")
    for k, v in before.items():
        assert torch.equal(args[k], v), f"a rejected call must not write {k}"


def test_unknown_and_missing_backend():
    x, res, weight = _case(3, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        add_rms_norm(x, res, weight, eps=EPS, backend="cutlass")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        add_rms_norm(x, res, weight, eps=EPS, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_extension_binding_without_gpu():
    # The binding exists, takes None for the absent residual, and says clearly that there is no device.
    from omni_kernels import _cuda
    from omni_kernels._backend import cuda_extension

    if cuda_extension() is None:
        pytest.skip("omni_kernels._C is not built")
    x, _, weight = _case(2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="CUDA device"):
        cuda_extension().add_rms_norm(_cuda.ref(x), None, _cuda.ref(weight), _cuda.ref(x), None, EPS, 0)
