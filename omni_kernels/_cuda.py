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
_TENSOR_REF = None  # _C.TensorRef, bound on first use

# torch's raw current-stream query (what Triton's launcher and Inductor's generated code use): an int, without
# building a torch.cuda.Stream object per call. Absent from CPU-only builds of torch.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def ext():
    C = cuda_extension()
    if C is None:
        raise RuntimeError("omni_kernels._C is not built (install with nvcc present, or OMNI_BUILD_CUDA=1)")
    return C


def ref(t: torch.Tensor):
    """``_C.TensorRef`` of ``t`` (called several times per op call: torch.Size and the stride tuple go to pybind11
    as they are, no list copies)."""
    global _CODES, _TENSOR_REF
    if _CODES is None:
        _TENSOR_REF = ext().TensorRef
        _CODES = _dtype_codes()
    return _TENSOR_REF(t.data_ptr(), _CODES[t.dtype], t.shape, t.stride(), t.device.index or 0)


def stream(device: torch.device) -> int:
    """The handle of torch's current CUDA stream on ``device`` (the capture stream under CUDA-graph capture)."""
    if _raw_stream is None:
        return torch.cuda.current_stream(device).cuda_stream
    index = device.index
    return _raw_stream(index if index is not None else torch.cuda.current_device())
