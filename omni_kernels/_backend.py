"""The one place that picks an implementation for an op: ``backend=None|"torch"|"triton"|"cuda"``.

Every op module registers its implementations here; front doors call :func:`dispatch`. Rules:

* ``"torch"`` is the plain reference and always exists.
* ``"triton"`` needs the ``triton`` package; on CPU it also needs ``TRITON_INTERPRET=1`` set before
  triton is first imported (the interpreter is what the tests use).
* ``"cuda"`` needs the compiled extension ``omni_kernels._C`` and CUDA tensors.
* ``None`` means the fastest available for the device: the op's preference order on CUDA (set from its
  benchmark), the torch reference on CPU. ``OMNI_BACKEND`` overrides ``None`` (an explicit argument wins).

Asking for a backend that is missing is an error that says why, never a silent fallback.

Compiled launchers are declared with :func:`kernel_op`: a ``torch.library`` custom op (so that they trace under
``torch.compile``) that eager calls bypass (a custom-op call costs tens of microseconds of dispatcher and Python
round trips; the direct call costs about one). :func:`resolve` caches its answers, keyed by everything they
depend on (``OMNI_BACKEND`` included), so a front door pays a dict lookup, not the availability checks.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "cuda")


@dataclass
class _Op:
    impls: dict[str, Callable]
    prefer: tuple[str, ...]


_OPS: dict[str, _Op] = {}


def register(name: str, *, prefer: tuple[str, ...] = ("cuda", "triton", "torch"), **impls: Callable) -> None:
    """Registers the implementations of op ``name`` (keywords ``torch=``, ``triton=``, ``cuda=``).

    ``prefer`` is the order ``backend=None`` tries on a CUDA device; put a backend first only where its
    benchmark beats ``torch.compile`` of the reference.
    """
    unknown = set(impls) - set(BACKENDS)
    if unknown or "torch" not in impls:
        raise ValueError(f"register({name!r}): backends must include 'torch' and be among {BACKENDS}")
    _OPS[name] = _Op({k: v for k, v in impls.items() if v is not None}, tuple(b for b in prefer if b in impls))
    _RESOLVED.clear()


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def cuda_extension():
    """The compiled extension module, or None when it was not built."""
    try:
        from omni_kernels import _C
    except ImportError:
        return None
    return _C


def missing_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_importable():
            return "the triton package is not installed"
        if device.type == "cpu" and not triton_interpret():
            return "Triton runs on CPU only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA backend needs CUDA tensors, got {device.type} tensors"
        if cuda_extension() is None:
            return "omni_kernels._C is not built (install with nvcc present, or OMNI_BUILD_CUDA=1)"
        return None
    raise ValueError(f"backend must be one of None, {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def available(op: str, device: torch.device | str) -> list[str]:
    """The backends of ``op`` that can run on ``device`` on this machine."""
    device = torch.device(device)
    return [b for b in BACKENDS if b in _OPS[op].impls and missing_reason(b, device) is None]


# (op, device type, backend argument, OMNI_BACKEND) -> backend name, for answers that depend on nothing else.
_RESOLVED: dict[tuple, str] = {}


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """Which backend runs ``op`` for tensors on ``device``.

    Front doors call this on every op call: answers are cached per (op, device type, ``backend``, the value of
    ``OMNI_BACKEND`` when ``backend`` is None), which is all they depend on, except Triton on CPU (it depends on
    ``TRITON_INTERPRET``, tests flip it): that answer is recomputed each time. Errors are never cached. While
    ``torch.compile`` traces, the cache is left alone (a write there would invalidate the graph's guards: a
    recompile).
    """
    env = os.environ.get("OMNI_BACKEND") if backend is None else None
    if torch.compiler.is_compiling():
        return _resolve(op, torch.device(device), backend if backend is not None else env or None)
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (op, device_type, backend, env)
    try:
        name = _RESOLVED.get(key)
    except TypeError:  # an unhashable backend argument: _resolve says what is wrong with it
        name = None
    if name is None:
        name = _resolve(op, torch.device(device), backend if backend is not None else env or None)
        if name != "triton" or device_type != "cpu":
            _RESOLVED[key] = name
    return name


def _resolve(op: str, device: torch.device, backend: str | None) -> str:
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_OPS)}")
    entry = _OPS[op]
    if backend is None:
        if device.type != "cuda":
            return "torch"
        for b in entry.prefer:
            if missing_reason(b, device) is None:
                return b
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of None, {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    if backend not in entry.impls:
        raise ValueError(f"{op} has no {backend!r} backend; it has {sorted(entry.impls)}")
    reason = missing_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: {reason}")
    return backend


def dispatch(op: str, device: torch.device | str, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to call for tensors on ``device``."""
    return _OPS[op].impls[resolve(op, device, backend)]


def registered() -> dict[str, tuple[str, ...]]:
    """Op name -> the backends it implements (the backend matrix)."""
    return {name: tuple(b for b in BACKENDS if b in op.impls) for name, op in sorted(_OPS.items())}


# ----------------------------------------------------------------------------------------- compiled launchers


class KernelOp:
    """A compiled launcher (Triton or CUDA) that eager code calls directly and ``torch.compile`` sees as a custom op.

    Made by :func:`kernel_op`. Attributes: ``launch``, the plain Python launcher; ``op``, the
    ``torch.library.custom_op`` built from it (schema from its annotations, the fake registered), whose
    implementation is that same launcher. A call goes to

    * ``op`` while ``torch.compiler.is_compiling()`` (Dynamo tracing, AOT tracing, ``torch.export``): the graph
      holds ``torch.ops.<ns>.<name>`` and fake tensors only ever meet the fake;
    * ``op`` when a tensor argument is not a plain tensor (``torch.Tensor`` or ``nn.Parameter``: a FakeTensor,
      a functional or other subclass): the dispatcher knows what to do with those, the launcher does not;
    * ``op`` when grad mode is on and a tensor argument requires grad. The ops have no autograd formula; the
      direct call would hand back a result cut from the graph (silently wrong, i.e. missing, gradients), while
      the custom op keeps the forward and raises "no autograd formula was registered" on backward (torch's own
      error). Model code runs under ``no_grad`` / ``inference_mode``, where this check costs one flag read;
    * otherwise ``launch``, directly: no dispatcher, no boxing, about a microsecond instead of tens.

    The direct call needs nothing else: it runs the very function the custom op would run (its implementation
    is ``launch``), minus the dispatcher. Under CUDA-graph capture that is Python launching kernels on torch's
    current stream, which is the capture stream, exactly as inside the custom op (the launch is captured, the
    Python is not replayed). Under ``inference_mode`` the launcher allocates its outputs under the same mode as
    the custom op's implementation would. The one thing the dispatcher adds for ``mutates_args`` ops is the
    autograd version-counter bump of the mutated tensors (so that autograd detects a tensor saved for backward
    and then written in place): the direct call does it too (``torch._C._increment_version``, which skips
    inference tensors, as the dispatcher does). The custom op's schema would also coerce Python scalars (an
    int for a ``float`` parameter); the front doors already pass the annotated types. Tensors are looked for
    among the top-level arguments only (no op takes a list of tensors).
    """

    def __init__(self, launch: Callable, op, qualname: str, mutated: tuple[tuple[int, str], ...]) -> None:
        self.launch = launch
        self.op = op
        self.qualname = qualname
        self._mutated = mutated
        self.__name__ = launch.__name__
        self.__qualname__ = launch.__qualname__
        self.__module__ = launch.__module__
        self.__doc__ = launch.__doc__

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling() and _plain_call(args, kwargs):
            if self._mutated:
                n = len(args)
                torch._C._increment_version([args[i] if i < n else kwargs[name] for i, name in self._mutated])
            return self.launch(*args, **kwargs)
        return self.op(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<kernel_op {self.qualname}>"


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_call(args: tuple, kwargs: dict) -> bool:
    """True when a direct launch is equivalent to the custom op (see :class:`KernelOp`)."""
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()) if kwargs else args:
        if type(a) in _PLAIN_TENSORS:
            if grad and a.requires_grad:
                return False
        elif isinstance(a, torch.Tensor):
            return False
    return True


def kernel_op(qualname: str, *, mutates_args: Sequence[str], fake: Callable) -> Callable[[Callable], KernelOp]:
    """Decorator: declares a compiled launcher once as custom op ``qualname`` with ``fake`` as its fake
    implementation, and returns a :class:`KernelOp` that calls the launcher directly in eager mode.

    ``mutates_args`` names the tensor arguments the launcher writes in place (``()`` for none), as for
    ``torch.library.custom_op``; the launcher's annotations give the schema. Use::

        def _my_op_fake(q, k, scale):
            return q.new_empty(q.shape)

        @_backend.kernel_op("omni::my_op_triton", mutates_args=(), fake=_my_op_fake)
        def _my_op_triton(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
            ...  # allocate, launch, return
    """
    mutates_args = tuple(mutates_args)

    def wrap(launch: Callable) -> KernelOp:
        params = list(inspect.signature(launch).parameters)
        unknown = [n for n in mutates_args if n not in params]
        if unknown:
            raise ValueError(f"kernel_op({qualname!r}): mutates_args {unknown} are not parameters of {launch.__name__}")
        op = torch.library.custom_op(qualname, launch, mutates_args=mutates_args)
        op.register_fake(fake)
        return KernelOp(launch, op, qualname, tuple((params.index(n), n) for n in mutates_args))

    return wrap
