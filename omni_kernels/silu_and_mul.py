"""silu_and_mul: the SwiGLU activation of the Qwen2 decoder MLPs, ``silu(gate) * up``, in one pass.

Used once per decoder layer of the Thinker (I = 18944 at 7B) and the Talker, between the fused ``gate_up_proj``
and ``down_proj`` of omni_model/layers/mlp.py: gate_up (T, 2I) holds the gate columns first, then the up columns
(``MergedLinear`` output sizes [I, I]). Unfused, torch runs ``F.silu(gate) * up`` as two kernels with a (T, I)
intermediate; the fused kernels read gate_up once and write out once.

Numerics: the torch reference rounds ``silu(gate)`` to the activation dtype and then the product; the kernels
compute ``gate / (1 + exp(-gate)) * up`` in fp32 and round once, so they are at least as close to the exact result.
An elementwise op: checked with the per-dtype table (``omni_kernels.testing.assert_close``) against an fp64 oracle.

Shapes: gate_up (T, 2I) with a contiguous last dim, any row stride; out (T, I) contiguous, dtype of gate_up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_kernels import _backend, _cuda
from omni_kernels._checks import FLOAT_DTYPES, check_tensor


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain torch reference (the oracle): the model's ``act(gate) * up`` with act = ``F.silu``, op for op."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def _new_output(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device)


# ------------------------------------------------------------------------------------------------ triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

_MAX_BLOCK = 1024  # columns of out per program

if triton is not None:
    from omni_kernels.apply_tmrope import _round_to  # round-to-nearest-even, also under the CPU interpreter

    @triton.jit
    def _silu_and_mul_kernel(
        gate_up_ptr, out_ptr, inter, in_stride, out_stride,
        BLOCK: tl.constexpr,
    ):
        # Program: columns [j * BLOCK, (j + 1) * BLOCK) of one row (rows on axis 0: no 65535 limit on T).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        src = gate_up_ptr + row * in_stride + cols
        gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * out_stride + cols, _round_to(out, dtype).to(dtype), mask=mask)


def _silu_and_mul_fake(gate_up):
    return _new_output(gate_up)


@_backend.kernel_op("omni::silu_and_mul_triton", mutates_args=(), fake=_silu_and_mul_fake)
def _silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    out = _new_output(gate_up)
    if out.numel():
        num_rows, inter = out.shape
        block = min(triton.next_power_of_2(inter), _MAX_BLOCK)
        _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        )
    return out



# ------------------------------------------------------------------------------------------------ cuda


@_backend.kernel_op("omni::silu_and_mul_cuda", mutates_args=(), fake=_silu_and_mul_fake)
def _silu_and_mul_cuda(gate_up: torch.Tensor) -> torch.Tensor:
    out = _new_output(gate_up)
    if out.numel():
        _cuda.ext().silu_and_mul(_cuda.ref(gate_up), _cuda.ref(out), _cuda.stream(gate_up.device))
    return out



_backend.register(
    "silu_and_mul",
    torch=silu_and_mul_ref,
    triton=_silu_and_mul_triton if triton is not None else None,
    cuda=_silu_and_mul_cuda,
    # The torch reference stays the default on CUDA until a GPU benchmark (benchmarks/bench_silu_and_mul.py) shows
    # a kernel beating torch.compile of it; no GPU was available when these kernels were written.
    prefer=("torch", "triton", "cuda"),
)


def silu_and_mul(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` (SwiGLU, gate columns first), as a new contiguous (T, I) tensor.

    gate_up: (T, 2I) fp32/fp16/bf16 with a contiguous last dim (the fused gate/up projection output).
    """
    check_tensor("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES)
    if gate_up.shape[1] == 0 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even, non-empty last dim (gate columns, then up columns), got shape "
                         f"{tuple(gate_up.shape)}")
    return _backend.dispatch("silu_and_mul", gate_up.device, backend)(gate_up)
