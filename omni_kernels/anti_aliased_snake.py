"""anti_aliased_snake: BigVGAN's anti-aliased SnakeBeta activation, fused into one pass over x.

Omni's vocoder (BigVGAN in Token2Wav) applies it 18 times per upsampling stage (6 in each of the 3 AMP blocks) and
once before ``conv_post``, at (1, 768, 5 T), (1, 384, 15 T), ..., (1, 24, 240 T) for T mel frames. HF 4.57.6's
``TorchActivation1d(SnakeBeta)`` computes, per (batch, channel) row x of length T:

1. ``UpSample1d``: replicate-pad x by 5 on each side, ``2 * conv_transpose1d(stride 2)`` with the 12-tap
   Kaiser-sinc low-pass ``up_filter``, crop 15 samples on each side: u of length 2T;
2. ``SnakeBeta``: ``s = u + sin(exp(alpha) u)^2 / (exp(beta) + 1e-9)`` (alpha, beta per channel, log scale);
3. ``DownSample1d``: replicate-pad s by 5 on the left and 6 on the right, ``conv1d(stride 2)`` with
   ``down_filter``: y of length T.

Written out (k the tap, clamp to the row): ``u[2p] = 2 sum_i f[11 - 2i] x[p - 3 + i]``,
``u[2p + 1] = 2 sum_i f[10 - 2i] x[p - 2 + i]`` (i = 0..5), ``y[t] = sum_k g[k] s[clamp(2t + k - 5, 0, 2T - 1)]``.
So output t needs x[t - 6 .. t + 5]. The kernels (Triton and CUDA) give each program a tile of outputs of one row,
compute the upsampled values the tile needs once (in registers / shared memory), apply SnakeBeta and low-pass them
there: the (B, C, 2T) intermediate never goes to memory, x is read once and y written once.

Shapes: x (B, C, T) with a contiguous last dim; alpha, beta (C,) float; up_filter, down_filter (12,) or (1, 1, 12)
float (the checkpoint's ``upsample.filter`` / ``downsample.filter`` buffers, which HF derives with
``kaiser_sinc_filter1d(0.25, 0.3, 12)``: :func:`kaiser_sinc_filter` gives the same taps); y (B, C, T) contiguous,
dtype of x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from omni_kernels import _backend, _cuda
from omni_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor

TAPS = 12  # both resamplers of BigVGAN's anti-aliased activation (HF up_kernel_size = down_kernel_size = 12)
# HF's pads for ratio 2 and 12 taps: UpSample1d pad = taps // 2 - 1 = 5, crop pad * 2 + (taps - 2) // 2 = 15 on the
# left and pad * 2 + (taps - 1) // 2 = 15 on the right; DownSample1d pads taps // 2 - 1 = 5 left, taps // 2 = 6 right.
_UP_PAD, _UP_CROP_LEFT, _UP_CROP_RIGHT = 5, 15, 15
_DOWN_PAD_LEFT, _DOWN_PAD_RIGHT = 5, 6
_SNAKE_EPS = 1e-9  # HF SnakeBeta.no_div_by_zero


def kaiser_sinc_filter(cutoff: float = 0.25, half_width: float = 0.3, taps: int = TAPS) -> torch.Tensor:
    """The Kaiser-windowed sinc low-pass of BigVGAN's resamplers, normalised to sum 1: (taps,) float32.

    Kaiser's beta follows from the attenuation of the transition band ``half_width`` (Kaiser's formula); with an
    even tap count the taps sit at half-integer times. Defaults: the filter of both 2x resamplers.
    """
    half = taps // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    times = torch.arange(-half, half) + 0.5 if taps % 2 == 0 else torch.arange(taps) - half
    taps_ = 2 * cutoff * torch.kaiser_window(taps, periodic=False, beta=beta, dtype=torch.float32)
    taps_ = taps_ * torch.sinc(2 * cutoff * times)
    return taps_ / taps_.sum()


def anti_aliased_snake_ref(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, up_filter: torch.Tensor, down_filter: torch.Tensor
) -> torch.Tensor:
    """Plain torch reference (the oracle): HF's conv_transpose1d / SnakeBeta / conv1d chain, computed in fp32
    (fp64 for fp64 inputs) and returned in the dtype of x."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    up = up_filter.reshape(1, 1, TAPS).to(compute).expand(channels, 1, TAPS)
    down = down_filter.reshape(1, 1, TAPS).to(compute).expand(channels, 1, TAPS)
    h = F.pad(x.to(compute), (_UP_PAD, _UP_PAD), mode="replicate")
    h = 2 * F.conv_transpose1d(h, up, stride=2, groups=channels)
    h = h[..., _UP_CROP_LEFT: h.shape[-1] - _UP_CROP_RIGHT]
    a = torch.exp(alpha.to(compute))[None, :, None]
    b = torch.exp(beta.to(compute))[None, :, None]
    h = h + (1.0 / (b + _SNAKE_EPS)) * torch.sin(h * a).pow(2)
    h = F.pad(h, (_DOWN_PAD_LEFT, _DOWN_PAD_RIGHT), mode="replicate")
    return F.conv1d(h, down, stride=2, groups=channels).to(x.dtype)


try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pure-torch install
    triton = None

if triton is not None:

    @triton.jit
    def _anti_aliased_snake_kernel(
        x_ptr, alpha_ptr, beta_ptr, up_ptr, down_ptr, y_ptr,
        num_channels, length, x_stride_b, x_stride_c, y_stride_b, y_stride_c, tiles_per_row,
        BLOCK: tl.constexpr, ACCURATE_SIN: tl.constexpr,
    ):
        # Program: outputs t0 .. t0 + BLOCK - 9 of one (batch, channel) row. It works on BLOCK "extended" positions
        # p = t0 - 3 + i, holding both upsampled samples of each: s_even[p] = s[clamp(2p)], s_odd[p] = s[clamp(2p+1)].
        pid = tl.program_id(0)
        row = pid // tiles_per_row
        t0 = (pid % tiles_per_row) * (BLOCK - 8)
        batch = (row // num_channels).to(tl.int64)
        chan = row % num_channels
        x_row = x_ptr + batch * x_stride_b + chan.to(tl.int64) * x_stride_c
        freq = tl.exp(tl.load(alpha_ptr + chan).to(tl.float32))
        inv_mag = 1.0 / (tl.exp(tl.load(beta_ptr + chan).to(tl.float32)) + 1e-9)

        i = tl.arange(0, BLOCK)
        p = t0 - 3 + i
        pc = tl.minimum(tl.maximum(p, 0), length - 1)
        # u[2 pc] = 2 sum_j f[11 - 2j] x[pc - 3 + j] (j = 0..5), u[2 pc + 1] = 2 sum_j f[12 - 2j] x[pc - 3 + j]
        # (j = 1..6), x clamped to the row (replicate padding).
        u_even = tl.zeros([BLOCK], tl.float32)
        u_odd = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(7):
            xj = tl.load(x_row + tl.minimum(tl.maximum(pc + (j - 3), 0), length - 1)).to(tl.float32)
            if j <= 5:
                u_even += tl.load(up_ptr + (11 - 2 * j)).to(tl.float32) * xj
            if j >= 1:
                u_odd += tl.load(up_ptr + (12 - 2 * j)).to(tl.float32) * xj
        u_even = 2.0 * u_even
        u_odd = 2.0 * u_odd
        # fp32 outputs on a GPU: libdevice sinf (full range reduction); tl.sin may lower to the hardware
        # approximation, ample for 16-bit outputs (and the interpreter uses numpy's sin).
        if ACCURATE_SIN:
            sin_even = libdevice.sin(u_even * freq)
            sin_odd = libdevice.sin(u_odd * freq)
        else:
            sin_even = tl.sin(u_even * freq)
            sin_odd = tl.sin(u_odd * freq)
        s_even = u_even + inv_mag * (sin_even * sin_even)
        s_odd = u_odd + inv_mag * (sin_odd * sin_odd)
        # Replicate padding of s: past the end both samples are s[2T - 1] (an odd one), before the start s[0].
        s_even, s_odd = tl.where(p >= length, s_odd, s_even), tl.where(p < 0, s_even, s_odd)

        # y[t] = sum_{j=-2..3} g[2j + 5] s_even[t + j] + sum_{j=-3..2} g[2j + 6] s_odd[t + j]; t + j sits at
        # extended index i + 3 + j (clamped only for the lanes past the tile, which are not stored).
        acc = tl.zeros([BLOCK], tl.float32)
        for jj in tl.static_range(7):  # j = jj - 3
            idx = tl.minimum(i + jj, BLOCK - 1)
            if jj >= 1:
                acc += tl.load(down_ptr + (2 * jj - 1)).to(tl.float32) * tl.gather(s_even, idx, 0)
            if jj <= 5:
                acc += tl.load(down_ptr + 2 * jj).to(tl.float32) * tl.gather(s_odd, idx, 0)
        t = t0 + i
        y_row = y_ptr + batch * y_stride_b + chan.to(tl.int64) * y_stride_c
        tl.store(y_row + t, acc.to(y_ptr.dtype.element_ty), mask=(i < BLOCK - 8) & (t < length))


def _anti_aliased_snake_fake(x, alpha, beta, up_filter, down_filter):
    return x.new_empty(x.shape)


@_backend.kernel_op("omni::anti_aliased_snake_triton", mutates_args=(), fake=_anti_aliased_snake_fake)
def _anti_aliased_snake_triton(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, up_filter: torch.Tensor, down_filter: torch.Tensor
) -> torch.Tensor:
    batch, channels, length = x.shape
    y = torch.empty(batch, channels, length, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block = max(16, min(1024, triton.next_power_of_2(length + 8)))
    tiles = -(-length // (block - 8))
    _anti_aliased_snake_kernel[(batch * channels * tiles,)](
        x, alpha, beta, up_filter.reshape(TAPS), down_filter.reshape(TAPS), y,
        channels, length, x.stride(0), x.stride(1), y.stride(0), y.stride(1), tiles,
        BLOCK=block, ACCURATE_SIN=x.dtype == torch.float32 and not _backend.triton_interpret(), num_warps=4,
    )
    return y


@_backend.kernel_op("omni::anti_aliased_snake_cuda", mutates_args=(), fake=_anti_aliased_snake_fake)
def _anti_aliased_snake_cuda(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, up_filter: torch.Tensor, down_filter: torch.Tensor
) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y

    def fp32(t: torch.Tensor) -> torch.Tensor:  # no copy for the usual fp32 parameters and buffers
        if t.dtype == torch.float32 and t.is_contiguous():  # as is, no new views: the kernel reads size(-1) only
            return t
        return t.reshape(-1).to(torch.float32).contiguous()

    # Keep the converted parameters alive until the launch: a temporary freed before it would hand its memory
    # to the next conversion, and the kernel would read the wrong values.
    params = [fp32(t) for t in (alpha, beta, up_filter, down_filter)]
    _cuda.ext().anti_aliased_snake(_cuda.ref(x), *(_cuda.ref(t) for t in params), _cuda.ref(y), _cuda.stream(x.device))
    return y


_backend.register(
    "anti_aliased_snake",
    torch=anti_aliased_snake_ref,
    triton=_anti_aliased_snake_triton if triton is not None else None,
    cuda=_anti_aliased_snake_cuda,
    # H100, 2026-11-24 (benchmarks/results/h100-2026-11-24-*): 5-17x the torch reference on the BigVGAN stage shapes.
    prefer=("cuda", "triton", "torch"),
)


def _check_filter(name: str, f, device: torch.device) -> None:
    check_tensor(name, f, dtypes=FLOAT_DTYPES + (torch.float64,), device=device)
    if tuple(f.shape) not in ((TAPS,), (1, 1, TAPS)):
        raise ValueError(f"{name} must have shape ({TAPS},) or (1, 1, {TAPS}), got {tuple(f.shape)}")


def anti_aliased_snake(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    up_filter: torch.Tensor,
    down_filter: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """BigVGAN's anti-aliased SnakeBeta: 2x upsample (``up_filter``), SnakeBeta with per-channel log-scale
    ``alpha``/``beta``, 2x downsample (``down_filter``), replicate padding at both ends, as HF 4.57.6.

    x: (B, C, T) fp32/fp16/bf16; alpha, beta: (C,) float; up_filter, down_filter: (12,) or (1, 1, 12) float.
    Returns (B, C, T) in the dtype of x; the arithmetic is fp32.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    device = x.device
    channels = x.shape[1]
    for name, param in (("alpha", alpha), ("beta", beta)):
        check_tensor(name, param, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), device=device)
        check_shape(name, param, (channels,))
    _check_filter("up_filter", up_filter, device)
    _check_filter("down_filter", down_filter, device)
    impl = _backend.dispatch("anti_aliased_snake", device, backend)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    return impl(x, alpha, beta, up_filter, down_filter)
