// sliding_block_attention: the DiT's block-banded attention (see omni_kernels/sliding_block_attention.py).
//   q, k, v:     (T, H, D), last dim contiguous, any token / head stride
//   out:         (T, H, D) contiguous
//   cu_seqlens:  optional (S + 1,) int32 or int64 sequence boundaries (none: one sequence of T tokens)
// A query in block i (frame // block_size, counted from its sequence start) sees the keys of blocks
// i - look_back .. i + look_ahead of its sequence: one contiguous key range per query block.
//
// One CTA (4 warps) per (query tile of up to 32 rows of one block, head). It loops over the tile's key range in
// steps of 32 keys with an online softmax in fp32, so masked tiles are never computed:
//   * scores S = Q K^T: bf16/fp16 (and fp32 with allow_tf32) on tensor cores through nvcuda::wmma, one 16x16
//     fragment per warp, stored to shared memory; exact fp32 on CUDA cores otherwise (lane = key, 8 rows a warp);
//   * softmax: warp w owns rows 8w..8w+7, lane j owns key j; row max / sum by warp shuffles;
//   * O += P V: wmma into a shared fp32 scratch that each thread adds to its registers after rescaling, or CUDA
//     cores reading P from shared memory. The accumulator lives in registers: row 8w+i, dims lane + 32c.
// The CTA finds its (sequence, block) with a warp prefix sum over the per-sequence block counts.
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

using namespace nvcuda;

constexpr int kBM = 32;  // query rows per CTA (one 24-frame DiT block, padded)
constexpr int kBN = 32;  // keys per step
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = kBM / kWarps;  // 8
constexpr unsigned kFull = 0xffffffffu;

// Element type of the wmma fragments and their K step for each storage type.
template <typename T> struct Mma;
template <> struct Mma<__half> { using frag_t = __half; static constexpr int kK = 16; };
template <> struct Mma<__nv_bfloat16> { using frag_t = __nv_bfloat16; static constexpr int kK = 16; };
template <> struct Mma<float> { using frag_t = wmma::precision::tf32; static constexpr int kK = 8; };

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const void* cu;  // nullptr: one sequence
  bool cu_is_64;
  bool vec;  // q, k, v rows 16-byte aligned: vector loads
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st, o_sh;
  int num_tokens, num_seqs, head_dim, block_size, look_back, look_ahead, tiles_per_block;
  float scale_log2;
};

__device__ __forceinline__ int64_t load_cu(const Params& p, int i) {
  return p.cu_is_64 ? reinterpret_cast<const int64_t*>(p.cu)[i] : reinterpret_cast<const int32_t*>(p.cu)[i];
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

constexpr size_t round_up(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared memory layout. Row strides are padded by 16 bytes (keeps wmma's 32-byte fragment alignment for every
// fragment offset used below, and spreads rows over banks).
template <typename T, int DP, bool kMMA>
struct Smem {
  static constexpr int kLd = DP + 16 / static_cast<int>(sizeof(T));  // Q, K, V rows
  static constexpr int kLdS = kBN + 4;                               // fp32 scores / fp32 P
  static constexpr int kLdP = kBN + 16 / static_cast<int>(sizeof(T));  // P in T for the wmma path
  static constexpr int kLdO = DP + 4;                                // fp32 P V scratch
  static constexpr size_t kQ = round_up(sizeof(T) * kBM * kLd);
  static constexpr size_t kKV = round_up(sizeof(T) * kBN * kLd);
  static constexpr size_t kS = round_up(sizeof(float) * kBM * kLdS);
  static constexpr size_t kP = kMMA ? round_up(sizeof(T) * kBM * kLdP) : 0;
  static constexpr size_t kO = kMMA ? round_up(sizeof(float) * kBM * kLdO) : 0;
  static constexpr size_t kInfo = 128;  // the CTA's (sequence start, end, block) as int64
  static constexpr size_t kBytes = kQ + 2 * kKV + kS + kP + kO + kInfo;
};

// Loads rows [row0, row0 + rows) of one head of x into a (32, DP) tile, zero elsewhere: 16-byte vectors when every
// row and the head dim are 16-byte aligned (`vec`, decided on the host; true for the DiT's fused QKV views).
template <typename T, int DP>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* __restrict__ x, int64_t st, int64_t sh,
                                          int64_t head, int64_t row0, int rows, int head_dim, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    constexpr int kPerRow = DP / kVec;
    for (int idx = threadIdx.x; idx < kBM * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow;
      const int d = (idx % kPerRow) * kVec;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits: 0.0 in every float type
      if (r < rows && d < head_dim) val = *reinterpret_cast<const uint4*>(x + (row0 + r) * st + head * sh + d);
      *reinterpret_cast<uint4*>(dst + r * ld + d) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kBM * DP; idx += kThreads) {
      const int r = idx / DP;
      const int d = idx % DP;
      dst[r * ld + d] = (r < rows && d < head_dim) ? x[(row0 + r) * st + head * sh + d] : from_float<T>(0.f);
    }
  }
}

template <typename scalar_t, int DP, bool kMMA>
__global__ void __launch_bounds__(kThreads) sliding_block_attention_kernel(const Params p) {
  // Tiles are stored in the input type: bf16 / fp16 (tensor cores) or fp32 (CUDA cores, or TF32 tensor cores).
  static_assert(kMMA || std::is_same<scalar_t, float>::value, "the CUDA-core path is the fp32 path");
  using T = scalar_t;
  using L = Smem<T, DP, kMMA>;
  constexpr int kCols = DP / 32;  // accumulator columns per lane
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + L::kQ);
  T* Vs = reinterpret_cast<T*>(smem + L::kQ + L::kKV);
  float* Ss = reinterpret_cast<float*>(smem + L::kQ + 2 * L::kKV);
  T* Ps = reinterpret_cast<T*>(smem + L::kQ + 2 * L::kKV + L::kS);
  float* Os = reinterpret_cast<float*>(smem + L::kQ + 2 * L::kKV + L::kS + L::kP);
  // Sequence start, sequence end, block index inside the sequence. Kept in the dynamic region, whose base is
  // 128-byte aligned (wmma needs 32-byte aligned fragment pointers), so no static array shifts it.
  int64_t* info = reinterpret_cast<int64_t*>(smem + L::kQ + 2 * L::kKV + L::kS + L::kP + L::kO);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t head = blockIdx.y;
  const int blk = static_cast<int>(blockIdx.x / p.tiles_per_block);
  const int sub = static_cast<int>(blockIdx.x % p.tiles_per_block);

  if (p.cu == nullptr) {
    if (threadIdx.x == 0) {
      info[0] = 0;
      info[1] = p.num_tokens;
      info[2] = blk;
    }
  } else if (warp == 0) {
    // Sequence s holds the blocks [first_s, first_s + count_s) of the global block numbering; find the one
    // holding `blk` by an inclusive warp scan of the counts, 32 sequences at a time (uniform control flow).
    int64_t found_start = 0, found_end = 0, found_b = 0;
    int carry = 0;
    for (int base = 0; base < p.num_seqs; base += 32) {
      const int s = base + lane;
      int64_t lo = 0, hi = 0;
      if (s < p.num_seqs) {
        lo = load_cu(p, s);
        hi = load_cu(p, s + 1);
      }
      const int count = static_cast<int>((hi - lo + p.block_size - 1) / p.block_size);
      int incl = count;
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += n;
      }
      const int first = carry + incl - count;
      const bool mine = s < p.num_seqs && first <= blk && blk < first + count;
      const unsigned ballot = __ballot_sync(kFull, mine);
      if (ballot != 0) {
        const int src = __ffs(ballot) - 1;
        found_start = __shfl_sync(kFull, lo, src);
        found_end = __shfl_sync(kFull, hi, src);
        found_b = blk - __shfl_sync(kFull, first, src);
        break;
      }
      carry += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) {  // not found (a spare CTA past the last block): an empty sequence
      info[0] = found_start;
      info[1] = found_end;
      info[2] = found_b;
    }
  }
  __syncthreads();
  const int64_t seq_start = info[0], seq_end = info[1], b = info[2];
  const int64_t length = seq_end - seq_start;
  const int64_t num_blocks = (length + p.block_size - 1) / p.block_size;
  const int64_t q_lo = seq_start + b * p.block_size + static_cast<int64_t>(sub) * kBM;
  const int64_t q_hi = min(seq_start + b * p.block_size + min(static_cast<int64_t>(p.block_size),
                                                              static_cast<int64_t>(sub + 1) * kBM), seq_end);
  if (q_hi <= q_lo) return;  // uniform across the CTA
  const int64_t k_lo = seq_start + max(b - p.look_back, static_cast<int64_t>(0)) * p.block_size;
  const int64_t k_hi = min(seq_start + min(b + p.look_ahead + 1, num_blocks) * p.block_size, seq_end);
  const int q_rows = static_cast<int>(q_hi - q_lo);

  const auto* q = static_cast<const T*>(p.q);
  const auto* k = static_cast<const T*>(p.k);
  const auto* v = static_cast<const T*>(p.v);
  load_tile<T, DP>(Qs, L::kLd, q, p.q_st, p.q_sh, head, q_lo, q_rows, p.head_dim, p.vec);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kCols];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[i][c] = 0.f;
  }

  for (int64_t kt = k_lo; kt < k_hi; kt += kBN) {
    const int n_keys = static_cast<int>(min(static_cast<int64_t>(kBN), k_hi - kt));
    __syncthreads();  // the previous step is done with Ks, Vs, Ss, Ps, Os
    load_tile<T, DP>(Ks, L::kLd, k, p.k_st, p.k_sh, head, kt, n_keys, p.head_dim, p.vec);
    load_tile<T, DP>(Vs, L::kLd, v, p.v_st, p.v_sh, head, kt, n_keys, p.head_dim, p.vec);
    __syncthreads();

    float s[kRowsPerWarp];
    if constexpr (kMMA) {
      using F = typename Mma<T>::frag_t;
      constexpr int kK = Mma<T>::kK;
      const int mi = warp / 2, ni = warp % 2;  // this warp's 16x16 block of the 32x32 scores
      wmma::fragment<wmma::matrix_a, 16, 16, kK, F, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, kK, F, wmma::col_major> bk;  // K^T: K rows are B's columns
      wmma::fragment<wmma::accumulator, 16, 16, kK, float> c;
      wmma::fill_fragment(c, 0.f);
#pragma unroll
      for (int kk = 0; kk < DP; kk += kK) {
        wmma::load_matrix_sync(a, Qs + mi * 16 * L::kLd + kk, L::kLd);
        wmma::load_matrix_sync(bk, Ks + ni * 16 * L::kLd + kk, L::kLd);
        if constexpr (std::is_same<T, float>::value) {
#pragma unroll
          for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
#pragma unroll
          for (int t = 0; t < bk.num_elements; ++t) bk.x[t] = wmma::__float_to_tf32(bk.x[t]);
        }
        wmma::mma_sync(c, a, bk, c);
      }
      wmma::store_matrix_sync(Ss + mi * 16 * L::kLdS + ni * 16, c, L::kLdS, wmma::mem_row_major);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) s[i] = Ss[(warp * kRowsPerWarp + i) * L::kLdS + lane];
    } else {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) s[i] = 0.f;
      const T* krow = Ks + lane * L::kLd;
#pragma unroll 4
      for (int d = 0; d < DP; d += 4) {
        const float4 kv = *reinterpret_cast<const float4*>(krow + d);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const float4 qv = *reinterpret_cast<const float4*>(Qs + (warp * kRowsPerWarp + i) * L::kLd + d);
          s[i] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, s[i]))));
        }
      }
    }

    // Online softmax (base 2); lane = key. Every step holds at least one visible key, so m_new is finite.
    const bool visible = lane < n_keys;
    float alpha[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float x = visible ? s[i] * p.scale_log2 : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(x));
      const float prob = visible ? exp2f(x - m_new) : 0.f;
      alpha[i] = exp2f(m[i] - m_new);  // 0 on the first step (m = -inf)
      l[i] = l[i] * alpha[i] + warp_sum(prob);
      m[i] = m_new;
      s[i] = prob;
    }

    if constexpr (kMMA) {
      using F = typename Mma<T>::frag_t;
      constexpr int kK = Mma<T>::kK;
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) Ps[(warp * kRowsPerWarp + i) * L::kLdP + lane] = from_float<T>(s[i]);
      __syncthreads();
      // P (32 x 32) V (32 x DP): 2 x DP/16 fragments shared out over the warps.
      constexpr int kFrags = 2 * (DP / 16);
      for (int f = warp; f < kFrags; f += kWarps) {
        const int mi = f / (DP / 16), ni = f % (DP / 16);
        wmma::fragment<wmma::matrix_a, 16, 16, kK, F, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, kK, F, wmma::row_major> bv;
        wmma::fragment<wmma::accumulator, 16, 16, kK, float> c;
        wmma::fill_fragment(c, 0.f);
#pragma unroll
        for (int kk = 0; kk < kBN; kk += kK) {
          wmma::load_matrix_sync(a, Ps + mi * 16 * L::kLdP + kk, L::kLdP);
          wmma::load_matrix_sync(bv, Vs + kk * L::kLd + ni * 16, L::kLd);
          if constexpr (std::is_same<T, float>::value) {
#pragma unroll
            for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
#pragma unroll
            for (int t = 0; t < bv.num_elements; ++t) bv.x[t] = wmma::__float_to_tf32(bv.x[t]);
          }
          wmma::mma_sync(c, a, bv, c);
        }
        wmma::store_matrix_sync(Os + mi * 16 * L::kLdO + ni * 16, c, L::kLdO, wmma::mem_row_major);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          acc[i][c] = acc[i][c] * alpha[i] + Os[(warp * kRowsPerWarp + i) * L::kLdO + lane + 32 * c];
        }
      }
    } else {
      // P stays fp32; each warp reads only its own rows, so a warp barrier orders the writes and reads.
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) Ss[(warp * kRowsPerWarp + i) * L::kLdS + lane] = s[i];
      __syncwarp();
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[i][c] *= alpha[i];
      }
      for (int j = 0; j < n_keys; ++j) {
        float vj[kCols];
#pragma unroll
        for (int c = 0; c < kCols; ++c) vj[c] = Vs[j * L::kLd + lane + 32 * c];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const float pij = Ss[(warp * kRowsPerWarp + i) * L::kLdS + j];
#pragma unroll
          for (int c = 0; c < kCols; ++c) acc[i][c] = fmaf(pij, vj[c], acc[i][c]);
        }
      }
    }
  }

  auto* out = static_cast<scalar_t*>(p.out);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    if (r >= q_rows) break;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < p.head_dim) out[(q_lo + r) * p.o_st + head * p.o_sh + d] = from_float<scalar_t>(acc[i][c] * inv);
    }
  }
}

template <typename scalar_t, int DP, bool kMMA>
void launch(const Params& p, int num_heads, cudaStream_t stream) {
  constexpr size_t bytes = Smem<scalar_t, DP, kMMA>::kBytes;
  auto kernel = sliding_block_attention_kernel<scalar_t, DP, kMMA>;
  if (bytes > 48 * 1024) {
    OMNI_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
  }
  // Blocks over all sequences: sum(ceil(len_s / bs)) <= ceil(T / bs) + S - 1; spare CTAs exit at once.
  const int64_t blocks = (p.num_tokens + p.block_size - 1) / p.block_size + p.num_seqs - 1;
  const dim3 grid(static_cast<unsigned>(blocks * p.tiles_per_block), static_cast<unsigned>(num_heads));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  OMNI_CHECK_LAUNCH();
}

template <typename scalar_t, bool kMMA>
void launch_dim(const Params& p, int num_heads, cudaStream_t stream) {
  if (p.head_dim <= 32) {
    launch<scalar_t, 32, kMMA>(p, num_heads, stream);
  } else if (p.head_dim <= 64) {
    launch<scalar_t, 64, kMMA>(p, num_heads, stream);
  } else if (p.head_dim <= 128) {
    launch<scalar_t, 128, kMMA>(p, num_heads, stream);
  } else {
    launch<scalar_t, 256, kMMA>(p, num_heads, stream);
  }
}

bool aligned16(const TensorRef& t, int elem_bytes) {
  return t.ptr % 16 == 0 && (t.stride(0) * elem_bytes) % 16 == 0 && (t.stride(1) * elem_bytes) % 16 == 0 &&
         (t.size(2) * elem_bytes) % 16 == 0;
}

}  // namespace

// Shapes, dtypes and value ranges were checked by the Python front door (look_back / look_ahead clamped to the
// number of blocks, head_dim <= 256).
void sliding_block_attention(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& out,
                             const std::optional<TensorRef>& cu_seqlens, int block_size, int look_back,
                             int look_ahead, double scale, bool allow_tf32, std::uintptr_t stream_handle) {
  ensure_device();
  OMNI_CHECK(q.size(2) <= 256, "sliding_block_attention: head_dim must be <= 256, got " << q.size(2));
  OMNI_CHECK(block_size > 0 && look_back >= 0 && look_ahead >= 0,
             "sliding_block_attention: bad block_size / look_back / look_ahead");
  if (q.size(0) == 0 || q.size(1) == 0) return;
  Params p{};
  p.q = reinterpret_cast<const void*>(q.ptr);
  p.k = reinterpret_cast<const void*>(k.ptr);
  p.v = reinterpret_cast<const void*>(v.ptr);
  p.out = reinterpret_cast<void*>(out.ptr);
  p.cu = cu_seqlens ? reinterpret_cast<const void*>(cu_seqlens->ptr) : nullptr;
  p.cu_is_64 = cu_seqlens && cu_seqlens->dtype == DType::kInt64;
  p.q_st = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_st = k.stride(0);
  p.k_sh = k.stride(1);
  p.v_st = v.stride(0);
  p.v_sh = v.stride(1);
  p.o_st = out.stride(0);
  p.o_sh = out.stride(1);
  p.num_tokens = static_cast<int>(q.size(0));
  p.num_seqs = cu_seqlens ? static_cast<int>(cu_seqlens->size(0) - 1) : 1;
  p.head_dim = static_cast<int>(q.size(2));
  p.block_size = block_size;
  p.look_back = look_back;
  p.look_ahead = look_ahead;
  p.tiles_per_block = (block_size + kBM - 1) / kBM;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e): softmax in base 2
  const int num_heads = static_cast<int>(q.size(1));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(q.dtype, "sliding_block_attention", scalar_t, [&] {
    const int elem = static_cast<int>(sizeof(scalar_t));
    p.vec = aligned16(q, elem) && aligned16(k, elem) && aligned16(v, elem);
    if constexpr (std::is_same<scalar_t, float>::value) {
      allow_tf32 ? launch_dim<float, true>(p, num_heads, stream) : launch_dim<float, false>(p, num_heads, stream);
    } else {
      launch_dim<scalar_t, true>(p, num_heads, stream);
    }
  });
}

}  // namespace omni
