// paged_decode_attention: one query token per sequence over its paged KV cache (flash-decoding).
//   q:                 (B, Hq, D), last dim contiguous, any batch / head stride
//   k_cache, v_cache:  (NB, P, Hk, D), rows 16-byte aligned (checked by the Python launcher); any P
//   block_tables:      (B, max_blocks) int32; context_lens: (B,) int32 (0: a padded slot, output zeros)
//   out:               (B, Hq, D)
//   part_acc, part_ml: fp32 (B, Hq, num_parts, D) and (B, Hq, num_parts, 2) when num_parts > 1
//
// Grid (num_parts, Hk * head_chunks, B), 128 threads. A CTA owns one partition of <= 512 tokens of one
// sequence and one kv head, for GT query heads of its GQA group at once (the 7 heads of a Qwen2.5-Omni-7B
// thinker group share every K/V load). Three phases, as in vLLM's paged attention:
//   1. scores: 8 threads per token row, each loading 16 bytes at a time (a warp reads 4 rows as 4 full
//      128-byte lines per instruction, several rows in flight per thread), dot products with the GT query
//      rows held in registers, reduced by 3 shuffles; scores (already in log2 units) go to shared memory;
//   2. softmax over the partition: one warp per head, exp2 in place, (max, sum) kept;
//   3. values: the same row layout, acc[GT][D/8] per thread, reduced over the warp and then the CTA.
// Loads are software-pipelined: the next 128 bytes per thread are in flight while the current rows are
// used, and the first value rows are requested before the softmax.
// One partition: the CTA writes the normalised output. Several: it writes (max, sum, unnormalised acc) in
// fp32 and paged_decode_reduce_kernel combines them per (sequence, query head). All maths in fp32.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTPT = 8;              // threads per token row: 8 x 16 B = one 128-byte line per load
constexpr int kGroups = 32 / kTPT;   // token rows per warp per step
constexpr int kMaxPartition = 512;   // MAX_PARTITION in omni_kernels/paged_decode_attention.py
constexpr int kMaxReduceParts = 11 * 1024;  // reduce kernel: one float of shared memory per partition (<48 KB)

// 16 bytes of cache row -> kVec floats.
template <typename T> struct Pack;
template <> struct Pack<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static void unpack(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
};
template <> struct Pack<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void unpack(const uint4& r, float* f) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // element 2i is the low half (little endian); bf16 -> fp32 is a shift
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <> struct Pack<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void unpack(const uint4& r, float* f) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename scalar_t>
struct DecodeParams {
  const scalar_t* q;
  const scalar_t* k_cache;
  const scalar_t* v_cache;
  const int32_t* block_tables;
  const int32_t* context_lens;
  scalar_t* out;
  float* part_acc;
  float* part_ml;
  int64_t q_stride_b, q_stride_h;
  int64_t kc_stride_b, kc_stride_p, kc_stride_h;
  int64_t vc_stride_b, vc_stride_p, vc_stride_h;
  int64_t bt_stride_b, o_stride_b, o_stride_h;
  float scale_log2;  // softmax scale * log2(e): scores in log2 units, exp2 throughout
  int page_size, group_size, num_chunks, num_q_heads, head_dim, part_size, num_parts;
};

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* cache_row(const scalar_t* cache, const int32_t* bt, int t, int page_size,
                                                     int64_t stride_b, int64_t stride_p, int64_t head_off) {
  const int64_t block = bt[t / page_size];
  const int64_t offset = t % page_size;
  return cache + block * stride_b + offset * stride_p + head_off;
}

// Rows base + u * STEP + row_in_step (u < UNROLL) of the partition, 16 bytes per load; zeros past n_local.
template <typename scalar_t, int NL, int UNROLL, int STEP, int VEC>
__device__ __forceinline__ void load_rows(uint4 (&r)[UNROLL][NL], const scalar_t* cache, const int32_t* bt, int start,
                                          int base, int n_local, int row_in_step, int lane_g, int page_size,
                                          int64_t stride_b, int64_t stride_p, int64_t head_off) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int tl = base + u * STEP + row_in_step;
    if (tl < n_local) {
      const scalar_t* row = cache_row(cache, bt, start + tl, page_size, stride_b, stride_p, head_off);
#pragma unroll
      for (int j = 0; j < NL; ++j) r[u][j] = __ldg(reinterpret_cast<const uint4*>(row + (j * kTPT + lane_g) * VEC));
    } else {
#pragma unroll
      for (int j = 0; j < NL; ++j) r[u][j] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <int NL, int UNROLL>
__device__ __forceinline__ void copy_rows(uint4 (&dst)[UNROLL][NL], const uint4 (&src)[UNROLL][NL]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
    for (int j = 0; j < NL; ++j) dst[u][j] = src[u][j];
  }
}

template <typename scalar_t, int D, int GT>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const DecodeParams<scalar_t> p) {
  using Pk = Pack<scalar_t>;
  constexpr int VEC = Pk::kVec;
  static_assert(D % (kTPT * VEC) == 0, "head_dim must be a multiple of 8 x (16 bytes)");
  constexpr int NL = D / (kTPT * VEC);          // 16-byte loads per thread per row
  constexpr int EPT = NL * VEC;                 // elements per thread per row (D / 8)
  constexpr int UNROLL = NL >= 8 ? 1 : 8 / NL;  // rows in flight per thread: 128 bytes of loads
  constexpr int STEP = kWarps * kGroups;        // rows per CTA per unrolled slot
  constexpr int ITER = STEP * UNROLL;

  __shared__ float s_logits[GT][kMaxPartition];
  __shared__ float s_red[kWarps][GT][D];
  __shared__ float s_max[GT];
  __shared__ float s_sum[GT];

  const int part = blockIdx.x;
  const int kv_head = blockIdx.y / p.num_chunks;
  const int chunk = blockIdx.y % p.num_chunks;
  const int64_t b = blockIdx.z;
  const int head0 = kv_head * p.group_size + chunk * GT;
  const int n_active = min(GT, p.group_size - chunk * GT);
  const int ctx = p.context_lens[b];
  const int start = part * p.part_size;
  const int n_local = min(p.part_size, ctx - start);
  const bool split = p.num_parts > 1;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int grp = lane / kTPT;
  const int lane_g = lane % kTPT;

  if (n_local <= 0) {  // uniform over the CTA
    if (!split) {      // context 0: a padded batch slot gets zeros
      for (int i = tid; i < n_active * D; i += kThreads) {
        p.out[b * p.o_stride_b + static_cast<int64_t>(head0 + i / D) * p.o_stride_h + i % D] =
            from_float<scalar_t>(0.f);
      }
    }
    return;  // split: the reduce kernel reads only the partitions below the context length
  }

  // Query rows in registers, pre-scaled; element e = j * VEC + i is dim (j * kTPT + lane_g) * VEC + i.
  float qr[GT][EPT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const bool active = g < n_active;
    const scalar_t* qrow = p.q + b * p.q_stride_b + static_cast<int64_t>(head0 + (active ? g : 0)) * p.q_stride_h;
#pragma unroll
    for (int j = 0; j < NL; ++j) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        qr[g][j * VEC + i] = active ? to_float(qrow[(j * kTPT + lane_g) * VEC + i]) * p.scale_log2 : 0.f;
      }
    }
  }

  const int32_t* bt = p.block_tables + b * p.bt_stride_b;
  const int64_t k_head = static_cast<int64_t>(kv_head) * p.kc_stride_h;
  const int64_t v_head = static_cast<int64_t>(kv_head) * p.vc_stride_h;

  const int row_in_step = warp * kGroups + grp;
  auto load_k = [&](uint4 (&r)[UNROLL][NL], int base) {
    load_rows<scalar_t, NL, UNROLL, STEP, VEC>(r, p.k_cache, bt, start, base, n_local, row_in_step, lane_g,
                                               p.page_size, p.kc_stride_b, p.kc_stride_p, k_head);
  };
  auto load_v = [&](uint4 (&r)[UNROLL][NL], int base) {
    load_rows<scalar_t, NL, UNROLL, STEP, VEC>(r, p.v_cache, bt, start, base, n_local, row_in_step, lane_g,
                                               p.page_size, p.vc_stride_b, p.vc_stride_p, v_head);
  };

  // Phase 1: scores. The next ITER rows are in flight while the current ones are used.
  uint4 kr[UNROLL][NL];
  load_k(kr, 0);
  for (int base = 0; base < n_local; base += ITER) {
    const bool more = base + ITER < n_local;  // uniform over the CTA
    uint4 kn[UNROLL][NL];
    if (more) load_k(kn, base + ITER);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float s[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) s[g] = 0.f;
#pragma unroll
      for (int j = 0; j < NL; ++j) {
        float kf[VEC];
        Pk::unpack(kr[u][j], kf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
#pragma unroll
          for (int g = 0; g < GT; ++g) s[g] = fmaf(qr[g][j * VEC + i], kf[i], s[g]);
        }
      }
#pragma unroll
      for (int g = 0; g < GT; ++g) {  // sum over the 8 threads of the row (all 32 lanes take part)
        s[g] += __shfl_xor_sync(0xffffffffu, s[g], 4);
        s[g] += __shfl_xor_sync(0xffffffffu, s[g], 2);
        s[g] += __shfl_xor_sync(0xffffffffu, s[g], 1);
      }
      const int tl = base + u * STEP + row_in_step;
      if (tl < n_local) {
#pragma unroll
        for (int g = 0; g < GT; ++g) {
          if (g == lane_g) s_logits[g][tl] = s[g];  // thread g of the row stores head g
        }
      }
    }
    if (more) copy_rows(kr, kn);
  }
  uint4 vr[UNROLL][NL];
  load_v(vr, 0);  // the first value rows fly during the softmax
  __syncthreads();

  // Phase 2: softmax numerators in place, (max, sum) per head.
  for (int g = warp; g < GT; g += kWarps) {
    float m = -INFINITY;
    for (int i = lane; i < n_local; i += 32) m = fmaxf(m, s_logits[g][i]);
    m = warp_max(m);
    float sum = 0.f;
    for (int i = lane; i < n_local; i += 32) {
      const float e = exp2f(s_logits[g][i] - m);
      s_logits[g][i] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      s_max[g] = m;
      s_sum[g] = sum;
    }
  }
  __syncthreads();

  // Phase 3: values.
  float acc[GT][EPT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[g][e] = 0.f;
  }
  for (int base = 0; base < n_local; base += ITER) {
    const bool more = base + ITER < n_local;
    uint4 vn[UNROLL][NL];
    if (more) load_v(vn, base + ITER);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int tl = base + u * STEP + row_in_step;
      const bool valid = tl < n_local;
      float pr[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) pr[g] = valid ? s_logits[g][tl] : 0.f;  // never read past the partition
#pragma unroll
      for (int j = 0; j < NL; ++j) {
        float vf[VEC];
        Pk::unpack(vr[u][j], vf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
#pragma unroll
          for (int g = 0; g < GT; ++g) acc[g][j * VEC + i] = fmaf(pr[g], vf[i], acc[g][j * VEC + i]);
        }
      }
    }
    if (more) copy_rows(vr, vn);
  }

  // Sum over the 4 rows of a warp (lanes that share lane_g), then over the warps.
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], 8);
      acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], 16);
    }
  }
  if (grp == 0) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
      for (int j = 0; j < NL; ++j) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s_red[warp][g][(j * kTPT + lane_g) * VEC + i] = acc[g][j * VEC + i];
      }
    }
  }
  __syncthreads();

  for (int i = tid; i < n_active * D; i += kThreads) {
    const int g = i / D;
    const int d = i % D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += s_red[w][g][d];
    const int64_t head = head0 + g;
    if (!split) {
      p.out[b * p.o_stride_b + head * p.o_stride_h + d] = from_float<scalar_t>(o / s_sum[g]);
    } else {
      p.part_acc[((b * p.num_q_heads + head) * p.num_parts + part) * D + d] = o;
    }
  }
  if (split && tid < n_active) {
    const int64_t row = (b * p.num_q_heads + head0 + tid) * p.num_parts + part;
    p.part_ml[2 * row] = s_max[tid];
    p.part_ml[2 * row + 1] = s_sum[tid];
  }
}

// Grid (Hq, B): combines the partitions of one (sequence, query head):
//   out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p,  M = max_p m_p.
// Warp w takes partitions w, w + 4, ...; lane owns D / 32 dims (vector loads, several rows in flight).
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads) paged_decode_reduce_kernel(const DecodeParams<scalar_t> p) {
  constexpr int DPL = D / 32;
  static_assert(DPL == 2 || DPL == 4, "reduce: head_dim 64 or 128");
  using vec_t = typename std::conditional<DPL == 4, float4, float2>::type;
  extern __shared__ float s_w[];  // num_parts weights
  __shared__ float s_part[kWarps];
  __shared__ float s_total;
  __shared__ float s_o[kWarps][D];
  const int h = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int ctx = p.context_lens[b];
  const int n = (ctx + p.part_size - 1) / p.part_size;  // partitions holding tokens of this sequence
  scalar_t* out = p.out + b * p.o_stride_b + static_cast<int64_t>(h) * p.o_stride_h;
  if (n <= 0) {  // context 0: zeros
    for (int d = tid; d < D; d += kThreads) out[d] = from_float<scalar_t>(0.f);
    return;
  }
  const int64_t base = (b * p.num_q_heads + h) * p.num_parts;

  float m = -INFINITY;
  for (int i = tid; i < n; i += kThreads) m = fmaxf(m, p.part_ml[2 * (base + i)]);
  m = warp_max(m);
  if (lane == 0) s_part[warp] = m;
  __syncthreads();
  m = s_part[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, s_part[w]);
  __syncthreads();  // s_part is reused below

  float l = 0.f;
  for (int i = tid; i < n; i += kThreads) {
    const float w = exp2f(p.part_ml[2 * (base + i)] - m);  // every partition below n holds >= 1 token: finite
    s_w[i] = w;
    l += w * p.part_ml[2 * (base + i) + 1];
  }
  l = warp_sum(l);
  if (lane == 0) s_part[warp] = l;
  __syncthreads();
  if (tid == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += s_part[w];
    s_total = total;
  }

  float o[DPL];
#pragma unroll
  for (int j = 0; j < DPL; ++j) o[j] = 0.f;
#pragma unroll 8
  for (int i = warp; i < n; i += kWarps) {
    const vec_t a = __ldg(reinterpret_cast<const vec_t*>(p.part_acc + (base + i) * D) + lane);
    const float* av = reinterpret_cast<const float*>(&a);
    const float w = s_w[i];
#pragma unroll
    for (int j = 0; j < DPL; ++j) o[j] = fmaf(w, av[j], o[j]);
  }
#pragma unroll
  for (int j = 0; j < DPL; ++j) s_o[warp][lane * DPL + j] = o[j];
  __syncthreads();
  const float inv = 1.f / s_total;
  for (int d = tid; d < D; d += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += s_o[w][d];
    out[d] = from_float<scalar_t>(sum * inv);
  }
}

template <typename scalar_t, int D, int GT>
void launch_decode(const DecodeParams<scalar_t>& p, int batch, int num_kv_heads, cudaStream_t stream) {
  const dim3 grid(p.num_parts, num_kv_heads * p.num_chunks, batch);
  paged_decode_kernel<scalar_t, D, GT><<<grid, kThreads, 0, stream>>>(p);
  OMNI_CHECK_LAUNCH();
}

// Query heads per CTA: the GQA group rounded up to 1, 2, 4, 7 or 8 (7: the Qwen2.5-Omni-7B thinker and the
// 3B talker); larger groups are cut into chunks of 8.
template <typename scalar_t, int D>
void dispatch_group(DecodeParams<scalar_t>& p, int batch, int num_kv_heads, cudaStream_t stream) {
  const int g = p.group_size;
  const int gt = g <= 1 ? 1 : g <= 2 ? 2 : g <= 4 ? 4 : g <= 7 ? 7 : 8;
  p.num_chunks = (g + gt - 1) / gt;
  switch (gt) {
    case 1: return launch_decode<scalar_t, D, 1>(p, batch, num_kv_heads, stream);
    case 2: return launch_decode<scalar_t, D, 2>(p, batch, num_kv_heads, stream);
    case 4: return launch_decode<scalar_t, D, 4>(p, batch, num_kv_heads, stream);
    case 7: return launch_decode<scalar_t, D, 7>(p, batch, num_kv_heads, stream);
    default: return launch_decode<scalar_t, D, 8>(p, batch, num_kv_heads, stream);
  }
}

template <typename scalar_t, int D>
void launch(DecodeParams<scalar_t>& p, int batch, int num_kv_heads, cudaStream_t stream) {
  dispatch_group<scalar_t, D>(p, batch, num_kv_heads, stream);
  if (p.num_parts > 1) {
    const dim3 grid(p.num_q_heads, batch);
    paged_decode_reduce_kernel<scalar_t, D><<<grid, kThreads, p.num_parts * sizeof(float), stream>>>(p);
    OMNI_CHECK_LAUNCH();
  }
}

}  // namespace

// Shapes, dtypes, value ranges and alignment were checked by the Python front door and launcher.
void paged_decode_attention(const TensorRef& q, const TensorRef& k_cache, const TensorRef& v_cache,
                            const TensorRef& block_tables, const TensorRef& context_lens, const TensorRef& out,
                            const TensorRef& part_acc, const TensorRef& part_ml, double scale,
                            int64_t partition_size, int64_t num_parts, std::uintptr_t stream_handle) {
  ensure_device();
  const int batch = static_cast<int>(q.size(0));
  if (batch == 0) return;
  const int num_q_heads = static_cast<int>(q.size(1));
  const int head_dim = static_cast<int>(q.size(2));
  const int num_kv_heads = static_cast<int>(k_cache.size(2));
  OMNI_CHECK(partition_size > 0 && partition_size <= kMaxPartition,
             "paged_decode_attention: partition_size must be in [1, " << kMaxPartition << "], got " << partition_size);
  OMNI_CHECK(num_parts >= 1 && num_parts <= kMaxReduceParts,
             "paged_decode_attention: num_parts must be in [1, " << kMaxReduceParts << "], got " << num_parts);
  OMNI_CHECK(batch <= 65535, "paged_decode_attention: batch must be <= 65535, got " << batch);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(q.dtype, "paged_decode_attention", scalar_t, [&] {
    DecodeParams<scalar_t> p{};
    p.q = q.data<scalar_t>();
    p.k_cache = k_cache.data<scalar_t>();
    p.v_cache = v_cache.data<scalar_t>();
    p.block_tables = block_tables.data<int32_t>();
    p.context_lens = context_lens.data<int32_t>();
    p.out = out.data<scalar_t>();
    p.part_acc = num_parts > 1 ? part_acc.data<float>() : nullptr;
    p.part_ml = num_parts > 1 ? part_ml.data<float>() : nullptr;
    p.q_stride_b = q.stride(0);
    p.q_stride_h = q.stride(1);
    p.kc_stride_b = k_cache.stride(0);
    p.kc_stride_p = k_cache.stride(1);
    p.kc_stride_h = k_cache.stride(2);
    p.vc_stride_b = v_cache.stride(0);
    p.vc_stride_p = v_cache.stride(1);
    p.vc_stride_h = v_cache.stride(2);
    p.bt_stride_b = block_tables.stride(0);
    p.o_stride_b = out.stride(0);
    p.o_stride_h = out.stride(1);
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
    p.page_size = static_cast<int>(k_cache.size(1));
    p.group_size = num_q_heads / num_kv_heads;
    p.num_chunks = 1;
    p.num_q_heads = num_q_heads;
    p.head_dim = head_dim;
    p.part_size = static_cast<int>(partition_size);
    p.num_parts = static_cast<int>(num_parts);
    switch (head_dim) {
      case 64: launch<scalar_t, 64>(p, batch, num_kv_heads, stream); break;
      case 128: launch<scalar_t, 128>(p, batch, num_kv_heads, stream); break;
      default: OMNI_CHECK(false, "paged_decode_attention: the cuda backend supports head_dim 64 and 128, got "
                                     << head_dim);
    }
  });
}

}  // namespace omni
