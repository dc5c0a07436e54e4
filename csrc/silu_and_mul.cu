// silu_and_mul: out = silu(gate) * up, gate_up = [gate | up] along the last dim (SwiGLU of the Qwen2 MLPs).
//   gate_up: (T, 2I), last dim contiguous, any row stride
//   out:     (T, I), last dim contiguous
// Elementwise: thread j of CTA (x, y) handles the VEC columns starting at (x * blockDim.x + j) * VEC of rows
// y, y + gridDim.y, ... (16-byte vectors when the row starts and I are 16-byte aligned, checked on the host;
// else VEC = 1). fp32 arithmetic, one rounding per output.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGridY = 65535;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    silu_and_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t num_rows, int inter,
                        int64_t in_stride, int64_t out_stride) {
  const int c = (blockIdx.x * kThreads + threadIdx.x) * VEC;
  if (c >= inter) return;  // no barriers in this kernel
  for (int64_t row = blockIdx.y; row < num_rows; row += gridDim.y) {
    const T* src = gate_up + row * in_stride + c;
    const Pack<T, VEC> gate = *reinterpret_cast<const Pack<T, VEC>*>(src);
    const Pack<T, VEC> up = *reinterpret_cast<const Pack<T, VEC>*>(src + inter);
    Pack<T, VEC> result;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float g = to_float(gate.v[e]);
      result.v[e] = from_float<T>(g / (1.f + expf(-g)) * to_float(up.v[e]));
    }
    *reinterpret_cast<Pack<T, VEC>*>(out + row * out_stride + c) = result;
  }
}

template <typename T, int VEC>
void launch(const TensorRef& gate_up, const TensorRef& out, cudaStream_t stream) {
  const int64_t num_rows = out.size(0);
  const int inter = static_cast<int>(out.size(1));
  const int64_t num_vecs = inter / VEC;
  const dim3 grid(static_cast<unsigned>((num_vecs + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min(num_rows, kMaxGridY)));
  silu_and_mul_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(gate_up.data<T>(), out.data<T>(), num_rows, inter,
                                                             gate_up.stride(0), out.stride(0));
  OMNI_CHECK_LAUNCH();
}

// Row starts and I all multiples of 16 bytes (then the up half of each row is aligned too).
bool aligned16(const TensorRef& gate_up, const TensorRef& out, int elem_bytes) {
  const int64_t inter_bytes = out.size(1) * elem_bytes;
  return gate_up.ptr % 16 == 0 && out.ptr % 16 == 0 && inter_bytes % 16 == 0 &&
         (gate_up.stride(0) * elem_bytes) % 16 == 0 && (out.stride(0) * elem_bytes) % 16 == 0;
}

}  // namespace

// Shapes and dtypes were checked by the Python front door: gate_up (T, 2I), out (T, I), one dtype.
void silu_and_mul(const TensorRef& gate_up, const TensorRef& out, std::uintptr_t stream_handle) {
  ensure_device();
  if (out.size(0) == 0 || out.size(1) == 0) return;
  OMNI_CHECK(out.size(1) < (int64_t{1} << 30), "silu_and_mul: I must be below 2^30, got " << out.size(1));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(gate_up.dtype, "silu_and_mul", scalar_t, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    aligned16(gate_up, out, static_cast<int>(sizeof(scalar_t))) ? launch<scalar_t, kVec>(gate_up, out, stream)
                                                                 : launch<scalar_t, 1>(gate_up, out, stream);
  });
}

}  // namespace omni
