"""The front doors' call path: compiled launchers are :class:`omni_kernels._backend.KernelOp`s that eager
calls run directly (no custom-op dispatch), ``torch.compile`` traces as custom ops, and autograd never sees cut
from the graph; the backend resolver's cache follows ``OMNI_BACKEND`` and ``TRITON_INTERPRET``.

Runs on CPU through the Triton interpreter (tiny shapes); the CUDA launchers go through the same KernelOp code.
"""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omni_kernels import _backend, anti_aliased_snake, anti_aliased_snake_ref, store_kv_cache, store_kv_cache_ref
from omni_kernels.anti_aliased_snake import kaiser_sinc_filter
from omni_kernels.testing import skip_unless_backend

# The op files converted to kernel_op; ops added later convert on their own schedule.
CONVERTED = sorted(_backend.registered())  # every op: its compiled launchers are all kernel ops
needs_triton_cpu = skip_unless_backend("store_kv_cache", "triton", "cpu")


def _module(op):
    return importlib.import_module(f"omni_kernels.{op}")


class _OmniOps(TorchDispatchMode):
    """Records the ``omni::`` ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "omni":
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """counted(kop) -> a list that grows by one per direct launch of KernelOp ``kop``."""

    def install(kop):
        calls = []
        real = kop.launch

        def launch(*args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(kop, "launch", launch)
        return calls

    return install


def _store_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    k_cache, v_cache = torch.randn(3, 4, 2, 16, generator=g), torch.randn(3, 4, 2, 16, generator=g)
    slots = torch.tensor([7, 0, -1, 11, 2])
    return k, v, k_cache, v_cache, slots


def _snake_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 20, generator=g)
    alpha, beta = 0.5 * torch.randn(3, generator=g), 0.5 * torch.randn(3, generator=g)
    return x, alpha, beta, kaiser_sinc_filter(), kaiser_sinc_filter()


@pytest.mark.parametrize("op", CONVERTED)
def test_compiled_launchers_are_kernel_ops(op):
    impls = _backend._OPS[op].impls
    compiled = [b for b in ("triton", "cuda") if b in impls]
    assert "cuda" in compiled, f"{op} registers no cuda launcher"
    for b in compiled:
        kop = impls[b]
        assert isinstance(kop, _backend.KernelOp), f"{op}/{b} is {type(kop).__name__}, not a KernelOp"
        assert not isinstance(kop.launch, _backend.KernelOp)
        qualname = f"omni::{op}_{b}"
        assert kop.qualname == qualname and kop.__name__ == f"_{op}_{b}"
        assert getattr(torch.ops.omni, f"{op}_{b}").default is not None, f"{qualname} is not a registered custom op"
        assert kop is getattr(_module(op), f"_{op}_{b}")


@needs_triton_cpu
def test_eager_call_launches_directly(counted, monkeypatch):
    kop = _backend._OPS["store_kv_cache"].impls["triton"]
    calls = counted(kop)

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(kop, "op", refuse)
    k, v, k_cache, v_cache, slots = _store_case()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(k, v, k_ref, v_ref, slots)
    with _OmniOps() as mode:
        store_kv_cache(k, v, k_cache, v_cache, slots, backend="triton")
    assert len(calls) == 1 and mode.seen == []
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    with torch.inference_mode():  # the model's mode: same path
        store_kv_cache(k, v, k_cache, v_cache, slots, backend="triton")
    assert len(calls) == 2


@needs_triton_cpu
def test_compile_traces_the_custom_op(counted):
    kop = _backend._OPS["store_kv_cache"].impls["triton"]
    calls = counted(kop)
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    @torch.compile(backend=recording_aot_eager, fullgraph=True)
    def step(k, v, k_cache, v_cache, slots):
        store_kv_cache(k * 1, v * 1, k_cache, v_cache, slots, backend="triton")
        return k_cache.sum()

    k, v, k_cache, v_cache, slots = _store_case(1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(k, v, k_ref, v_ref, slots)
    step(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert calls == [], "the compiled graph must run the custom op, not the direct launcher"
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "omni.store_kv_cache_triton.default" in targets, targets


def test_compiled_default_backend_does_not_recompile(monkeypatch):
    # backend=None resolves inside the traced function: the resolver's cache must not change under the graph's
    # guards (a write there made every compiled caller compile twice).
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=counting, fullgraph=True)
    def step(x, alpha, beta, up, down):
        return anti_aliased_snake(x * 1, alpha, beta, up, down) + 1  # CPU: the torch reference, traced

    _backend._RESOLVED.clear()
    args = _snake_case(3)
    expect = anti_aliased_snake_ref(*args) + 1
    for _ in range(3):
        torch.testing.assert_close(step(*args), expect)
    assert len(graphs) == 1


@needs_triton_cpu
def test_grad_inputs_go_through_the_custom_op(counted):
    # The custom op has no autograd formula: with grad mode on and an input that requires grad, the call is routed
    # to it (torch raises on backward) instead of launching directly (which would drop the graph silently).
    kop = _backend._OPS["anti_aliased_snake"].impls["triton"]
    calls = counted(kop)
    x, alpha, beta, up, down = _snake_case()
    expect = anti_aliased_snake_ref(x, alpha, beta, up, down)
    for grad_arg in ("x", "alpha"):
        args = dict(x=x.clone(), alpha=alpha.clone(), beta=beta, up_filter=up, down_filter=down)
        args[grad_arg] = torch.nn.Parameter(args[grad_arg]) if grad_arg == "alpha" else args[grad_arg].requires_grad_()
        with _OmniOps() as mode:
            y = anti_aliased_snake(**args, backend="triton")
        assert mode.seen == ["omni.anti_aliased_snake_triton.default"] and calls == []
        assert y.requires_grad
        torch.testing.assert_close(y.detach(), expect, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            y.sum().backward()
    args["alpha"] = torch.nn.Parameter(alpha.clone())
    with torch.no_grad():  # grad mode off: nothing to differentiate, the direct launch is right
        y = anti_aliased_snake(**args, backend="triton")
    assert len(calls) == 1 and not y.requires_grad


@needs_triton_cpu
def test_direct_in_place_write_bumps_versions():
    # Autograd must still see the in-place cache write of a direct launch (the custom op bumps the version counter
    # of its mutated arguments): a tensor saved for backward and then overwritten makes backward raise.
    k, v, k_cache, v_cache, slots = _store_case(2)
    w = torch.ones(k_cache.shape, requires_grad=True)
    loss = (w * k_cache).sum()  # saves k_cache for w's gradient
    before = (k_cache._version, v_cache._version, k._version)
    store_kv_cache(k, v, k_cache, v_cache, slots, backend="triton")
    assert k_cache._version > before[0] and v_cache._version > before[1] and k._version == before[2]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_triton_cpu
def test_fake_tensors_meet_the_fake(counted):
    from torch._subclasses.fake_tensor import FakeTensorMode

    kop = _backend._OPS["anti_aliased_snake"].impls["triton"]
    calls = counted(kop)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in _snake_case()]
        y = kop(*args)
    assert calls == [] and tuple(y.shape) == (1, 3, 20)


def test_kernel_op_rejects_unknown_mutated_args():
    with pytest.raises(ValueError, match="not parameters"):
        @_backend.kernel_op("omni_test::bad_mutation", mutates_args=("nope",), fake=lambda x: None)
        def _bad(x: torch.Tensor) -> None:
            pass


def test_resolver_cache_follows_the_environment(monkeypatch):
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    op = "store_kv_cache"
    cuda = torch.device("cuda", 0)  # resolving needs no device, only what is installed
    default = _backend.resolve(op, cuda)
    assert _backend.resolve(op, cuda) == default == _backend._resolve(op, cuda, None)
    monkeypatch.setenv("OMNI_BACKEND", "torch")
    assert _backend.resolve(op, cuda) == "torch" and _backend.resolve(op, "cpu") == "torch"
    if _backend.cuda_extension() is not None:
        assert default == "cuda", "cached before OMNI_BACKEND was set; the override must still win"
        assert _backend.resolve(op, cuda, "cuda") == "cuda", "an explicit backend wins over OMNI_BACKEND"
    monkeypatch.setenv("OMNI_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        _backend.resolve(op, "cpu")
    monkeypatch.delenv("OMNI_BACKEND")
    assert _backend.resolve(op, cuda) == default and _backend.resolve(op, "cpu") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve(op, "cpu", ["torch"])  # unhashable: still the resolver's own error
    if _backend.triton_importable():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.resolve(op, "cpu", "triton") == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            _backend.resolve(op, "cpu", "triton")
