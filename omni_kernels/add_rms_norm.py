"""add_rms_norm: the residual add and the Qwen2 RMSNorm that follows it, fused into one pass over the row.

Used twice per decoder layer of the Thinker (H 3584 at 7B) and the Talker (H 896), and once before the LM head:
``residual = x + residual`` (the attention or MLP output added to the residual stream, in the activation dtype),
then ``normed = RMSNorm(residual)`` with HF's ``Qwen2RMSNorm`` order (omni_model/layers/norm.py)::

    h = x + residual                      # rounded to the activation dtype, as the model's ``x = x + attn_out``
    x32 = h.float()
    x32 = x32 * rsqrt(mean(x32 ** 2) + eps)
    normed = weight * x32.to(dtype)       # cast before the weight multiply: it matters in bf16

Unfused, torch runs this as about eight kernels that read and write the row again and again; the fused kernels
read x and residual once, write new_residual and normed once, and keep the row in registers in between.

``residual=None`` (the first layer: the embeddings are both the residual and the norm input) normalises x and
returns x itself as new_residual, with no copy.

Outputs are new tensors (vLLM's ``fused_add_rms_norm`` writes both results over its inputs instead). The bytes
moved are the same either way (two rows read, two rows written); new tensors keep the op functional, so
torch.compile needs no functionalisation copies and CUDA graphs take both outputs from their own memory pool,
and the caller's tensors are never overwritten.

Numerics: new_residual equals the torch reference bit for bit (one fp32 add, one rounding). normed follows the
same two roundings as HF; only the sum of squares runs in a different order (fp32, a tree instead of torch's
reduction) and rsqrt is the device's, so it is checked as a reduction (``assert_close_to_oracle``: at most twice
torch's own error against an fp64 oracle).

Shapes: x (T, H), residual (T, H) or None, same dtype, contiguous last dim, any row stride; weight (H,) of the
dtype of x; outputs (T, H) contiguous.
"""

from __future__ import annotations

import math

import torch

from omni_kernels import _backend, _cuda
from omni_kernels._checks import FLOAT_DTYPES, check_same_dtype, check_shape, check_tensor


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, *, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference (the oracle): the model's ``x + residual`` and ``RMSNorm.forward``, op for op.

    Returns ``(normed, new_residual)``; new_residual is ``x`` itself when ``residual`` is None. For bf16/fp16/fp32
    inputs the norm runs in fp32 exactly as omni_model/layers/norm.py; float64 inputs stay in float64 (the oracle).
    """
    h = x if residual is None else x + residual
    x32 = h.to(torch.promote_types(h.dtype, torch.float32))
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(h.dtype), h


def _new_outputs(x: torch.Tensor, residual: torch.Tensor | None) -> list[torch.Tensor]:
    """[normed] or [normed, new_residual]: the only allocations of the op (contiguous, whatever x's strides)."""
    count = 1 if residual is None else 2
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

# Widest row one program holds in registers; wider rows are processed in chunks of this many columns.
_MAX_BLOCK = 8192
# Target elements per program for narrow rows (several rows per program, e.g. tests' H = 7 or 64).
_TILE = 2048

if triton is not None:
    from omni_kernels.apply_tmrope import _round_to  # round-to-nearest-even, also under the CPU interpreter

    @triton.jit
    def _residual_tile(x_ptr, res_ptr, rows, cols, mask, x_stride, res_stride, HAS_RESIDUAL: tl.constexpr):
        # h = x + residual rounded to the activation dtype (fp32 values), or x.
        h = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
            h = _round_to(h + r, x_ptr.dtype.element_ty)
        return h

    @triton.jit
    def _normed_tile(h, rrms, w, dtype: tl.constexpr):
        # weight * (h * rrms).to(dtype), each product rounded to the activation dtype as torch does.
        return _round_to(w * _round_to(h * rrms[:, None], dtype), dtype).to(dtype)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
        num_rows, hidden, x_stride, res_stride, out_stride, new_res_stride, eps,
        HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    ):
        # Program: ROWS rows. One chunk (BLOCK >= H): the rows stay in registers between the sum of squares and
        # the output. Several chunks: a first pass writes new_residual and sums the squares, a second pass
        # recomputes h from x and residual (the same rounding, so the same values) and writes normed.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_mask = (rows < num_rows)[:, None]
        rows = rows.to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        dtype = x_ptr.dtype.element_ty
        if NUM_CHUNKS == 1:
            mask = row_mask & (cols < hidden)
            # weight loaded with the rows: its latency overlaps theirs instead of following the reduction.
            w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
            h = _residual_tile(x_ptr, res_ptr, rows, cols, mask, x_stride, res_stride, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(new_res_ptr + rows * new_res_stride + cols, h.to(dtype), mask=mask)
            rrms = tl.rsqrt(tl.sum(h * h, axis=1) / hidden + eps)
            tl.store(out_ptr + rows * out_stride + cols, _normed_tile(h, rrms, w, dtype), mask=mask)
        else:
            acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for chunk in range(NUM_CHUNKS):
                c = chunk * BLOCK + cols
                mask = row_mask & (c < hidden)
                h = _residual_tile(x_ptr, res_ptr, rows, c, mask, x_stride, res_stride, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    tl.store(new_res_ptr + rows * new_res_stride + c, h.to(dtype), mask=mask)
                acc += h * h
            rrms = tl.rsqrt(tl.sum(acc, axis=1) / hidden + eps)
            for chunk in range(NUM_CHUNKS):
                c = chunk * BLOCK + cols
                mask = row_mask & (c < hidden)
                w = tl.load(w_ptr + c, mask=c < hidden, other=0.0).to(tl.float32)
                h = _residual_tile(x_ptr, res_ptr, rows, c, mask, x_stride, res_stride, HAS_RESIDUAL)
                tl.store(out_ptr + rows * out_stride + c, _normed_tile(h, rrms, w, dtype), mask=mask)

    def _launch_triton(x, residual, weight, eps, normed, new_residual) -> None:
        num_rows, hidden = x.shape
        block = min(triton.next_power_of_2(hidden), _MAX_BLOCK)
        rows = max(1, min(_TILE // block, triton.next_power_of_2(num_rows)))
        has_res = residual is not None
        _add_rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x, residual if has_res else x, weight, normed, new_residual if has_res else normed,
            num_rows, hidden, x.stride(0), residual.stride(0) if has_res else 0, normed.stride(0),
            new_residual.stride(0) if has_res else 0, eps,
            HAS_RESIDUAL=has_res, ROWS=rows, BLOCK=block, NUM_CHUNKS=triton.cdiv(hidden, block),
            num_warps=4 if rows * block <= 2048 else 8,
        )


def _add_rms_norm_fake(x, residual, weight, eps):
    return _new_outputs(x, residual)


@_backend.kernel_op("omni::add_rms_norm_triton", mutates_args=(), fake=_add_rms_norm_fake)
def _add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> list[torch.Tensor]:
    """[normed, new_residual], or [normed] when residual is None (the front door returns x as new_residual)."""
    outs = _new_outputs(x, residual)
    if x.numel():
        _launch_triton(x, residual, weight, eps, outs[0], outs[1] if residual is not None else None)
    return outs



# ------------------------------------------------------------------------------------------------ cuda


@_backend.kernel_op("omni::add_rms_norm_cuda", mutates_args=(), fake=_add_rms_norm_fake)
def _add_rms_norm_cuda(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> list[torch.Tensor]:
    """As :func:`_add_rms_norm_triton`, with csrc/add_rms_norm.cu."""
    outs = _new_outputs(x, residual)
    if x.numel():
        has_res = residual is not None
        _cuda.ext().add_rms_norm(
            _cuda.ref(x), _cuda.ref(residual) if has_res else None, _cuda.ref(weight), _cuda.ref(outs[0]),
            _cuda.ref(outs[1]) if has_res else None, eps, _cuda.stream(x.device),
        )
    return outs



def _add_rms_norm_torch(x, residual, weight, eps) -> list[torch.Tensor]:
    normed, new_residual = add_rms_norm_ref(x, residual, weight, eps=eps)
    return [normed] if residual is None else [normed, new_residual]


_backend.register(
    "add_rms_norm",
    torch=_add_rms_norm_torch,
    triton=_add_rms_norm_triton if triton is not None else None,
    cuda=_add_rms_norm_cuda,
    # The torch reference stays the default on CUDA until a GPU benchmark (benchmarks/bench_add_rms_norm.py) shows
    # a kernel beating torch.compile of it; no GPU was available when these kernels were written.
    prefer=("torch", "triton", "cuda"),
)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    eps: float,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` (or x), ``normed = RMSNorm(new_residual)`` (Qwen2/HF order); returns
    ``(normed, new_residual)`` as new contiguous tensors (new_residual is x itself when residual is None).

    x: (T, H) fp32/fp16/bf16, contiguous last dim; residual: (T, H) of the same dtype, or None; weight: (H,) of the
    same dtype; eps > 0 (the config's ``rms_norm_eps``, 1e-6 for Qwen2.5-Omni).
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    device = x.device
    num_rows, hidden = x.shape
    if hidden == 0:
        raise ValueError(f"x must have a non-empty last dim (the normalised width), got shape {tuple(x.shape)}")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        check_shape("residual", residual, (num_rows, hidden))
        check_same_dtype(("x", "residual"), x, residual)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    check_shape("weight", weight, (hidden,))
    check_same_dtype(("x", "weight"), x, weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    outs = _backend.dispatch("add_rms_norm", device, backend)(x, residual, weight, float(eps))
    return outs[0], (x if residual is None else outs[1])
