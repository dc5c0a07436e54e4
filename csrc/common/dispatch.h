// Dtype dispatch for the floating types every op supports.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tensor.h"

#define OMNI_DISPATCH_FLOAT(DTYPE, NAME, scalar_t, ...)                                  \
  [&] {                                                                                   \
    switch (DTYPE) {                                                                      \
      case ::omni::DType::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }      \
      case ::omni::DType::kFloat16: { using scalar_t = __half; return __VA_ARGS__(); }     \
      case ::omni::DType::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: OMNI_CHECK(false, NAME << ": unsupported dtype " << ::omni::dtype_name(DTYPE)); \
    }                                                                                     \
  }()

namespace omni {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace omni
