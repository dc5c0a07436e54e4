// w4a16_linear: out = x[:, perm] @ W + bias, W[k, n] = (q[k, n] - zeros[k / g, n]) * scales[k / g, n], q 4-bit.
//   x:       (M, K) fp32 / fp16 / bf16, last dim contiguous, any row stride; K a multiple of 32
//   qweight: (K/8, N) int32, contiguous, 16-byte aligned; N a multiple of 8. Word (4b + t, n) holds, in nibble i
//            (bits 4i..4i+3), row k = 32b + 2t + (i >> 2) + 8 (i & 3) of column n (omni_kernels/w4a16_linear.py)
//   scales:  (K/g, N), dtype of x, contiguous, 16-byte aligned; zeros: the same, optional (absent: 8)
//   perm:    (K,) int32, optional: kernel row k reads column perm[k] of x (GEMV only; the launcher gathers x
//            before the GEMM, whose 16-byte cp.async rows cannot gather)
//   bias:    (N,) dtype of x, optional;  out: (M, N) dtype of x, contiguous
//   partial: (splits, min(M, 8), N) fp32 when the GEMV splits K over several CTAs (blocks_per_split < K/32)
//
// Two kernels:
// * GEMV (M <= 8; fp32 activations in chunks of 8 rows): CUDA cores. A CTA (4 warps) owns 128 columns (4 per
//   lane: one 16-byte load per word row) and a slice of K (the split); its activations are staged in shared
//   memory as fp32. Warp w takes the 32-row blocks w, w + 4, ... of the slice, so every packed word is read
//   once. A nibble becomes (q - z) exactly in fp32 with one OR and one subtract (2^23 + q is 0x4B000000 | q);
//   the group's scale multiplies the block's partial sums. Warps are summed in shared memory; with splits > 1
//   each CTA writes fp32 partial sums and a second kernel adds the splits, the bias, and rounds.
// * GEMM (M > 8, fp16 / bf16): tensor cores through mma.sync.m16n8k16 with fp32 accumulation (sm_80+). CTA tile
//   64 x 128, 4 warps of 32 x 64, 32 rows of K per stage, 4-stage cp.async pipeline (A tile, packed B words,
//   the group's scales and zeros). A reaches registers through ldmatrix.x4; lane (g, t) reads one 32-bit word
//   per 8-column tile and stage, which holds exactly its B fragments of both 16-row k-steps: nibbles s and s + 4
//   are rows 2t + 8s and 2t + 8s + 1, the low and high halves of one B register. Dequantization of a register:
//   mask the two nibbles and OR the exponent of 1024 (fp16: 0x6400) or 128 (bf16: 0x4300) into both halves,
//   giving 1024 + q exactly; subtract 1024 + z (exact), multiply by the scale (one rounding, as the reference).
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16" (lane = 4 g + t; A: a0 = row g, cols 2t, 2t+1,
// a1 = row g+8, a2 = row g, cols +8, a3 = row g+8, cols +8; B: b0 = rows 2t, 2t+1 of col g, b1 = rows 2t+8, 2t+9;
// C: c0, c1 = row g, cols 2t, 2t+1, c2, c3 = row g+8). The magic-number conversion is FasterTransformer's and
// Marlin's (IST-DASLab/marlin, "dequant"); the layout here is our own.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "common/dispatch.h"
#include "common/mma.h"
#include "common/tensor.h"

namespace omni {
namespace {

constexpr int kKBlock = 32;       // rows of K per interleaved block: 4 words per column
constexpr int kGemvMaxM = 8;      // rows per GEMV launch
constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kGemvCols = 128;    // columns per GEMV CTA: 32 lanes x 4
constexpr int kMaxSmem = 48 * 1024;
constexpr uint32_t kFloatMagic = 0x4B000000u;  // 2^23 as fp32: OR a 4-bit q into the mantissa to get 2^23 + q
constexpr float kFloatMagicValue = 8388608.f;

struct Params {
  const void* x;
  const int32_t* qweight;
  const void* scales;
  const void* zeros;  // nullptr: symmetric (8)
  const int32_t* perm;
  const void* bias;
  void* out;
  float* partial;     // nullptr: the GEMV writes out directly
  int64_t x_stride;   // elements between rows of x
  int64_t out_stride;
  int m, n, k, group_size, blocks_per_split;
};

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// ------------------------------------------------------------------------------------------------ GEMV

template <typename T, int MT, bool HAS_ZEROS>
__global__ void __launch_bounds__(kGemvThreads) w4a16_gemv_kernel(const Params p) {
  extern __shared__ float smem[];  // the slice's activations [MT][kslice] (fp32), then the warps' sums
  const int b_lo = blockIdx.y * p.blocks_per_split;
  const int b_hi = min(b_lo + p.blocks_per_split, p.k / kKBlock);
  const int k_lo = b_lo * kKBlock;
  const int kslice = (b_hi - b_lo) * kKBlock;
  const T* x = static_cast<const T*>(p.x);
  for (int i = threadIdx.x; i < MT * kslice; i += kGemvThreads) {
    const int m = i / kslice;
    const int kk = i - m * kslice;
    float v = 0.f;
    if (m < p.m) {
      const int k = p.perm != nullptr ? p.perm[k_lo + kk] : k_lo + kk;
      v = to_float(x[static_cast<int64_t>(m) * p.x_stride + k]);
    }
    smem[i] = v;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kGemvCols + lane * 4;  // N % 8 == 0: the 4 columns are all in or all out
  float acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
  if (n0 < p.n) {
    const T* scales = static_cast<const T*>(p.scales);
    const T* zeros = static_cast<const T*>(p.zeros);
    for (int b = b_lo + warp; b < b_hi; b += kGemvWarps) {
      const int64_t group = static_cast<int64_t>(b) * kKBlock / p.group_size * p.n + n0;
      const Vec4<T> s = *reinterpret_cast<const Vec4<T>*>(scales + group);
      float magic_z[4];  // 2^23 + z: (2^23 + q) - (2^23 + z) = q - z exactly
      if constexpr (HAS_ZEROS) {
        const Vec4<T> z = *reinterpret_cast<const Vec4<T>*>(zeros + group);
#pragma unroll
        for (int c = 0; c < 4; ++c) magic_z[c] = kFloatMagicValue + to_float(z.v[c]);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) magic_z[c] = kFloatMagicValue + 8.f;
      }
      uint4 words[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        words[t] = *reinterpret_cast<const uint4*>(p.qweight + (static_cast<int64_t>(b) * 4 + t) * p.n + n0);
      }
      const float* xb = smem + (b - b_lo) * kKBlock;
      float part[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) part[m][0] = part[m][1] = part[m][2] = part[m][3] = 0.f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const uint32_t wv[4] = {words[t].x, words[t].y, words[t].z, words[t].w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int kk = 2 * t + (i >> 2) + 8 * (i & 3);
          float w[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) w[c] = __uint_as_float(((wv[c] >> (4 * i)) & 0xFu) | kFloatMagic) - magic_z[c];
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float xv = xb[m * kslice + kk];  // the same address in every lane: a broadcast
#pragma unroll
            for (int c = 0; c < 4; ++c) part[m][c] = fmaf(xv, w[c], part[m][c]);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float sc = to_float(s.v[c]);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(part[m][c], sc, acc[m][c]);
      }
    }
  }
  __syncthreads();  // every warp is done with the activations: their space now holds the warps' sums
  float* red = smem;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int c = 0; c < 4; ++c) red[(warp * MT + m) * kGemvCols + lane * 4 + c] = acc[m][c];
  }
  __syncthreads();
  for (int o = threadIdx.x; o < MT * kGemvCols; o += kGemvThreads) {
    const int m = o / kGemvCols;
    const int col = o % kGemvCols;
    const int n = blockIdx.x * kGemvCols + col;
    if (m >= p.m || n >= p.n) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) v += red[(w * MT + m) * kGemvCols + col];
    if (p.partial != nullptr) {
      p.partial[(static_cast<int64_t>(blockIdx.y) * p.m + m) * p.n + n] = v;
    } else {
      if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[n]);
      static_cast<T*>(p.out)[m * p.out_stride + n] = from_float<T>(v);
    }
  }
}

// The sum of the splits' partial sums (splits, M, N) plus the bias, rounded once.
template <typename T>
__global__ void __launch_bounds__(256) w4a16_reduce_kernel(const Params p, int splits) {
  const int64_t total = static_cast<int64_t>(p.m) * p.n;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t m = i / p.n;
  const int64_t n = i - m * p.n;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += p.partial[s * total + i];
  if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[m * p.out_stride + n] = from_float<T>(v);
}

// ------------------------------------------------------------------------------------------------ GEMM

constexpr int kBM = 64;
constexpr int kBN = 128;
constexpr int kStages = 4;
constexpr int kGemmThreads = 128;    // 4 warps: 2 (rows) x 2 (columns) of 32 x 64
constexpr int kAPitch = kKBlock + 8;  // values per A row in shared memory: 80-byte rows, conflict-free ldmatrix
constexpr int kBPitch = kBN + 8;      // words per B row: lane (g, t) reads bank 8t + g, conflict-free

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_src) {
  const unsigned src = static_cast<unsigned>(__cvta_generic_to_shared(smem_src));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(src));
}

// The 16-bit pair type of T and the magic exponent: OR-ing a 4-bit q into the low mantissa bits of kBase gives
// kBase + q exactly (fp16: 1024 = 0x6400, ulp 1; bf16: 128 = 0x4300, ulp 1).
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kBase = 1024.f;
  static __device__ __forceinline__ type both(__half v) { return __half2half2(v); }
  static __device__ __forceinline__ type of(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kBase = 128.f;
  static __device__ __forceinline__ type both(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  static __device__ __forceinline__ type of(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
};

// B register s (0..3) of one word: nibbles s (low half) and s + 4 (high half), ((kBase + q) - (kBase + z)) * scale.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int s, typename Pair<T>::type base_z,
                                                 typename Pair<T>::type scale) {
  using T2 = typename Pair<T>::type;
  uint32_t bits = ((word >> (4 * s)) & 0x000F000Fu) | Pair<T>::kMagic;
  T2 v = *reinterpret_cast<const T2*>(&bits);
  v = __hmul2(__hsub2(v, base_z), scale);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T, bool HAS_ZEROS>
__global__ void __launch_bounds__(kGemmThreads) w4a16_gemm_kernel(const Params p) {
  using P2 = Pair<T>;
  __shared__ __align__(16) T sA[kStages][kBM][kAPitch];
  __shared__ __align__(16) uint32_t sB[kStages][4][kBPitch];
  __shared__ __align__(16) T sS[kStages][kBN];
  __shared__ __align__(16) T sZ[HAS_ZEROS ? kStages : 1][kBN];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int m0 = blockIdx.y * kBM;
  const int n0 = blockIdx.x * kBN;
  const int wm = (warp / 2) * 32;
  const int wn = (warp % 2) * 64;
  const int num_blocks = p.k / kKBlock;
  const T* x = static_cast<const T*>(p.x);
  const T* scales = static_cast<const T*>(p.scales);
  const T* zeros = static_cast<const T*>(p.zeros);

  // One stage: rows [m0, m0 + 64) x K rows [32b, 32b + 32) of x, word rows [4b, 4b + 4) x columns [n0, n0 + 128)
  // of qweight, and the scales / zeros of the block's group. Rows past M and columns past N are zero-filled.
  auto load_stage = [&](int stage, int b) {
    const int kb = b * kKBlock;
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // A: 64 rows x 4 chunks of 8 values
      const int c = tid + i * kGemmThreads;
      const int r = c / 4;
      const int col = (c % 4) * 8;
      const int row = m0 + r;
      const T* src = x + static_cast<int64_t>(min(row, p.m - 1)) * p.x_stride + kb + col;
      cp_async_16(&sA[stage][r][col], src, row < p.m);
    }
    {  // B: 4 word rows x 32 chunks of 4 words
      const int r = tid / 32;
      const int col = (tid % 32) * 4;
      const int n = n0 + col;
      const int32_t* src = p.qweight + (static_cast<int64_t>(b) * 4 + r) * p.n + min(n, p.n - 4);
      cp_async_16(&sB[stage][r][col], src, n < p.n);
    }
    const int64_t group = static_cast<int64_t>(kb / p.group_size) * p.n;
    if (tid < kBN / 8) {  // scales: 16 chunks of 8 values
      const int n = n0 + tid * 8;
      cp_async_16(&sS[stage][tid * 8], scales + group + min(n, p.n - 8), n < p.n);
    } else if (tid < 2 * (kBN / 8)) {
      if constexpr (HAS_ZEROS) {
        const int c = tid - kBN / 8;
        const int n = n0 + c * 8;
        cp_async_16(&sZ[stage][c * 8], zeros + group + min(n, p.n - 8), n < p.n);
      }
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_blocks) load_stage(s, s);
    cp_async_commit();  // empty groups keep the count: stage b is group b
  }
  for (int b = 0; b < num_blocks; ++b) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage b has landed from every thread's copies; every warp is done with stage b - 1
    const int next = b + kStages - 1;
    if (next < num_blocks) load_stage(next % kStages, next);  // into the slot of stage b - 1
    cp_async_commit();
    const int st = b % kStages;

    uint32_t a[2][2][4];  // [m tile][k-step]
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        ldmatrix_x4(a[mt][ks], &sA[st][wm + mt * 16 + (lane % 16)][ks * 16 + (lane / 16) * 8]);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = wn + j * 8 + g;
      const uint32_t word = sB[st][t][col];
      const float z = HAS_ZEROS ? to_float(sZ[HAS_ZEROS ? st : 0][col]) : 8.f;
      const typename P2::type base_z = P2::both(from_float<T>(P2::kBase + z));  // exact: an integer <= kBase + 16
      const typename P2::type scale = P2::both(sS[st][col]);
      uint32_t bq[4];
#pragma unroll
      for (int s = 0; s < 4; ++s) bq[s] = dequant_pair<T>(word, s, base_z, scale);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma_16816<T>(acc[mt][j], a[mt][0], bq[0], bq[1]);
        mma_16816<T>(acc[mt][j], a[mt][1], bq[2], bq[3]);
      }
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int col = n0 + wn + j * 8 + 2 * t;
    if (col >= p.n) continue;  // N % 8 == 0: col + 1 < N too
    const float b0 = bias != nullptr ? to_float(bias[col]) : 0.f;
    const float b1 = bias != nullptr ? to_float(bias[col + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm + mt * 16 + g + 8 * h;
        if (row < p.m) {
          *reinterpret_cast<typename P2::type*>(out + static_cast<int64_t>(row) * p.out_stride + col) =
              P2::of(acc[mt][j][2 * h] + b0, acc[mt][j][2 * h + 1] + b1);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ launch

template <typename T, int MT, bool HAS_ZEROS>
void launch_gemv_rows(const Params& p, int splits, cudaStream_t stream) {
  const int act = MT * p.blocks_per_split * kKBlock * static_cast<int>(sizeof(float));
  const int red = kGemvWarps * MT * kGemvCols * static_cast<int>(sizeof(float));
  const int smem = std::max(act, red);
  OMNI_CHECK(smem <= kMaxSmem, "w4a16_linear: blocks_per_split " << p.blocks_per_split << " needs " << smem
                                                                   << " bytes of shared memory for " << MT << " rows");
  const dim3 grid(static_cast<unsigned>((p.n + kGemvCols - 1) / kGemvCols), static_cast<unsigned>(splits));
  w4a16_gemv_kernel<T, MT, HAS_ZEROS><<<grid, kGemvThreads, smem, stream>>>(p);
  OMNI_CHECK_LAUNCH();
}

template <typename T, bool HAS_ZEROS>
void launch_gemv(const Params& p, int splits, cudaStream_t stream) {
  if (p.m <= 1) {
    launch_gemv_rows<T, 1, HAS_ZEROS>(p, splits, stream);
  } else if (p.m <= 2) {
    launch_gemv_rows<T, 2, HAS_ZEROS>(p, splits, stream);
  } else if (p.m <= 4) {
    launch_gemv_rows<T, 4, HAS_ZEROS>(p, splits, stream);
  } else {
    launch_gemv_rows<T, 8, HAS_ZEROS>(p, splits, stream);
  }
  if (splits > 1) {
    const int64_t total = static_cast<int64_t>(p.m) * p.n;
    w4a16_reduce_kernel<T><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(p, splits);
    OMNI_CHECK_LAUNCH();
  }
}

template <typename T>
void run(Params p, const TensorRef& x, bool has_zeros, bool has_perm, std::optional<TensorRef> partial,
         cudaStream_t stream) {
  const int64_t m = x.size(0);
  const int blocks = p.k / kKBlock;
  const int splits = (blocks + p.blocks_per_split - 1) / p.blocks_per_split;
  if (m <= kGemvMaxM || std::is_same<T, float>::value) {
    OMNI_CHECK((splits > 1) == partial.has_value(),
               "w4a16_linear: a partial-sum buffer is needed exactly when K is split (" << splits << " splits)");
    if (partial.has_value()) {
      OMNI_CHECK(partial->dtype == DType::kFloat32 && partial->dim() == 3 && partial->size(0) == splits &&
                     partial->size(1) >= std::min<int64_t>(m, kGemvMaxM) && partial->size(2) == p.n,
                 "w4a16_linear: partial must be fp32 (" << splits << ", " << std::min<int64_t>(m, kGemvMaxM) << ", "
                                                        << p.n << ")");
      p.partial = partial->data<float>();
    }
    const T* x0 = static_cast<const T*>(p.x);
    T* out0 = static_cast<T*>(p.out);
    for (int64_t r0 = 0; r0 < m; r0 += kGemvMaxM) {  // fp32 activations: chunks of 8 rows
      Params c = p;
      c.m = static_cast<int>(std::min<int64_t>(kGemvMaxM, m - r0));
      c.x = x0 + r0 * p.x_stride;
      c.out = out0 + r0 * p.out_stride;
      has_zeros ? launch_gemv<T, true>(c, splits, stream) : launch_gemv<T, false>(c, splits, stream);
    }
  } else {
    if constexpr (!std::is_same<T, float>::value) {
      OMNI_CHECK(!has_perm, "w4a16_linear: the GEMM path takes x already gathered by perm");
      OMNI_CHECK(x.ptr % 16 == 0 && (x.stride(0) * static_cast<int64_t>(sizeof(T))) % 16 == 0,
                 "w4a16_linear: the GEMM path needs 16-byte aligned rows of x");
      const dim3 grid(static_cast<unsigned>((p.n + kBN - 1) / kBN), static_cast<unsigned>((m + kBM - 1) / kBM));
      OMNI_CHECK(grid.y <= 65535u, "w4a16_linear: M = " << m << " exceeds the GEMM grid");
      if (has_zeros) {
        w4a16_gemm_kernel<T, true><<<grid, kGemmThreads, 0, stream>>>(p);
      } else {
        w4a16_gemm_kernel<T, false><<<grid, kGemmThreads, 0, stream>>>(p);
      }
      OMNI_CHECK_LAUNCH();
    }
  }
}

}  // namespace

// Shapes, dtypes and value ranges were checked by the Python front door (omni_kernels/w4a16_linear.py).
void w4a16_linear(const TensorRef& x, const TensorRef& qweight, const TensorRef& scales,
                  const std::optional<TensorRef>& zeros, const std::optional<TensorRef>& perm,
                  const std::optional<TensorRef>& bias, const TensorRef& out, const std::optional<TensorRef>& partial,
                  int64_t group_size, int64_t blocks_per_split, std::uintptr_t stream_handle) {
  ensure_device();
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  const int64_t n = out.size(1);
  if (m == 0) return;
  OMNI_CHECK(k % kKBlock == 0 && n % 8 == 0 && group_size > 0 && group_size % kKBlock == 0 && k % group_size == 0,
             "w4a16_linear: K (" << k << ") and group_size (" << group_size << ") must be multiples of 32, "
                                 << "group_size must divide K, N (" << n << ") a multiple of 8");
  OMNI_CHECK(k < (int64_t{1} << 30) && n < (int64_t{1} << 30), "w4a16_linear: K and N must be below 2^30");
  OMNI_CHECK(blocks_per_split >= 1, "w4a16_linear: blocks_per_split must be >= 1");
  OMNI_CHECK(qweight.ptr % 16 == 0 && scales.ptr % 16 == 0 && (!zeros.has_value() || zeros->ptr % 16 == 0),
             "w4a16_linear: qweight, scales and zeros must be 16-byte aligned");
  Params p{};
  p.x = reinterpret_cast<const void*>(x.ptr);
  p.qweight = qweight.data<const int32_t>();
  p.scales = reinterpret_cast<const void*>(scales.ptr);
  p.zeros = zeros.has_value() ? reinterpret_cast<const void*>(zeros->ptr) : nullptr;
  p.perm = perm.has_value() ? perm->data<const int32_t>() : nullptr;
  p.bias = bias.has_value() ? reinterpret_cast<const void*>(bias->ptr) : nullptr;
  p.out = reinterpret_cast<void*>(out.ptr);
  p.partial = nullptr;
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.m = static_cast<int>(std::min<int64_t>(m, INT32_MAX));
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.group_size = static_cast<int>(group_size);
  p.blocks_per_split = static_cast<int>(std::min<int64_t>(blocks_per_split, k / kKBlock));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(x.dtype, "w4a16_linear", scalar_t, [&] {
    run<scalar_t>(p, x, zeros.has_value(), perm.has_value(), partial, stream);
  });
}

}  // namespace omni
