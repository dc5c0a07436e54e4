// anti_aliased_snake: BigVGAN's 2x upsample -> SnakeBeta -> 2x downsample in one pass (see
// omni_kernels/anti_aliased_snake.py for HF's pads and the closed forms used here).
//   x:                       (B, C, T), last dim contiguous, any batch / channel stride
//   alpha, beta:             (C,) fp32, contiguous (log scale)
//   up_filter, down_filter:  (12,) fp32, contiguous
//   out:                     (B, C, T) contiguous
// One CTA per tile of kTile outputs of one (batch, channel) row:
//   1. x[t0 - 6 .. t0 + kTile + 6) (clamped to the row: replicate padding) -> shared memory, as fp32;
//   2. both upsampled samples of each position p in [t0 - 3, t0 + kTile + 3):
//        u[2p] = 2 sum_i f[11 - 2i] x[p - 3 + i], u[2p + 1] = 2 sum_i f[10 - 2i] x[p - 2 + i]  (i = 0..5),
//      SnakeBeta, then the replicate padding of the upsampled signal (index clamped to [0, 2T - 1]) ->
//      shared memory, even and odd samples in separate arrays (conflict-free reads below);
//   3. y[t] = sum_k g[k] s[clamp(2t + k - 5)] = sum_{j=-2..3} g[2j + 5] s_even[t + j]
//                                             + sum_{j=-3..2} g[2j + 6] s_odd[t + j].
// The upsampled row never leaves the SM; all arithmetic is fp32.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

constexpr int kTaps = 12;
constexpr int kThreads = 256;
constexpr int kTile = 1024;             // outputs per CTA
constexpr int kExt = kTile + 6;         // positions p = t0 - 3 .. t0 + kTile + 2
constexpr int kHalo = kTile + 12;       // x[t0 - 6 .. t0 + kTile + 5]

// SnakeBeta. fp32 outputs use sinf (full range reduction); 16-bit outputs cannot resolve its accuracy, so they use
// the hardware approximation (absolute error about 2^-20.5 over [-100 pi, 100 pi]).
template <bool kFastSin>
__device__ __forceinline__ float snake(float u, float freq, float inv_mag) {
  const float s = kFastSin ? __sinf(u * freq) : sinf(u * freq);
  return u + inv_mag * (s * s);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    anti_aliased_snake_kernel(const scalar_t* __restrict__ x, const float* __restrict__ alpha,
                              const float* __restrict__ beta, const float* __restrict__ up_filter,
                              const float* __restrict__ down_filter, scalar_t* __restrict__ out, int num_channels,
                              int64_t length, int64_t x_stride_b, int64_t x_stride_c, int64_t o_stride_b,
                              int64_t o_stride_c, int64_t tiles_per_row) {
  __shared__ float xs[kHalo];
  __shared__ float s_even[kExt];
  __shared__ float s_odd[kExt];
  __shared__ float g[kTaps];
  constexpr bool kFastSin = !std::is_same<scalar_t, float>::value;

  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t t0 = (blockIdx.x % tiles_per_row) * kTile;
  const int64_t batch = row / num_channels;
  const int chan = static_cast<int>(row % num_channels);
  const scalar_t* xr = x + batch * x_stride_b + chan * x_stride_c;
  const float freq = expf(alpha[chan]);
  const float inv_mag = 1.f / (expf(beta[chan]) + 1e-9f);
  if (threadIdx.x < kTaps) g[threadIdx.x] = down_filter[threadIdx.x];
  const int64_t x0 = t0 - 6;
  for (int i = threadIdx.x; i < kHalo; i += kThreads) {
    const int64_t t = min(max(x0 + i, static_cast<int64_t>(0)), length - 1);
    xs[i] = to_float(xr[t]);
  }
  __syncthreads();

  // Filter taps in registers: u[2p] = 2 sum_i f[11 - 2i] x[p - 3 + i], u[2p + 1] = 2 sum_i f[10 - 2i] x[p - 2 + i].
  float f_even[6], f_odd[6];
#pragma unroll
  for (int i = 0; i < 6; ++i) {
    f_even[i] = 2.f * __ldg(up_filter + 11 - 2 * i);  // the 2 is HF's `ratio *` after conv_transpose1d
    f_odd[i] = 2.f * __ldg(up_filter + 10 - 2 * i);
  }
  const int64_t p0 = t0 - 3;
  for (int i = threadIdx.x; i < kExt; i += kThreads) {
    // Position p = p0 + i, clamped to the row: pc - 3 + j for j = 0..6 indexes xs at pc - x0 - 3 + j, which
    // lies in [0, kHalo) for every pc the tile uses, and xs already holds the clamped (replicated) x values.
    const int64_t p = p0 + i;
    const float* w = xs + (min(max(p, static_cast<int64_t>(0)), length - 1) - x0 - 3);
    float u_even = 0.f, u_odd = 0.f;
#pragma unroll
    for (int j = 0; j < 6; ++j) {
      u_even = fmaf(f_even[j], w[j], u_even);
      u_odd = fmaf(f_odd[j], w[j + 1], u_odd);
    }
    const float se = snake<kFastSin>(u_even, freq, inv_mag);
    const float so = snake<kFastSin>(u_odd, freq, inv_mag);
    // Replicate padding of the upsampled signal: before the row both samples are s[0] (even), past its end both
    // are s[2T - 1] (odd).
    s_even[i] = p >= length ? so : se;
    s_odd[i] = p < 0 ? se : so;
  }
  __syncthreads();

  scalar_t* orow = out + batch * o_stride_b + chan * o_stride_c;
  for (int i = threadIdx.x; i < kTile; i += kThreads) {
    const int64_t t = t0 + i;
    if (t >= length) break;
    // t + j sits at extended index i + 3 + j.
    float acc = 0.f;
#pragma unroll
    for (int j = -2; j <= 3; ++j) acc = fmaf(g[2 * j + 5], s_even[i + 3 + j], acc);
#pragma unroll
    for (int j = -3; j <= 2; ++j) acc = fmaf(g[2 * j + 6], s_odd[i + 3 + j], acc);
    orow[t] = from_float<scalar_t>(acc);
  }
}

}  // namespace

// Shapes and dtypes were checked by the Python front door; the launcher hands fp32 contiguous parameters.
void anti_aliased_snake(const TensorRef& x, const TensorRef& alpha, const TensorRef& beta, const TensorRef& up_filter,
                        const TensorRef& down_filter, const TensorRef& out, std::uintptr_t stream_handle) {
  ensure_device();
  OMNI_CHECK(alpha.dtype == DType::kFloat32 && beta.dtype == DType::kFloat32 &&
                 up_filter.dtype == DType::kFloat32 && down_filter.dtype == DType::kFloat32,
             "anti_aliased_snake: alpha, beta and the filters must be float32");
  OMNI_CHECK(up_filter.size(-1) == kTaps && down_filter.size(-1) == kTaps,
             "anti_aliased_snake: the filters must have " << kTaps << " taps");
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t length = x.size(2);
  if (rows == 0 || length == 0) return;
  const int64_t tiles = (length + kTile - 1) / kTile;
  OMNI_CHECK(rows * tiles < (int64_t{1} << 31), "anti_aliased_snake: too many rows x tiles for one launch");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(x.dtype, "anti_aliased_snake", scalar_t, [&] {
    anti_aliased_snake_kernel<scalar_t><<<static_cast<unsigned>(rows * tiles), kThreads, 0, stream>>>(
        x.data<scalar_t>(), alpha.data<float>(), beta.data<float>(), up_filter.data<float>(),
        down_filter.data<float>(), out.data<scalar_t>(), static_cast<int>(x.size(1)), length, x.stride(0),
        x.stride(1), out.stride(0), out.stride(1), tiles);
    OMNI_CHECK_LAUNCH();
  });
}

}  // namespace omni
