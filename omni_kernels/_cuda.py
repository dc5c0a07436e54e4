"""Glue between torch tensors and the pybind11 extension ``omni_kernels._C``.

The extension sees raw device pointers: :func:`ref` turns a tensor into a ``_C.TensorRef`` (pointer,
dtype, sizes, strides in elements) and :func:`stream` gives the current CUDA stream handle, so launches
land on torch's stream and are captured by CUDA graphs like any torch kernel.
"""

from __future__ import annotations

import torch

from omni_kernels._backend import cuda_extension


def _dtype_codes():
    C = cuda_extension()
    return {
        torch.float32: C.DType.float32,
        torch.float16: C.DType.float16,
        torch.bfloat16: C.DType.bfloat16,
        torch.int32: C.DType.int32,
        torch.int64: C.DType.int64,
    }


_CODES: dict | None = None


def ext():
    C = cuda_extension()
    if C is None:
        raise RuntimeError("omni_kernels._C is not built (install with nvcc present, or OMNI_BUILD_CUDA=1)")
    return C


def ref(t: torch.Tensor):
    global _CODES
    if _CODES is None:
        _CODES = _dtype_codes()
    return ext().TensorRef(t.data_ptr(), _CODES[t.dtype], list(t.shape), list(t.stride()), t.device.index or 0)


def stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
