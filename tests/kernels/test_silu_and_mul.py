import pytest
import torch
import torch.nn.functional as F

from omni_kernels import available, silu_and_mul, silu_and_mul_ref
from omni_kernels.testing import assert_close, backend_params

OP = "silu_and_mul"
BACKENDS = backend_params(OP)
GPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
# exp(-gate) overflows to inf for gate -100 (silu -> -0, as intended); numpy, under the Triton interpreter, warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _case(num_rows, inter, dtype, device, *, row_pad=0, col_offset=0, seed=0):
    """gate_up (T, 2I): gate columns then up columns, as a column slice of a wider buffer when ``row_pad`` /
    ``col_offset`` are given (a row stride other than 2I; an offset that rules out 16-byte vectors). The gate spans
    the range where silu bends and, in a few places, far into both tails (exp overflow at -100)."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * inter + row_pad + col_offset
    base = 2 * torch.randn(num_rows, width, generator=g)
    if num_rows and inter >= 4:
        base[0, col_offset: col_offset + 4] = torch.tensor([-100.0, -30.0, 30.0, 100.0])
    base = base.to(dtype=dtype, device=device)
    return base[:, col_offset: col_offset + 2 * inter]


def _oracle(gate_up):
    return silu_and_mul_ref(gate_up.cpu().double())


def _check(backend, gate_up, msg=""):
    out = silu_and_mul(gate_up, backend=backend)
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    assert out.shape == (num_rows, inter) and out.dtype == gate_up.dtype and out.is_contiguous(), msg
    # Elementwise: the per-dtype table against fp64, for the kernels (one rounding) and torch (two roundings) alike.
    assert_close(out.cpu(), _oracle(gate_up), dtype=gate_up.dtype, msg=f"{backend} {msg}")
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("inter", [7, 64, 896, 3584])
def test_matches_oracle(backend, device, dtype, inter):
    _check(backend, _case(3, inter, dtype, device, seed=inter), msg=f"{dtype} I={inter}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("row_pad,col_offset", [(16, 0), (3, 1)], ids=["row-stride", "misaligned"])
def test_strided_rows(backend, device, dtype, row_pad, col_offset):
    gate_up = _case(5, 64, dtype, device, row_pad=row_pad, col_offset=col_offset)
    assert gate_up.stride(0) != 128
    _check(backend, gate_up, msg=f"strided {dtype}")


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "num_rows,inter",
    # Thinker 7B decode and prefill, Talker 3B (4864), an unaligned width, and more rows than a CUDA grid's y.
    [(1, 18944), (8, 18944), (2048, 18944), (64, 4864), (5, 4867), (70000, 8)],
)
def test_gpu_shapes(backend, device, dtype, num_rows, inter):
    _check(backend, _case(num_rows, inter, dtype, device, seed=inter), msg=f"{dtype} T={num_rows} I={inter}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    assert silu_and_mul(_case(0, 64, torch.float32, device), backend=backend).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_is_the_model_code(dtype):
    # omni_model.layers.mlp.GatedMLP: down(act(gate) * up) with gate and up split from the fused projection.
    from omni_model.layers.mlp import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(24, 40).to(dtype)
    x = torch.randn(5, 24).to(dtype)
    with torch.no_grad():
        gate_up = mlp.gate_up_proj(x)
        gate, up = gate_up.split(40, dim=-1)
        assert torch.equal(silu_and_mul_ref(gate_up), F.silu(gate) * up)
        assert torch.equal(mlp(x), mlp.down_proj(F.silu(gate) * up))  # the MLP (which runs this op) unchanged


def test_reference_in_float64():
    gate_up = _case(3, 20, torch.float64, "cpu")
    gate, up = gate_up[:, :20], gate_up[:, 20:]
    out = silu_and_mul_ref(gate_up)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, gate / (1 + torch.exp(-gate)) * up, atol=1e-12, rtol=1e-12)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in available(OP, "cpu") else "torch"
    gate_up = _case(4, 32, torch.float32, "cpu")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def mlp_act(gate_up):
        return silu_and_mul(gate_up * 1, backend=backend) + 1

    torch.testing.assert_close(mlp_act(gate_up), silu_and_mul_ref(gate_up) + 1)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda t: "not a tensor", TypeError, "gate_up must be a torch.Tensor"),
        (lambda t: t[0], ValueError, "gate_up must have 2 dims"),
        (lambda t: t[None], ValueError, "gate_up must have 2 dims"),
        (lambda t: t[:, :15], ValueError, "gate_up must have an even, non-empty last dim"),
        (lambda t: t[:, :0], ValueError, "gate_up must have an even, non-empty last dim"),
        (lambda t: t.to(torch.int32), TypeError, "gate_up must be one of"),
        (lambda t: t.double(), TypeError, "gate_up must be one of"),
        (lambda t: t.t().contiguous().t(), ValueError, "gate_up must have a contiguous last dim"),
    ],
)
def test_bad_arguments(make, exc, match):
    gate_up = make(_case(3, 8, torch.float32, "cpu"))
    # backend="cuda" cannot run on CPU tensors: the argument error must come first, before any dispatch.
    with pytest.raises(exc, match=match):
        silu_and_mul(gate_up, backend="cuda")


def test_unknown_and_missing_backend():
    gate_up = _case(3, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        silu_and_mul(gate_up, backend="cutlass")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        silu_and_mul(gate_up, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_extension_binding_without_gpu():
    from omni_kernels import _cuda
    from omni_kernels._backend import cuda_extension

    if cuda_extension() is None:
        pytest.skip("omni_kernels._C is not built")
    gate_up = _case(2, 8, torch.float32, "cpu")
    out = torch.empty(2, 8)
    with pytest.raises(RuntimeError, match="CUDA device"):
        cuda_extension().silu_and_mul(_cuda.ref(gate_up), _cuda.ref(out), 0)
