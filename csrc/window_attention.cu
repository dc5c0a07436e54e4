// window_attention: non-causal attention inside each segment [cu_seqlens[i], cu_seqlens[i+1]) of packed tokens.
//   q, k, v:     (T, H, D), last dim contiguous, any token / head stride (views into a fused QKV)
//   out:         (T, H, D)
//   cu_seqlens:  (S + 1,) int32, from 0 to T, non-decreasing (checked by the Python front door)
//   seg_ids:     (T,) int32 segment of each token; read only in packed mode
// Flash-attention style: one CTA per (query tile, head), online softmax in fp32 over key blocks of the tile's
// segment(s). Tiles are either per segment (varlen: tile i = rows [j*BM, (j+1)*BM) of segment i / tiles_per_seg)
// or packed (tile i = rows [i*BM, (i+1)*BM) of the packed tokens; the keys run over the union of their segments
// and each score is masked by segment id), see omni_kernels/window_attention.py.
//
// bf16 / fp16: tensor cores through mma.sync.m16n8k16 (sm_80+) with fp32 accumulation. 4 warps, 16 query rows
// each (BM = 64), 64 keys per block, head dim padded with zeros to DP in {64, 80, 128}. S = Q K^T stays in
// registers; its accumulator layout is exactly the A-operand layout of P V, so P never leaves registers (the
// FlashAttention-2 arrangement). Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16":
//   lane = 4 * g + t;  A (16x16): a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t..), a[2] = (row g,
//   cols 2t+8..), a[3] = (row g+8, cols 2t+8..);  B (16x8, k x n): b[0] = (k 2t, 2t+1; n g), b[1] = (k 2t+8..;
//   n g);  C (16x8): c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, cols 2t, 2t+1).
//   Two 16-bit values in one register: the lower-indexed element in the low half.
// fp32: a SIMT kernel (exact fp32 products, no TF32): 4 warps x 4 query rows, 32 keys per block, one key per lane.
// Head dims up to 128 (any value: columns past D are zero in shared memory and never stored).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/mma.h"
#include "common/tensor.h"

namespace omni {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;  // 4 warps in both kernels

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* cu_seqlens;
  const int32_t* seg_ids;
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h;
  int num_tokens;
  int head_dim;
  int tiles_per_seg;
  float scale_log2;  // softmax scale * log2(e): scores go through exp2
  bool vec;          // 16-byte loads: D % 8 == 0 and 16-byte aligned rows (bf16 / fp16 kernel only)
};

// Query rows [q_lo, q_hi) of the tile and the key range [k_lo, k_hi) that holds their segments.
struct Tile {
  int q_lo, q_hi, k_lo, k_hi;
};

template <bool PACKED, int BM>
__device__ __forceinline__ Tile get_tile(const Params& p, int tile) {
  Tile t;
  if (PACKED) {
    t.q_lo = tile * BM;  // grid = ceil(T / BM), so q_lo < T
    t.q_hi = min(t.q_lo + BM, p.num_tokens);
    t.k_lo = p.cu_seqlens[p.seg_ids[t.q_lo]];
    t.k_hi = p.cu_seqlens[p.seg_ids[t.q_hi - 1] + 1];
  } else {
    const int seg = tile / p.tiles_per_seg;
    const int seg_lo = p.cu_seqlens[seg];
    const int seg_hi = p.cu_seqlens[seg + 1];
    t.q_lo = seg_lo + (tile % p.tiles_per_seg) * BM;
    t.q_hi = min(t.q_lo + BM, seg_hi);
    t.k_lo = seg_lo;
    t.k_hi = seg_hi;
  }
  return t;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

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

// Online-softmax step for one row: the new running max m (returned through m), the max to subtract from this
// block's scores (0 while the row has seen no valid key: no inf - inf), and the factor for the old sums.
__device__ __forceinline__ void softmax_rescale(float& m, float block_max, float& m_use, float& alpha) {
  const float m_new = fmaxf(m, block_max);
  m_use = m_new == -INFINITY ? 0.f : m_new;
  alpha = exp2f(m - m_use);  // m = -inf: 0
  m = m_new;
}

// ------------------------------------------------------------------------------------- bf16 / fp16: mma.sync

constexpr int kMmaBM = 64;  // 4 warps x 16 rows
constexpr int kMmaBN = 64;

// Two floats rounded to T, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_floats<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack_floats<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_bits(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Rows [row_lo, row_lo + ROWS) of one head (src points at row 0 of that head) into dst[ROWS][LD] as raw 16-bit
// values; rows at or past row_hi and columns at or past head_dim become 0 (+0.0 in both bf16 and fp16).
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void load_rows_16bit(uint16_t (*dst)[LD], const uint16_t* src, int64_t stride_t,
                                                int row_lo, int row_hi, int head_dim, bool vec) {
  if (vec) {
    constexpr int kChunks = DP / 8;  // 8 values = 16 bytes; head_dim % 8 == 0 here
    for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
      const int r = i / kChunks;
      const int c = (i % kChunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (row_lo + r < row_hi && c < head_dim) {
        val = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row_lo + r) * stride_t + c);
      }
      *reinterpret_cast<uint4*>(&dst[r][c]) = val;
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DP; i += kThreads) {
      const int r = i / DP;
      const int c = i % DP;
      uint16_t val = 0;
      if (row_lo + r < row_hi && c < head_dim) val = src[static_cast<int64_t>(row_lo + r) * stride_t + c];
      dst[r][c] = val;
    }
  }
}

template <typename T, int DP, bool PACKED>
__global__ void __launch_bounds__(kThreads) window_attention_mma_kernel(const Params p) {
  constexpr int LD = DP + 8;          // row pitch (elements): 16-byte rows, conflict-free fragment reads
  constexpr int KS = DP / 16;         // k-steps of S = Q K^T over the head dim
  constexpr int DT = DP / 8;          // n-tiles of O over the head dim
  constexpr int NT = kMmaBN / 8;      // n-tiles of S over the keys of a block
  constexpr int PK = kMmaBN / 16;     // k-steps of O += P V over the keys of a block
  __shared__ __align__(16) uint16_t sK[kMmaBN][LD];
  __shared__ __align__(16) uint16_t sV[kMmaBN][LD];  // holds the Q tile before the key loop
  __shared__ int sSeg[kMmaBN];

  const Tile tile = get_tile<PACKED, kMmaBM>(p, blockIdx.x);
  if (tile.q_lo >= tile.q_hi) return;  // a tile past the end of its segment (uniform over the CTA)
  const int64_t head = blockIdx.y;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + head * p.q_stride_h;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + head * p.k_stride_h;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + head * p.v_stride_h;
  T* out = static_cast<T*>(p.out) + head * p.o_stride_h;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int r0 = warp * 16 + g;  // this thread's tile rows: r0 and r0 + 8

  load_rows_16bit<kMmaBM, DP, LD>(sV, q, p.q_stride_t, tile.q_lo, tile.q_hi, p.head_dim, p.vec);
  __syncthreads();
  uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int c = ks * 16 + 2 * t;
    qf[ks][0] = *reinterpret_cast<const uint32_t*>(&sV[r0][c]);
    qf[ks][1] = *reinterpret_cast<const uint32_t*>(&sV[r0 + 8][c]);
    qf[ks][2] = *reinterpret_cast<const uint32_t*>(&sV[r0][c + 8]);
    qf[ks][3] = *reinterpret_cast<const uint32_t*>(&sV[r0 + 8][c + 8]);
  }
  int seg_row[2] = {-1, -1};
  if (PACKED) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tile.q_lo + r0 + 8 * h;
      if (row < tile.q_hi) seg_row[h] = p.seg_ids[row];
    }
  }
  __syncthreads();  // every warp has its Q fragments before V overwrites them

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};  // partial row sums over this thread's columns; reduced over the quad at the end

  for (int kb = tile.k_lo; kb < tile.k_hi; kb += kMmaBN) {
    load_rows_16bit<kMmaBN, DP, LD>(sK, k, p.k_stride_t, kb, tile.k_hi, p.head_dim, p.vec);
    load_rows_16bit<kMmaBN, DP, LD>(sV, v, p.v_stride_t, kb, tile.k_hi, p.head_dim, p.vec);
    if (PACKED) {
      for (int i = threadIdx.x; i < kMmaBN; i += kThreads) sSeg[i] = kb + i < tile.k_hi ? p.seg_ids[kb + i] : -2;
    }
    __syncthreads();

    // S = Q K^T: B[k = d][n = key] = K[key][d], so a B register is two neighbouring d of one key row.
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&sK[nt * 8 + g][ks * 16 + 2 * t]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&sK[nt * 8 + g][ks * 16 + 2 * t + 8]);
        mma_16816<T>(s[nt], qf[ks], b0, b1);
      }
    }

    // Mask (key past the range, or of another segment), scale, online softmax.
    float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = nt * 8 + 2 * t + (i & 1);
        const int h = i >> 1;
        bool valid = kb + col < tile.k_hi;
        if (PACKED) valid = valid && sSeg[col] == seg_row[h];
        const float x = valid ? s[nt][i] * p.scale_log2 : -INFINITY;
        s[nt][i] = x;
        block_max[h] = fmaxf(block_max[h], x);
      }
    }
    float m_use[2], alpha[2], row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) softmax_rescale(m[h], quad_max(block_max[h]), m_use[h], alpha[h]);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = exp2f(s[nt][i] - m_use[i >> 1]);
        row_sum[i >> 1] += s[nt][i];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + row_sum[h];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P V. The S accumulators of key n-tiles 2j and 2j+1 are the A fragment of key k-step j;
    // B[k = key][n = d] = V[key][d]: two keys of one d column, packed from two 16-bit reads.
#pragma unroll
    for (int j = 0; j < PK; ++j) {
      const uint32_t a[4] = {pack_floats<T>(s[2 * j][0], s[2 * j][1]), pack_floats<T>(s[2 * j][2], s[2 * j][3]),
                             pack_floats<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                             pack_floats<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
      const int key = j * 16 + 2 * t;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + g;
        const uint32_t b0 = pack_bits(sV[key][col], sV[key + 1][col]);
        const uint32_t b1 = pack_bits(sV[key + 8][col], sV[key + 9][col]);
        mma_16816<T>(o[dt], a, b0, b1);
      }
    }
    __syncthreads();  // the next block overwrites sK, sV, sSeg
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = quad_sum(l[h]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // every stored row has sum >= 1 (it sees its own key)
    const int row = tile.q_lo + r0 + 8 * h;
    if (row < tile.q_hi) {
      T* dst = out + static_cast<int64_t>(row) * p.o_stride_t;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t;
        if (col < p.head_dim) dst[col] = from_float<T>(o[dt][2 * h] * inv);
        if (col + 1 < p.head_dim) dst[col + 1] = from_float<T>(o[dt][2 * h + 1] * inv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ fp32: SIMT

constexpr int kSimtRows = 4;                 // query rows per warp
constexpr int kSimtBM = 4 * kSimtRows;       // 4 warps
constexpr int kSimtBN = 32;                  // one key per lane

template <typename T, int DMAX, bool PACKED>
__global__ void __launch_bounds__(kThreads) window_attention_simt_kernel(const Params p) {
  constexpr int DV = DMAX / 32;  // output columns per lane: lane, lane + 32, ...
  __shared__ float sQ[kSimtBM][DMAX];
  __shared__ float sK[kSimtBN][DMAX + 1];  // +1: lane j reads row j, column d without bank conflicts
  __shared__ float sV[kSimtBN][DMAX];
  __shared__ int sSeg[kSimtBN];

  const Tile tile = get_tile<PACKED, kSimtBM>(p, blockIdx.x);
  if (tile.q_lo >= tile.q_hi) return;
  const int64_t head = blockIdx.y;
  const T* q = static_cast<const T*>(p.q) + head * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + head * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + head * p.v_stride_h;
  T* out = static_cast<T*>(p.out) + head * p.o_stride_h;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int D = p.head_dim;

  for (int i = threadIdx.x; i < kSimtBM * DMAX; i += kThreads) {
    const int r = i / DMAX;
    const int c = i % DMAX;
    const int row = tile.q_lo + r;
    sQ[r][c] = row < tile.q_hi && c < D ? to_float(q[static_cast<int64_t>(row) * p.q_stride_t + c]) : 0.f;
  }
  int seg_row[kSimtRows];
#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    const int row = tile.q_lo + warp * kSimtRows + i;
    seg_row[i] = PACKED && row < tile.q_hi ? p.seg_ids[row] : -1;
  }

  float o[kSimtRows][DV];
  float m[kSimtRows], l[kSimtRows];
#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < DV; ++j) o[i][j] = 0.f;
  }

  for (int kb = tile.k_lo; kb < tile.k_hi; kb += kSimtBN) {
    const int n_keys = min(kSimtBN, tile.k_hi - kb);
    __syncthreads();  // the previous block is done with sK, sV, sSeg (and sQ is written before the first)
    for (int i = threadIdx.x; i < kSimtBN * DMAX; i += kThreads) {
      const int r = i / DMAX;
      const int c = i % DMAX;
      const bool in = r < n_keys && c < D;
      sK[r][c] = in ? to_float(k[static_cast<int64_t>(kb + r) * p.k_stride_t + c]) : 0.f;
      sV[r][c] = in ? to_float(v[static_cast<int64_t>(kb + r) * p.v_stride_t + c]) : 0.f;
    }
    if (PACKED && threadIdx.x < kSimtBN) sSeg[threadIdx.x] = threadIdx.x < n_keys ? p.seg_ids[kb + threadIdx.x] : -2;
    __syncthreads();

    float s[kSimtRows];
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) s[i] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = sK[lane][d];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) s[i] = fmaf(sQ[warp * kSimtRows + i][d], kd, s[i]);
    }
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) {
      bool valid = lane < n_keys;
      if (PACKED) valid = valid && sSeg[lane] == seg_row[i];
      const float x = valid ? s[i] * p.scale_log2 : -INFINITY;
      float m_use, alpha;
      softmax_rescale(m[i], warp_max(x), m_use, alpha);
      s[i] = exp2f(x - m_use);  // this lane's probability (unnormalised)
      l[i] = l[i] * alpha + warp_sum(s[i]);
#pragma unroll
      for (int j = 0; j < DV; ++j) o[i][j] *= alpha;
    }
    for (int key = 0; key < n_keys; ++key) {
      float vv[DV];
#pragma unroll
      for (int j = 0; j < DV; ++j) vv[j] = sV[key][lane + 32 * j];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        const float pk = __shfl_sync(0xffffffffu, s[i], key);
#pragma unroll
        for (int j = 0; j < DV; ++j) o[i][j] = fmaf(pk, vv[j], o[i][j]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    const int row = tile.q_lo + warp * kSimtRows + i;
    if (row >= tile.q_hi) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    T* dst = out + static_cast<int64_t>(row) * p.o_stride_t;
#pragma unroll
    for (int j = 0; j < DV; ++j) {
      const int c = lane + 32 * j;
      if (c < D) dst[c] = from_float<T>(o[i][j] * inv);
    }
  }
}

// -------------------------------------------------------------------------------------------------- launch

template <int BM>
int num_tiles(const Params& p, bool packed, int num_segments, int64_t max_seqlen, int* tiles_per_seg) {
  if (packed) {
    *tiles_per_seg = 1;
    return (p.num_tokens + BM - 1) / BM;
  }
  *tiles_per_seg = static_cast<int>((max_seqlen + BM - 1) / BM);
  const int64_t tiles = static_cast<int64_t>(num_segments) * *tiles_per_seg;
  OMNI_CHECK(tiles < (int64_t{1} << 31), "window_attention: too many tiles (" << tiles << ")");
  return static_cast<int>(tiles);
}

template <typename KernelPacked, typename KernelVarlen>
void launch_kernel(KernelPacked packed_kernel, KernelVarlen varlen_kernel, bool packed, int tiles, int num_heads,
                   const Params& p, cudaStream_t stream) {
  const dim3 grid(tiles, num_heads);
  if (packed) {
    packed_kernel<<<grid, kThreads, 0, stream>>>(p);
  } else {
    varlen_kernel<<<grid, kThreads, 0, stream>>>(p);
  }
  OMNI_CHECK_LAUNCH();
}

template <typename scalar_t>
void launch(Params p, bool packed, int num_segments, int num_heads, int64_t max_seqlen, cudaStream_t stream) {
  int tiles_per_seg = 1;
  if constexpr (std::is_same<scalar_t, float>::value) {
    const int tiles = num_tiles<kSimtBM>(p, packed, num_segments, max_seqlen, &tiles_per_seg);
    p.tiles_per_seg = tiles_per_seg;
    if (p.head_dim <= 64) {
      launch_kernel(window_attention_simt_kernel<float, 64, true>, window_attention_simt_kernel<float, 64, false>,
                    packed, tiles, num_heads, p, stream);
    } else {
      launch_kernel(window_attention_simt_kernel<float, 128, true>, window_attention_simt_kernel<float, 128, false>,
                    packed, tiles, num_heads, p, stream);
    }
  } else {
    const int tiles = num_tiles<kMmaBM>(p, packed, num_segments, max_seqlen, &tiles_per_seg);
    p.tiles_per_seg = tiles_per_seg;
    if (p.head_dim <= 64) {
      launch_kernel(window_attention_mma_kernel<scalar_t, 64, true>, window_attention_mma_kernel<scalar_t, 64, false>,
                    packed, tiles, num_heads, p, stream);
    } else if (p.head_dim <= 80) {
      launch_kernel(window_attention_mma_kernel<scalar_t, 80, true>, window_attention_mma_kernel<scalar_t, 80, false>,
                    packed, tiles, num_heads, p, stream);
    } else {
      launch_kernel(window_attention_mma_kernel<scalar_t, 128, true>,
                    window_attention_mma_kernel<scalar_t, 128, false>, packed, tiles, num_heads, p, stream);
    }
  }
}

bool rows_aligned16(const TensorRef& t, int elem_bytes) {
  return t.ptr % 16 == 0 && (t.stride(0) * elem_bytes) % 16 == 0 && (t.stride(1) * elem_bytes) % 16 == 0 &&
         (t.size(2) * elem_bytes) % 16 == 0;
}

}  // namespace

// Shapes, dtypes and cu_seqlens values were checked by the Python front door; max_seqlen >= every segment length.
void window_attention(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& out,
                      const TensorRef& cu_seqlens, const TensorRef& seg_ids, bool packed, int64_t max_seqlen,
                      double scale, std::uintptr_t stream_handle) {
  ensure_device();
  const int64_t num_tokens = q.size(0);
  if (num_tokens == 0 || q.size(1) == 0 || q.size(2) == 0) return;
  OMNI_CHECK(q.size(2) <= 128, "window_attention: the CUDA kernels take head_dim <= 128, got " << q.size(2));
  OMNI_CHECK(cu_seqlens.dtype == DType::kInt32 && seg_ids.dtype == DType::kInt32,
             "window_attention: cu_seqlens and seg_ids must be int32");
  OMNI_CHECK(num_tokens < (int64_t{1} << 31), "window_attention: too many tokens");
  OMNI_CHECK(max_seqlen > 0, "window_attention: max_seqlen must be positive");
  Params p{};
  p.q = reinterpret_cast<const void*>(q.ptr);
  p.k = reinterpret_cast<const void*>(k.ptr);
  p.v = reinterpret_cast<const void*>(v.ptr);
  p.out = reinterpret_cast<void*>(out.ptr);
  p.cu_seqlens = cu_seqlens.data<const int32_t>();
  p.seg_ids = seg_ids.data<const int32_t>();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.o_stride_t = out.stride(0);
  p.o_stride_h = out.stride(1);
  p.num_tokens = static_cast<int>(num_tokens);
  p.head_dim = static_cast<int>(q.size(2));
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  const int num_segments = static_cast<int>(cu_seqlens.size(0)) - 1;
  const int num_heads = static_cast<int>(q.size(1));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(q.dtype, "window_attention", scalar_t, [&] {
    const int elem = static_cast<int>(sizeof(scalar_t));
    p.vec = rows_aligned16(q, elem) && rows_aligned16(k, elem) && rows_aligned16(v, elem);
    launch<scalar_t>(p, packed, num_segments, num_heads, max_seqlen, stream);
  });
}

}  // namespace omni
