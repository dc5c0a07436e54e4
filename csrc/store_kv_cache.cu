// store_kv_cache: scatter the new keys and values of T tokens into the paged cache.
//   k, v:              (T, Hk, D), last dim contiguous, any token / head stride
//   k_cache, v_cache:  (NB, P, Hk, D), last dim contiguous
//   slot_mapping:      (T,) int32 or int64, slot = block * P + offset; -1 skips the token
// One CTA per token; each thread moves VEC elements at a time (16-byte vectors when the
// head rows are aligned, which is the case for every Omni shape).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

template <typename scalar_t, typename index_t, int VEC>
__global__ void store_kv_cache_kernel(const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                      scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache,
                                      const index_t* __restrict__ slot_mapping, int num_heads, int head_dim,
                                      int page_size, int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                                      int64_t v_stride_h, int64_t kc_stride_b, int64_t kc_stride_p,
                                      int64_t kc_stride_h, int64_t vc_stride_b, int64_t vc_stride_p,
                                      int64_t vc_stride_h) {
  const int64_t token = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slot_mapping[token]);
  if (slot < 0) return;
  const int64_t block = slot / page_size;
  const int64_t offset = slot % page_size;
  const int vecs_per_head = head_dim / VEC;
  const int total = num_heads * vecs_per_head;
  using vec_t = typename std::conditional<VEC == 1, scalar_t, uint4>::type;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / vecs_per_head;
    const int d = (i % vecs_per_head) * VEC;
    const int64_t src_k = token * k_stride_t + h * k_stride_h + d;
    const int64_t src_v = token * v_stride_t + h * v_stride_h + d;
    const int64_t dst_k = block * kc_stride_b + offset * kc_stride_p + h * kc_stride_h + d;
    const int64_t dst_v = block * vc_stride_b + offset * vc_stride_p + h * vc_stride_h + d;
    *reinterpret_cast<vec_t*>(k_cache + dst_k) = *reinterpret_cast<const vec_t*>(k + src_k);
    *reinterpret_cast<vec_t*>(v_cache + dst_v) = *reinterpret_cast<const vec_t*>(v + src_v);
  }
}

template <typename scalar_t, typename index_t, int VEC>
void launch(const TensorRef& k, const TensorRef& v, const TensorRef& k_cache, const TensorRef& v_cache,
            const TensorRef& slot_mapping, cudaStream_t stream) {
  const int64_t num_tokens = k.size(0);
  const int num_heads = static_cast<int>(k.size(1));
  const int head_dim = static_cast<int>(k.size(2));
  const int threads = std::min(256, std::max(32, num_heads * head_dim / VEC));
  store_kv_cache_kernel<scalar_t, index_t, VEC><<<num_tokens, threads, 0, stream>>>(
      k.data<scalar_t>(), v.data<scalar_t>(), k_cache.data<scalar_t>(), v_cache.data<scalar_t>(),
      slot_mapping.data<index_t>(), num_heads, head_dim, static_cast<int>(k_cache.size(1)), k.stride(0),
      k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
      v_cache.stride(0), v_cache.stride(1), v_cache.stride(2));
  OMNI_CHECK_LAUNCH();
}

bool aligned16(const TensorRef& t, int elem_bytes) {
  if (t.ptr % 16 != 0) return false;
  for (int i = 0; i < t.dim() - 1; ++i) {
    if ((t.stride(i) * elem_bytes) % 16 != 0) return false;
  }
  return (t.size(-1) * elem_bytes) % 16 == 0;
}

}  // namespace

// Shapes, dtypes and value ranges were checked by the Python front door.
void store_kv_cache(const TensorRef& k, const TensorRef& v, const TensorRef& k_cache, const TensorRef& v_cache,
                    const TensorRef& slot_mapping, std::uintptr_t stream_handle) {
  ensure_device();
  if (k.size(0) == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(k.dtype, "store_kv_cache", scalar_t, [&] {
    const int elem = static_cast<int>(sizeof(scalar_t));
    const bool vec = aligned16(k, elem) && aligned16(v, elem) && aligned16(k_cache, elem) &&
                     aligned16(v_cache, elem);
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (slot_mapping.dtype == DType::kInt64) {
      vec ? launch<scalar_t, int64_t, kVec>(k, v, k_cache, v_cache, slot_mapping, stream)
          : launch<scalar_t, int64_t, 1>(k, v, k_cache, v_cache, slot_mapping, stream);
    } else {
      vec ? launch<scalar_t, int32_t, kVec>(k, v, k_cache, v_cache, slot_mapping, stream)
          : launch<scalar_t, int32_t, 1>(k, v, k_cache, v_cache, slot_mapping, stream);
    }
  });
}

}  // namespace omni
