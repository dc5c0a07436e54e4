// apply_tmrope: rotate q and k in place by TMRoPE (Qwen2.5-Omni's 3-D rotary embedding, rotate-half layout).
//   q:            (T, Hq, D), k: (T, Hk, D), last dim contiguous, any token / head stride
//   positions:    (3, T) int32 or int64 (temporal, height, width ids), any strides
//   inv_freq:     (D/2,) float32, HF's table (built once on the host: omni_kernels.apply_tmrope.tmrope_inv_freq)
//   section_t, section_th: frequency index i takes the temporal id for i < section_t, the height id for
//                 i < section_th, the width id after (mrope_section [16, 24, 24] -> 16, 40)
// The fused decode op tmrope_store_kv (csrc/tmrope_store_kv.cu) runs the same kernel with STORE = true: the
// rotated k rows and the v rows also go to the paged cache at slot_mapping[token] (slot -1: not cached).
//
// One CTA per token. Its threads first compute the D/2 cos/sin values of the token (fp32 angle = fp32 position *
// inv_freq, accurate sincosf since angles reach 1e4 rad and more, then rounded to the activation dtype as HF
// does) into shared memory, then rotate every (head, VEC frequencies) group of q and k with fp32 arithmetic and
// one rounding. VEC = 16 bytes of elements when every row and the half-row offset are 16-byte aligned (every
// Omni shape), else 1.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

struct TmropeParams {
  void* q;
  void* k;
  const void* positions;
  const float* inv_freq;
  const void* v;  // the fields below are used only with STORE
  void* k_cache;
  void* v_cache;
  const void* slot_mapping;
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, pos_stride_axis, pos_stride_t;
  int64_t v_stride_t, v_stride_h, kc_stride_b, kc_stride_p, kc_stride_h, vc_stride_b, vc_stride_p, vc_stride_h;
  int num_q_heads, num_k_heads, half, section_t, section_th, page_size;
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T val[VEC];
};

template <typename scalar_t, typename pos_t, typename slot_t, int VEC, bool STORE>
__global__ void tmrope_kernel(const TmropeParams p) {
  extern __shared__ float smem[];
  float* s_cos = smem;
  float* s_sin = smem + p.half;
  using vec_t = Vec<scalar_t, VEC>;
  const int64_t token = blockIdx.x;
  const int half = p.half;

  const pos_t* pos = static_cast<const pos_t*>(p.positions) + token * p.pos_stride_t;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const int axis = i < p.section_t ? 0 : (i < p.section_th ? 1 : 2);
    // A lone fp32 multiply (nothing to contract into an FMA): the same angle as HF's fp32 matmul with K = 1.
    const float angle = static_cast<float>(pos[axis * p.pos_stride_axis]) * p.inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    s_cos[i] = to_float(from_float<scalar_t>(c));
    s_sin[i] = to_float(from_float<scalar_t>(s));
  }
  __syncthreads();

  int64_t slot = -1, block = 0, offset = 0;
  if constexpr (STORE) {
    slot = static_cast<int64_t>(static_cast<const slot_t*>(p.slot_mapping)[token]);
    if (slot >= 0) {
      block = slot / p.page_size;
      offset = slot % p.page_size;
    }
  }

  const int groups = half / VEC;  // VEC divides D/2 (checked by the launcher)
  const int rotate_items = (p.num_q_heads + p.num_k_heads) * groups;
  // With STORE (and a slot) the v rows are copied too: 2 * groups vectors per kv head.
  const int total = rotate_items + ((STORE && slot >= 0) ? p.num_k_heads * 2 * groups : 0);
  for (int item = threadIdx.x; item < total; item += blockDim.x) {
    if (item < rotate_items) {
      const int h = item / groups;
      const int i0 = (item - h * groups) * VEC;
      const bool is_q = h < p.num_q_heads;
      const int kh = h - p.num_q_heads;
      scalar_t* row = is_q ? static_cast<scalar_t*>(p.q) + token * p.q_stride_t + h * p.q_stride_h
                           : static_cast<scalar_t*>(p.k) + token * p.k_stride_t + kh * p.k_stride_h;
      const vec_t x1 = *reinterpret_cast<const vec_t*>(row + i0);
      const vec_t x2 = *reinterpret_cast<const vec_t*>(row + half + i0);
      vec_t o1, o2;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float c = s_cos[i0 + j];
        const float s = s_sin[i0 + j];
        const float a = to_float(x1.val[j]);
        const float b = to_float(x2.val[j]);
        // rotate_half(x) = (-x2, x1): out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin.
        o1.val[j] = from_float<scalar_t>(a * c - b * s);
        o2.val[j] = from_float<scalar_t>(b * c + a * s);
      }
      *reinterpret_cast<vec_t*>(row + i0) = o1;
      *reinterpret_cast<vec_t*>(row + half + i0) = o2;
      if constexpr (STORE) {
        if (!is_q && slot >= 0) {
          scalar_t* dst = static_cast<scalar_t*>(p.k_cache) + block * p.kc_stride_b + offset * p.kc_stride_p +
                          kh * p.kc_stride_h;
          *reinterpret_cast<vec_t*>(dst + i0) = o1;
          *reinterpret_cast<vec_t*>(dst + half + i0) = o2;
        }
      }
    } else if constexpr (STORE) {
      const int rest = item - rotate_items;
      const int h = rest / (2 * groups);
      const int d = (rest - h * 2 * groups) * VEC;  // covers [0, D) in VEC steps
      const scalar_t* src = static_cast<const scalar_t*>(p.v) + token * p.v_stride_t + h * p.v_stride_h;
      scalar_t* dst =
          static_cast<scalar_t*>(p.v_cache) + block * p.vc_stride_b + offset * p.vc_stride_p + h * p.vc_stride_h;
      *reinterpret_cast<vec_t*>(dst + d) = *reinterpret_cast<const vec_t*>(src + d);
    }
  }
}

// Rows of `t` (all dims but the last) and the half-row offset start on 16-byte boundaries.
bool rows_aligned16(const TensorRef& t, int64_t half, int elem_bytes) {
  if (t.ptr % 16 != 0 || (half * elem_bytes) % 16 != 0) return false;
  for (int i = 0; i < t.dim() - 1; ++i) {
    if ((t.stride(i) * elem_bytes) % 16 != 0) return false;
  }
  return true;
}

template <typename scalar_t, typename pos_t, typename slot_t, int VEC, bool STORE>
void launch(const TmropeParams& p, int64_t num_tokens, cudaStream_t stream) {
  const int groups = p.half / VEC;
  const int work = (p.num_q_heads + p.num_k_heads) * groups + (STORE ? p.num_k_heads * 2 * groups : 0);
  const int threads = std::min(256, std::max(32, (std::max(work, p.half) + 31) / 32 * 32));
  const size_t smem = 2 * static_cast<size_t>(p.half) * sizeof(float);
  tmrope_kernel<scalar_t, pos_t, slot_t, VEC, STORE><<<num_tokens, threads, smem, stream>>>(p);
  OMNI_CHECK_LAUNCH();
}

template <typename scalar_t, typename pos_t, bool STORE>
void launch_for_slot(const TmropeParams& p, bool vec, DType slot_dtype, int64_t num_tokens, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if constexpr (STORE) {
    if (slot_dtype == DType::kInt32) {
      vec ? launch<scalar_t, pos_t, int32_t, kVec, STORE>(p, num_tokens, stream)
          : launch<scalar_t, pos_t, int32_t, 1, STORE>(p, num_tokens, stream);
      return;
    }
  }
  vec ? launch<scalar_t, pos_t, int64_t, kVec, STORE>(p, num_tokens, stream)
      : launch<scalar_t, pos_t, int64_t, 1, STORE>(p, num_tokens, stream);
}

}  // namespace

namespace detail {

// Shared by apply_tmrope and tmrope_store_kv (the cache arguments are null for the former). Shapes, dtypes and
// value ranges were checked by the Python front doors.
void tmrope_launch(const TensorRef& q, const TensorRef& k, const TensorRef& positions, const TensorRef& inv_freq,
                   int section_t, int section_th, const TensorRef* v, const TensorRef* k_cache,
                   const TensorRef* v_cache, const TensorRef* slot_mapping, std::uintptr_t stream_handle) {
  ensure_device();
  const int64_t num_tokens = q.size(0);
  if (num_tokens == 0) return;
  const bool store = v != nullptr;
  OMNI_CHECK(!store || (k_cache && v_cache && slot_mapping), "tmrope: the cache store needs k_cache, v_cache, slots");
  OMNI_CHECK(num_tokens <= INT32_MAX, "tmrope: too many tokens for one launch: " << num_tokens);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);

  TmropeParams p{};
  p.q = q.data<void>();
  p.k = k.data<void>();
  p.positions = positions.data<void>();
  p.inv_freq = inv_freq.data<float>();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.pos_stride_axis = positions.stride(0);
  p.pos_stride_t = positions.stride(1);
  p.num_q_heads = static_cast<int>(q.size(1));
  p.num_k_heads = static_cast<int>(k.size(1));
  p.half = static_cast<int>(q.size(2) / 2);
  p.section_t = section_t;
  p.section_th = section_th;
  if (store) {
    p.v = v->data<void>();
    p.k_cache = k_cache->data<void>();
    p.v_cache = v_cache->data<void>();
    p.slot_mapping = slot_mapping->data<void>();
    p.v_stride_t = v->stride(0);
    p.v_stride_h = v->stride(1);
    p.kc_stride_b = k_cache->stride(0);
    p.kc_stride_p = k_cache->stride(1);
    p.kc_stride_h = k_cache->stride(2);
    p.vc_stride_b = v_cache->stride(0);
    p.vc_stride_p = v_cache->stride(1);
    p.vc_stride_h = v_cache->stride(2);
    p.page_size = static_cast<int>(k_cache->size(1));
  }
  const DType slot_dtype = store ? slot_mapping->dtype : DType::kInt64;

  OMNI_DISPATCH_FLOAT(q.dtype, "apply_tmrope", scalar_t, [&] {
    const int elem = static_cast<int>(sizeof(scalar_t));
    constexpr int kVec = 16 / sizeof(scalar_t);
    bool vec = p.half % kVec == 0 && rows_aligned16(q, p.half, elem) && rows_aligned16(k, p.half, elem);
    if (store) {
      vec = vec && rows_aligned16(*v, p.half, elem) && rows_aligned16(*k_cache, p.half, elem) &&
            rows_aligned16(*v_cache, p.half, elem);
    }
    const bool pos64 = positions.dtype == DType::kInt64;
    if (store) {
      pos64 ? launch_for_slot<scalar_t, int64_t, true>(p, vec, slot_dtype, num_tokens, stream)
            : launch_for_slot<scalar_t, int32_t, true>(p, vec, slot_dtype, num_tokens, stream);
    } else {
      pos64 ? launch_for_slot<scalar_t, int64_t, false>(p, vec, slot_dtype, num_tokens, stream)
            : launch_for_slot<scalar_t, int32_t, false>(p, vec, slot_dtype, num_tokens, stream);
    }
  });
}

}  // namespace detail

void apply_tmrope(const TensorRef& q, const TensorRef& k, const TensorRef& positions, const TensorRef& inv_freq,
                  int section_t, int section_th, std::uintptr_t stream) {
  detail::tmrope_launch(q, k, positions, inv_freq, section_t, section_th, nullptr, nullptr, nullptr, nullptr,
                        stream);
}

}  // namespace omni
