"""Argument checks shared by the front doors: every message names the argument.

Launchers check, kernels compute. Value-range checks on index tensors need their values, so they
run for CPU tensors (outside torch.compile tracing) and for CUDA tensors only with ``OMNI_CHECK_INDICES=1``
(a host sync per call, which would break CUDA-graph capture and cost a decode step its latency).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_contiguous: bool = True,
) -> None:
    # Runs several times per op call on the eager path: each tensor property is read once, cheapest tests first.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dim = t.dim()
    if ndim is not None and dim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        if not isinstance(dtypes, tuple):
            dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name} must be one of {names}, got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all arguments on one device)")
    if last_contiguous and dim > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """``shape`` may hold None for a free dim."""
    size = t.shape
    if len(size) == len(shape):
        for s, n in zip(shape, size):
            if s is not None and s != n:
                break
        else:
            return
    want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_same_dtype(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{names[1]} must have the dtype of {names[0]} ({a.dtype}), got {b.dtype}")


def indices_checkable(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # values are not known while tracing
        return False
    if t.device.type == "cpu":
        return True
    if os.environ.get("OMNI_CHECK_INDICES", "0") != "1":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_index_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every value of ``t`` must lie in [low, high) (checked where :func:`indices_checkable`)."""
    if t.numel() == 0 or not indices_checkable(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} values must lie in [{low}, {high}), got min {lo}, max {hi}")
