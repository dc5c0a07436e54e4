"""w4a16_linear: ``x @ W + bias`` with W stored as 4-bit integers, one scale (and zero point) per group of rows.

Used by the Thinker decoder of the int4 checkpoints (Qwen2.5-Omni-7B-AWQ, -GPTQ-Int4): the fused ``qkv_proj``,
``o_proj``, the fused ``gate_up_proj`` and ``down_proj`` of every layer (omni_model/layers/quant_linear.py). The
checkpoint layouts (AWQ GEMM, GPTQ v1) are repacked once at load time (omni_model/quant.py) into the one layout
below, which every backend reads; docs/quantization.md explains both checkpoint layouts and this one.

Weights, for K input rows and N output columns, G = K / group_size groups:

* ``qweight`` int32 (K/8, N): 4-bit values q in [0, 15], 8 per word, packed along K in 32-row blocks. Word
  ``(4*b + t, n)`` holds, in nibble i (bits 4i..4i+3), row ``k = 32*b + 2*t + (i >> 2) + 8*(i & 3)`` of column n.
  That is the order of the B operand of the tensor-core ``mma.m16n8k16``: lane t of a quad needs rows
  2t, 2t+1, 2t+8, 2t+9 of each 16-row step, so one word holds its 8 values of a 32-row block, and nibbles i and
  i+4 (rows k, k+1) sit 16 bits apart, where one mask-and-or turns both into a pair of fp16/bf16 values.
  :func:`pack_w4a16` / :func:`unpack_w4a16` convert from / to a plain (K, N) matrix of values.
* ``scales`` (G, N), the dtype of x; ``zeros`` (G, N), the dtype of x, holding integers (0 to 16), or None for a
  zero point of 8 in every group (symmetric GPTQ).
* ``perm`` (K,) int32 or None: kernel row k multiplies activation column ``perm[k]`` (GPTQ ``desc_act``: rows
  sorted by their ``g_idx`` group at load time so that every group is contiguous).

``W[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]`` and
``out = x[:, perm] @ W + bias``.

Shapes: x (M, K) fp32/fp16/bf16 with a contiguous last dim, K a multiple of 32; N a multiple of 8; group_size a
multiple of 32 dividing K; bias (N,) or None; out (M, N) contiguous, dtype of x.

Kernels:

* decode (M <= 8): split-K GEMV. Triton: one tile of 16 rows (the smallest ``tl.dot``) per (column block,
  K slice), fp32 partial sums reduced by a second small kernel; CUDA: CUDA cores, 4 columns a thread, the
  activations of the K slice in shared memory, one read of every packed word.
* prefill (M > 8): a tiled GEMM on tensor cores (``tl.dot``; CUDA ``mma.sync.m16n8k16`` with a 4-stage
  ``cp.async`` pipeline), the weights dequantized in registers. fp32 activations take the CUDA-core kernel.

Numerics: every backend dequantizes ``(q - z) * s`` exactly in fp32 and rounds it once to the dtype of x (what the
reference does), then multiplies with fp32 accumulation (the CUDA GEMV keeps the weight in fp32). A reduction:
checked by flash-attention's rule against an fp64 oracle (``omni_kernels.testing.assert_close_to_oracle``).
"""

from __future__ import annotations

import functools

import torch

from omni_kernels import _backend, _cuda
from omni_kernels._checks import FLOAT_DTYPES, check_index_range, check_same_dtype, check_shape, check_tensor

KBLOCK = 32  # rows of K per interleaved block (4 words per column)
GEMV_MAX_M = 8  # rows up to which the split-K GEMV path runs
SYMMETRIC_ZERO = 8  # the zero point when ``zeros`` is None


@functools.cache
def _row_of_slot(device: torch.device) -> torch.Tensor:
    """(32,) int64: the row inside a 32-row block held by storage slot ``p = 8 * t + i`` (word t, nibble i)."""
    p = torch.arange(KBLOCK)
    t, i = p // 8, p % 8
    return (2 * t + (i >> 2) + 8 * (i & 3)).to(device)


@functools.cache
def _slot_of_row(device: torch.device) -> torch.Tensor:
    """(32,) int64: the inverse of :func:`_row_of_slot`."""
    return torch.argsort(_row_of_slot(torch.device("cpu"))).to(device)


def pack_w4a16(q: torch.Tensor) -> torch.Tensor:
    """(K, N) integer values in [0, 15] (K a multiple of 32) -> ``qweight`` (K/8, N) int32 in the kernel layout."""
    if q.dim() != 2 or q.shape[0] % KBLOCK:
        raise ValueError(f"q must be (K, N) with K a multiple of {KBLOCK}, got shape {tuple(q.shape)}")
    k, n = q.shape
    # One nibble position at a time (a load-time transient of two (K/8, N) int64 tensors, not eight): nibble i of
    # word row 4b + t comes from row 32b + row_of_slot[8t + i].
    word_rows = torch.arange(k // 8, device=q.device)
    base = KBLOCK * (word_rows // 4)
    slot = 8 * (word_rows % 4)
    row_of_slot = _row_of_slot(q.device)
    words = torch.zeros(k // 8, n, dtype=torch.int64, device=q.device)
    for i in range(8):
        words |= q[base + row_of_slot[slot + i]].to(torch.int64) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack_w4a16(qweight: torch.Tensor) -> torch.Tensor:
    """``qweight`` (K/8, N) int32 in the kernel layout -> (K, N) int32 values in [0, 15], rows in K order."""
    words, n = qweight.shape[0], qweight.shape[1]
    shifts = (4 * torch.arange(8, device=qweight.device, dtype=torch.int32)).view(1, 8, 1)
    nibbles = (qweight.view(words, 1, n) >> shifts) & 0xF  # arithmetic shift, then the mask drops the sign bits
    slots = nibbles.reshape(words // 4, KBLOCK, n)
    return slots[:, _slot_of_row(qweight.device)].reshape(8 * words, n)


def dequantize_w4a16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
                     group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (K, N) weight ``(q - z) * s``, computed in fp32 (fp64 for fp64 scales), then cast to ``dtype``
    (default: the dtype of scales)."""
    compute = torch.float64 if scales.dtype == torch.float64 else torch.float32
    q = unpack_w4a16(qweight).to(compute)
    z = SYMMETRIC_ZERO if zeros is None else zeros.to(compute).repeat_interleave(group_size, 0)
    w = (q - z) * scales.to(compute).repeat_interleave(group_size, 0)
    return w.to(dtype or scales.dtype)


def w4a16_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    group_size: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch reference (the oracle): dequantizes the whole weight to the dtype of x, then one matmul
    (``addmm`` with the bias, as ``F.linear``). fp64 inputs give the fp64 oracle."""
    w = dequantize_w4a16(qweight, scales, zeros, group_size=group_size, dtype=x.dtype)
    if perm is not None:
        x = x.index_select(1, perm.long())
    return x @ w if bias is None else torch.addmm(bias, x, w)


# ------------------------------------------------------------------------------------------------ planning


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU (the Triton interpreter): small, so that the test shapes split K too


def split_k(n_programs: int, k_tiles: int, num_sms: int, max_tiles: int | None = None) -> tuple[int, int]:
    """(K tiles per split, splits) of the decode path: enough (column block, K slice) programs for two per SM,
    no empty slice, at most ``max_tiles`` tiles per slice. The 7B ``down_proj`` (N 3584 = 28 CUDA column blocks,
    K 18944 = 592 tiles of 32) on 132 SMs: 10 splits of 60 tiles."""
    want = max(1, -(-2 * num_sms // max(n_programs, 1)))
    per = max(1, -(-k_tiles // want))
    if max_tiles is not None:
        per = min(per, max_tiles)
    return per, -(-k_tiles // per)


def _block_k(group_size: int, cap: int = 128) -> int:
    """Rows per Triton K tile: the largest of 128, 64, 32 (at most ``cap``) that divides the group (one group per
    tile)."""
    return next(b for b in (128, 64, 32) if b <= cap and group_size % b == 0)


# ------------------------------------------------------------------------------------------------ triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pure-torch install
    triton = None

if triton is not None:
    from omni_kernels.apply_tmrope import _round_to  # round-to-nearest-even, also under the CPU interpreter

    @triton.jit
    def _w4a16_linear_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr,
        M, N, x_stride, out_stride, tiles_per_split, num_tiles, tiles_per_group,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Program: columns [pid_n * BLOCK_N, +BLOCK_N) of rows [pid_m * BLOCK_M, +BLOCK_M) over the K tiles of
        # split pid_k. PARTIAL: fp32 sums go to out_ptr[pid_k] (the reduce kernel adds the splits and the bias).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        # Slot p of a tile is nibble p % 8 of word row p // 8; the K row it holds (the layout of pack_w4a16):
        p = tl.arange(0, BLOCK_K)
        word = p // 8
        nib = p % 8
        row_of_slot = 32 * (word // 4) + 2 * (word % 4) + nib // 4 + 8 * (nib % 4)
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        t_end = tl.minimum(pid_k * tiles_per_split + tiles_per_split, num_tiles)
        for t in range(pid_k * tiles_per_split, t_end):
            k0 = t * BLOCK_K
            # Each word is read by the 8 slots it holds (one cache line for all of them), then shifted.
            w_rows = (k0 // 8 + word).to(tl.int64)
            words = tl.load(qw_ptr + w_rows[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0)
            q = ((words >> (4 * nib)[:, None]) & 0xF).to(tl.float32)
            g = (t // tiles_per_group).to(tl.int64)
            s = tl.load(s_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + g * N + cols, mask=col_ok, other=0.0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], 8.0, tl.float32)
            w = (q - z[None, :]) * s[None, :]  # exact in fp32 (a 5-bit integer times a 16-bit scale)
            k_idx = k0 + row_of_slot
            if HAS_PERM:
                k_idx = tl.load(perm_ptr + k_idx)
            a = tl.load(x_ptr + rows64[:, None] * x_stride + k_idx[None, :], mask=row_ok[:, None], other=0.0)
            if DOT_FP32:  # the CPU interpreter: the rounded operands, multiplied in fp32
                acc = tl.dot(a.to(tl.float32), _round_to(w, dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(dtype), acc, input_precision=PRECISION)
        out_mask = row_ok[:, None] & col_ok[None, :]
        if PARTIAL:
            dst = out_ptr + (pid_k * M + rows64)[:, None] * N + cols[None, :]
            tl.store(dst, acc, mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            dst = out_ptr + rows64[:, None] * out_stride + cols[None, :]
            tl.store(dst, _round_to(acc, dtype).to(dtype), mask=out_mask)

    @triton.jit
    def _w4a16_reduce_kernel(
        part_ptr, bias_ptr, out_ptr, M, N, splits, out_stride,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Program: columns [pid_n * BLOCK_N, +BLOCK_N) of row pid_m: the sum over the splits (fp32), plus bias.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s in range(0, splits):
            acc += tl.load(part_ptr + (s * M + row) * N + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * out_stride + cols, _round_to(acc, dtype).to(dtype), mask=col_ok)


def _new_output(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[0], qweight.shape[1], dtype=x.dtype, device=x.device)


def _w4a16_linear_fake(x, qweight, scales, zeros, perm, bias, group_size):
    return _new_output(x, qweight)


@_backend.kernel_op("omni::w4a16_linear_triton", mutates_args=(), fake=_w4a16_linear_fake)
def _w4a16_linear_triton(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
) -> torch.Tensor:
    out = _new_output(x, qweight)
    m, k = x.shape
    n = qweight.shape[1]
    if m == 0:
        return out
    cpu = x.device.type == "cpu"
    if m <= GEMV_MAX_M:  # decode: one 16-row tile, K split over programs
        block_m, block_n, block_k, warps, stages = 16, 64, _block_k(group_size), 4, 4
        num_tiles = k // block_k
        tiles_per_split, splits = split_k(triton.cdiv(n, block_n), num_tiles, _num_sms(x.device))
    else:  # prefill: a GEMM tile per program, the whole K (64 x 128 x 64: the dequantized tile stays in registers)
        block_m, block_n, block_k, warps, stages = 64, 64 if cpu else 128, _block_k(group_size, 64), 8, 3
        num_tiles = k // block_k
        tiles_per_split, splits = num_tiles, 1
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else None
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    _w4a16_linear_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, perm if perm is not None else qweight,
        bias if bias is not None else scales, partial if partial is not None else out,
        m, n, x.stride(0), out.stride(0), tiles_per_split, num_tiles, group_size // block_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_ZEROS=zeros is not None, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
        PARTIAL=partial is not None, DOT_FP32=cpu, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    if partial is not None:
        block = min(triton.next_power_of_2(n), 1024)
        _w4a16_reduce_kernel[(m, triton.cdiv(n, block))](
            partial, bias if bias is not None else partial, out, m, n, splits, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=block, num_warps=4,
        )
    return out


# ------------------------------------------------------------------------------------------------ cuda

CUDA_GEMV_COLS = 128  # columns per CTA of the CUDA GEMV (32 lanes x 4)
CUDA_GEMV_SMEM = 32 * 1024  # bytes of fp32 activations one GEMV CTA stages


@_backend.kernel_op("omni::w4a16_linear_cuda", mutates_args=(), fake=_w4a16_linear_fake)
def _w4a16_linear_cuda(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    perm: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
) -> torch.Tensor:
    """As :func:`_w4a16_linear_triton`, with csrc/w4a16_linear.cu. The GEMV (M <= 8, and fp32 in chunks of 8
    rows) reads ``perm`` itself; the GEMM loads 16-byte rows of x with cp.async, so the gather by ``perm`` (and a
    copy of x whose rows are not 16-byte aligned) happens here first."""
    out = _new_output(x, qweight)
    m, k = x.shape
    n = qweight.shape[1]
    if m == 0:
        return out
    gemv = m <= GEMV_MAX_M or x.dtype == torch.float32
    partial = None
    blocks_per_split = k // KBLOCK
    if gemv:
        rows = min(m, GEMV_MAX_M)
        rows_tile = 1 << (rows - 1).bit_length()  # the kernel's row template: 1, 2, 4 or 8
        blocks_per_split, splits = split_k(-(-n // CUDA_GEMV_COLS), k // KBLOCK, _num_sms(x.device),
                                           max_tiles=CUDA_GEMV_SMEM // (4 * KBLOCK * rows_tile))
        if splits > 1:
            partial = torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    else:
        if perm is not None:
            x = x.index_select(1, perm.long())
            perm = None
        elif x.stride(0) % 8 or x.data_ptr() % 16:
            x = x.contiguous()
    ref = _cuda.ref
    _cuda.ext().w4a16_linear(
        ref(x), ref(qweight), ref(scales), ref(zeros) if zeros is not None else None,
        ref(perm) if perm is not None else None, ref(bias) if bias is not None else None, ref(out),
        ref(partial) if partial is not None else None, group_size, blocks_per_split, _cuda.stream(x.device),
    )
    return out


def _w4a16_linear_torch(x, qweight, scales, zeros, perm, bias, group_size):
    return w4a16_linear_ref(x, qweight, scales, zeros, group_size=group_size, perm=perm, bias=bias)


_backend.register(
    "w4a16_linear",
    torch=_w4a16_linear_torch,
    triton=_w4a16_linear_triton if triton is not None else None,
    cuda=_w4a16_linear_cuda,
    # The torch reference stays the default on CUDA until a GPU benchmark (benchmarks/bench_w4a16_linear.py) shows
    # a kernel beating torch.compile of it; no GPU was available when these kernels were written.
    prefer=("torch", "triton", "cuda"),
)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    group_size: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x[:, perm] @ W + bias`` with ``W = (q - zeros) * scales`` in groups of ``group_size`` rows; a new
    contiguous (M, N) tensor in the dtype of x.

    x: (M, K) fp32/fp16/bf16, contiguous last dim, K a multiple of 32. qweight: (K/8, N) int32, contiguous, in the
    layout of :func:`pack_w4a16`, N a multiple of 8. scales: (K/group_size, N) contiguous, dtype of x. zeros:
    the same shape and dtype (integer values 0..16), or None for a zero point of 8. group_size: a multiple of 32
    dividing K. perm: (K,) int32 in [0, K) (kernel row k reads column perm[k] of x; a permutation for desc_act),
    or None. bias: (N,) of the dtype of x, or None.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    device = x.device
    m, k = x.shape
    if k == 0 or k % KBLOCK:
        raise ValueError(f"x: K = x.shape[1] must be a positive multiple of {KBLOCK}, got shape {tuple(x.shape)}")
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,), device=device)
    check_shape("qweight", qweight, (k // 8, None))
    n = qweight.shape[1]
    if n == 0 or n % 8:
        raise ValueError(f"qweight: N = qweight.shape[1] must be a positive multiple of 8, got {n}")
    if not qweight.is_contiguous():
        raise ValueError("qweight must be contiguous (the packed layout of pack_w4a16)")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0 or group_size % KBLOCK or k % group_size:
        raise ValueError(f"group_size must be a positive multiple of {KBLOCK} dividing K={k}, got {group_size}")
    groups = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None and name == "zeros":
            continue
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        check_shape(name, t, (groups, n))
        check_same_dtype(("x", name), x, t)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if perm is not None:
        check_tensor("perm", perm, ndim=1, dtypes=(torch.int32,), device=device)
        check_shape("perm", perm, (k,))
        check_index_range("perm", perm, 0, k)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        check_shape("bias", bias, (n,))
        check_same_dtype(("x", "bias"), x, bias)
    if m == 0:
        return torch.empty(0, n, dtype=x.dtype, device=device)
    return _backend.dispatch("w4a16_linear", device, backend)(x, qweight, scales, zeros, perm, bias, group_size)
