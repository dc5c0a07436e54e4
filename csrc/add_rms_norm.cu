// add_rms_norm: new_residual = x + residual (rounded to the activation dtype), normed = RMSNorm(new_residual)
// with HF's Qwen2 order: weight * (h * rsqrt(mean(h^2) + eps)).to(dtype).
//   x, residual:          (T, H), last dim contiguous, any row stride; residual may be absent
//   weight:               (H,) contiguous, dtype of x
//   normed, new_residual: (T, H) (new_residual absent when residual is)
// One CTA per row. Each thread owns VEC-wide column vectors j = threadIdx.x + it * blockDim.x (16-byte vectors
// when every row start is 16-byte aligned, checked on the host; else VEC = 1) and keeps their fp32 values in
// registers (ITEMS vectors each) between the sum of squares and the output. Rows too wide for ITEMS = 4 take
// the streaming variant (ITEMS = 0), which recomputes h from x and residual in the second pass instead.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

constexpr int kMaxThreads = 1024;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_float(const T* __restrict__ p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = load_pack<T, VEC>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float(pack.v[e]);
}

// h = x + residual rounded to T (or x) at columns c .. c + VEC - 1 of a row; with STORE, h also goes to
// new_residual (only when there is a residual: without one, new_residual is x itself).
template <typename T, int VEC, bool HAS_RES, bool STORE>
__device__ __forceinline__ void residual_vec(const T* __restrict__ x, const T* __restrict__ res,
                                             T* __restrict__ new_res, int c, float (&h)[VEC]) {
  load_float<T, VEC>(x + c, h);
  if constexpr (HAS_RES) {
    float r[VEC];
    load_float<T, VEC>(res + c, r);
    Pack<T, VEC> pack;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      pack.v[e] = from_float<T>(h[e] + r[e]);
      h[e] = to_float(pack.v[e]);
    }
    if constexpr (STORE) *reinterpret_cast<Pack<T, VEC>*>(new_res + c) = pack;
  }
}

// out = weight * (h * rrms).to(T), both products rounded to T as torch does.
template <typename T, int VEC>
__device__ __forceinline__ void normed_vec(const float (&h)[VEC], float rrms, const Pack<T, VEC>& w,
                                           T* __restrict__ out) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    pack.v[e] = from_float<T>(to_float(w.v[e]) * to_float(from_float<T>(h[e] * rrms)));
  }
  *reinterpret_cast<Pack<T, VEC>*>(out) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the CTA (blockDim.x a multiple of 32); every thread calls it and gets the total.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kMaxThreads / 32];
  __shared__ float total;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

template <typename T, int VEC, int ITEMS, bool HAS_RES>
__global__ void __launch_bounds__(kMaxThreads)
    add_rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ weight,
                        T* __restrict__ out, T* __restrict__ new_res, int hidden, int64_t x_stride,
                        int64_t res_stride, int64_t out_stride, int64_t new_res_stride, float eps) {
  const int64_t row = blockIdx.x;
  const int num_vecs = hidden / VEC;
  const T* x_row = x + row * x_stride;
  const T* res_row = HAS_RES ? res + row * res_stride : nullptr;
  T* new_res_row = HAS_RES ? new_res + row * new_res_stride : nullptr;
  T* out_row = out + row * out_stride;

  float sum_sq = 0.f;
  if constexpr (ITEMS > 0) {
    float h[ITEMS][VEC];
    Pack<T, VEC> w[ITEMS];  // loaded with x: its latency overlaps the row's instead of following the reduction
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int c = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
      if (c < hidden) {
        w[it] = load_pack<T, VEC>(weight + c);
        residual_vec<T, VEC, HAS_RES, true>(x_row, res_row, new_res_row, c, h[it]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum_sq += h[it][e] * h[it][e];
      }
    }
    const float rrms = rsqrtf(block_sum(sum_sq) / static_cast<float>(hidden) + eps);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int c = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
      if (c < hidden) normed_vec<T, VEC>(h[it], rrms, w[it], out_row + c);
    }
  } else {
    for (int j = threadIdx.x; j < num_vecs; j += blockDim.x) {
      float h[VEC];
      residual_vec<T, VEC, HAS_RES, true>(x_row, res_row, new_res_row, j * VEC, h);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum_sq += h[e] * h[e];
    }
    const float rrms = rsqrtf(block_sum(sum_sq) / static_cast<float>(hidden) + eps);
    for (int j = threadIdx.x; j < num_vecs; j += blockDim.x) {
      float h[VEC];
      residual_vec<T, VEC, HAS_RES, false>(x_row, res_row, nullptr, j * VEC, h);
      normed_vec<T, VEC>(h, rrms, load_pack<T, VEC>(weight + j * VEC), out_row + j * VEC);
    }
  }
}

template <typename T, int VEC, int ITEMS, bool HAS_RES>
void launch(const TensorRef& x, const TensorRef* res, const TensorRef& weight, const TensorRef& out,
            const TensorRef* new_res, int threads, float eps, cudaStream_t stream) {
  add_rms_norm_kernel<T, VEC, ITEMS, HAS_RES><<<static_cast<unsigned>(x.size(0)), threads, 0, stream>>>(
      x.data<T>(), HAS_RES ? res->data<T>() : nullptr, weight.data<T>(), out.data<T>(),
      HAS_RES ? new_res->data<T>() : nullptr, static_cast<int>(x.size(1)), x.stride(0),
      HAS_RES ? res->stride(0) : 0, out.stride(0), HAS_RES ? new_res->stride(0) : 0, eps);
  OMNI_CHECK_LAUNCH();
}

template <typename T, int VEC, bool HAS_RES>
void launch_items(const TensorRef& x, const TensorRef* res, const TensorRef& weight, const TensorRef& out,
                  const TensorRef* new_res, float eps, cudaStream_t stream) {
  const int64_t num_vecs = x.size(1) / VEC;
  // Fewest vectors per thread that fit in one CTA; the streaming variant past 4 per thread.
  int items = 0;
  for (int candidate : {1, 2, 4}) {
    if (num_vecs <= static_cast<int64_t>(candidate) * kMaxThreads) {
      items = candidate;
      break;
    }
  }
  const int64_t per_thread = items > 0 ? items : 1;
  const int64_t wanted = (num_vecs + per_thread - 1) / per_thread;
  const int threads =
      static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (wanted + 31) / 32 * 32)));
  switch (items) {
    case 1: return launch<T, VEC, 1, HAS_RES>(x, res, weight, out, new_res, threads, eps, stream);
    case 2: return launch<T, VEC, 2, HAS_RES>(x, res, weight, out, new_res, threads, eps, stream);
    case 4: return launch<T, VEC, 4, HAS_RES>(x, res, weight, out, new_res, threads, eps, stream);
    default: return launch<T, VEC, 0, HAS_RES>(x, res, weight, out, new_res, threads, eps, stream);
  }
}

// Row starts and the row length all multiples of 16 bytes.
bool rows_aligned16(const TensorRef& t, int elem_bytes) {
  if (t.ptr % 16 != 0) return false;
  if (t.dim() == 2 && (t.stride(0) * elem_bytes) % 16 != 0) return false;
  return (t.size(-1) * elem_bytes) % 16 == 0;
}

}  // namespace

// Shapes, dtypes, devices and eps > 0 were checked by the Python front door; T > 0 and H > 0.
void add_rms_norm(const TensorRef& x, const std::optional<TensorRef>& residual, const TensorRef& weight,
                  const TensorRef& normed, const std::optional<TensorRef>& new_residual, double eps,
                  std::uintptr_t stream_handle) {
  ensure_device();
  OMNI_CHECK(residual.has_value() == new_residual.has_value(),
             "add_rms_norm: residual and new_residual must be given together");
  OMNI_CHECK(x.size(0) <= 0x7fffffff && x.size(1) <= 0x7fffffff,
             "add_rms_norm: rows and width must each be below 2^31, got " << x.size(0) << " x " << x.size(1));
  if (x.size(0) == 0 || x.size(1) == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const TensorRef* res = residual ? &*residual : nullptr;
  const TensorRef* new_res = new_residual ? &*new_residual : nullptr;
  const float eps_f = static_cast<float>(eps);
  OMNI_DISPATCH_FLOAT(x.dtype, "add_rms_norm", scalar_t, [&] {
    const int elem = static_cast<int>(sizeof(scalar_t));
    const bool vec = rows_aligned16(x, elem) && rows_aligned16(weight, elem) && rows_aligned16(normed, elem) &&
                     (!res || (rows_aligned16(*res, elem) && rows_aligned16(*new_res, elem)));
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (res) {
      vec ? launch_items<scalar_t, kVec, true>(x, res, weight, normed, new_res, eps_f, stream)
          : launch_items<scalar_t, 1, true>(x, res, weight, normed, new_res, eps_f, stream);
    } else {
      vec ? launch_items<scalar_t, kVec, false>(x, res, weight, normed, new_res, eps_f, stream)
          : launch_items<scalar_t, 1, false>(x, res, weight, normed, new_res, eps_f, stream);
    }
  });
}

}  // namespace omni
