"""The one place that picks an implementation for an op: ``backend=None|"torch"|"triton"|"cuda"``.

Every op module registers its implementations here; front doors call :func:`dispatch`. Rules:

* ``"torch"`` is the plain reference and always exists.
* ``"triton"`` needs the ``triton`` package; on CPU it also needs ``TRITON_INTERPRET=1`` set before
  triton is first imported (the interpreter is what the tests use).
* ``"cuda"`` needs the compiled extension ``omni_kernels._C`` and CUDA tensors.
* ``None`` means the fastest available for the device: the op's preference order on CUDA (set from its
  benchmark), the torch reference on CPU. ``OMNI_BACKEND`` overrides ``None`` (an explicit argument wins).

Asking for a backend that is missing is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
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


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """Which backend runs ``op`` for tensors on ``device``."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_OPS)}")
    device = torch.device(device)
    entry = _OPS[op]
    if backend is None:
        backend = os.environ.get("OMNI_BACKEND") or None
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
