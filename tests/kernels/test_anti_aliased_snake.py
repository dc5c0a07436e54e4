import pytest
import torch

from omni_kernels import anti_aliased_snake, anti_aliased_snake_ref, available
from omni_kernels.anti_aliased_snake import kaiser_sinc_filter
from omni_kernels.testing import assert_close, backend_params

OP = "anti_aliased_snake"
BACKENDS = backend_params(OP)
GPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(batch, channels, length, dtype, device, *, seed=0, skewed_filters=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, generator=g).to(dtype=dtype, device=device)
    alpha = (0.5 * torch.randn(channels, generator=g)).to(device)
    beta = (0.5 * torch.randn(channels, generator=g)).to(device)
    up, down = kaiser_sinc_filter(), kaiser_sinc_filter()
    if skewed_filters:  # asymmetric taps: a reversed or shifted tap order would show
        up = up + 0.05 * torch.randn(12, generator=g)
        down = down + 0.05 * torch.randn(12, generator=g)
    return x, alpha, beta, up.to(device), down.to(device)


def _oracle(x, alpha, beta, up, down):
    return anti_aliased_snake_ref(*(t.cpu().double() for t in (x, alpha, beta, up, down)))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 2, 7, 23, 61, 1001])
@pytest.mark.parametrize("skewed", [False, True], ids=["kaiser", "skewed"])
def test_matches_oracle(backend, device, dtype, length, skewed):
    x, alpha, beta, up, down = _case(2, 3, length, dtype, device, seed=length, skewed_filters=skewed)
    y = anti_aliased_snake(x, alpha, beta, up, down, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y.cpu(), _oracle(x, alpha, beta, up, down), dtype=dtype, msg=f"{backend} T={length}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_input_and_parameter_layouts(backend, device):
    # x as a channel-strided view, bf16 parameters, filters as HF's (1, 1, 12) buffers.
    base, alpha, beta, up, down = _case(2, 8, 300, torch.float32, device, skewed_filters=True)
    x = base[:, ::2]
    alpha, beta = alpha[:4].bfloat16(), beta[:4].bfloat16()
    y = anti_aliased_snake(x, alpha, beta, up.view(1, 1, 12), down.view(1, 1, 12), backend=backend)
    assert_close(y.cpu(), _oracle(x, alpha, beta, up, down), dtype=torch.float32)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,length", [(1536, 257), (768, 1500), (384, 4500), (24, 72000)])
def test_bigvgan_shapes(backend, device, dtype, channels, length):
    # conv_pre width, and the first / second / last upsampling stages of a 3 s clip (300 mel frames).
    x, alpha, beta, up, down = _case(1, channels, length, dtype, device, seed=channels)
    y = anti_aliased_snake(x, alpha, beta, up, down, backend=backend)
    assert_close(y.cpu(), _oracle(x, alpha, beta, up, down), dtype=dtype, msg=f"{backend} C={channels} T={length}")


@pytest.mark.parametrize("length", [1, 2, 23, 61, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_hf_module(length, dtype):
    pytest.importorskip("transformers")
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SnakeBeta, TorchActivation1d

    channels = 5
    act = TorchActivation1d(activation=SnakeBeta(channels)).to(dtype)
    with torch.no_grad():
        act.act.alpha.normal_(0.0, 0.5)
        act.act.beta.normal_(0.0, 0.5)
    x = torch.randn(2, channels, length, dtype=dtype)
    with torch.no_grad():
        expect = act(x)
    got = anti_aliased_snake_ref(x, act.act.alpha.detach(), act.act.beta.detach(), act.upsample.filter,
                                 act.downsample.filter)
    assert_close(got, expect)


def test_kaiser_filter_matches_hf():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import kaiser_sinc_filter1d

    for cutoff, half_width, taps in [(0.25, 0.3, 12), (0.25, 0.3, 13), (0.1, 0.05, 12)]:
        assert_close(kaiser_sinc_filter(cutoff, half_width, taps), kaiser_sinc_filter1d(cutoff, half_width, taps)[0, 0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    x, alpha, beta, up, down = _case(2, 3, 0, torch.float32, device)
    assert anti_aliased_snake(x, alpha, beta, up, down, backend=backend).shape == (2, 3, 0)


def test_custom_op_traces_under_compile():
    backend = "triton" if "triton" in available(OP, "cpu") else "torch"
    x, alpha, beta, up, down = _case(1, 4, 50, torch.float32, "cpu")
    expect = anti_aliased_snake_ref(x * 2, alpha, beta, up, down)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x):
        return anti_aliased_snake(x * 2, alpha, beta, up, down, backend=backend)

    assert_close(step(x), expect)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, "x must have 3 dims"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "x must be one of"),
        (lambda a: a.update(x=a["x"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "x must have a contiguous last dim"),
        (lambda a: a.update(alpha=a["alpha"][:2]), ValueError, "alpha must have shape"),
        (lambda a: a.update(beta=a["beta"][None]), ValueError, "beta must have 1 dims"),
        (lambda a: a.update(beta=a["beta"].long()), TypeError, "beta must be one of"),
        (lambda a: a.update(up_filter=a["up_filter"][:11]), ValueError, r"up_filter must have shape \(12,\)"),
        (lambda a: a.update(down_filter=a["down_filter"].view(1, 12)), ValueError, "down_filter must have shape"),
        (lambda a: a.update(down_filter=a["down_filter"].int()), TypeError, "down_filter must be one of"),
        (lambda a: a.update(up_filter=[0.1] * 12), TypeError, "up_filter must be a torch.Tensor"),
    ],
)
def test_bad_arguments(mutate, exc, match):
    x, alpha, beta, up, down = _case(2, 3, 10, torch.float32, "cpu")
    args = dict(x=x, alpha=alpha, beta=beta, up_filter=up, down_filter=down)
    mutate(args)
    with pytest.raises(exc, match=match):
        anti_aliased_snake(**args)


def test_unknown_and_missing_backend():
    x, alpha, beta, up, down = _case(1, 2, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        anti_aliased_snake(x, alpha, beta, up, down, backend="cudnn")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        anti_aliased_snake(x, alpha, beta, up, down, backend="cuda")
