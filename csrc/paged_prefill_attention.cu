// paged_prefill_attention: causal attention of packed new tokens over their whole paged context.
//   q:                 (T, Hq, D), last dim contiguous, rows 16-byte aligned
//   k_cache, v_cache:  (NB, P, Hk, D), rows 16-byte aligned (checked by the Python launcher); any P
//   block_tables:      (B, max_blocks) int32; cu_seqlens_q: (B + 1,) int32; context_lens: (B,) int32
//   out:               (T, Hq, D)
// Sequence b's new tokens are the last n_b of its context: token j sits at ctx_b - n_b + j and sees keys
// 0 .. ctx_b - n_b + j.
//
// Grid (T / 64 + B, Hq), 128 threads. Tile j of sequence b is CTA cu[b] / 64 + b + j (host-known grid size,
// no read of cu_seqlens_q on the host); a CTA finds its sequence by binary search, spare CTAs exit. A CTA
// owns 64 new tokens of one query head (16 rows per warp) and walks the keys 0 .. its last position in tiles
// of 64, gathered through the block table into shared memory with 16-byte loads. Per tile and warp:
//   S = Q K^T (16 x 64) -> shared fp32 -> online softmax (two lanes per row, exp2, causal mask)
//   -> P -> O += P V.
// bf16/fp16: wmma tensor cores (fp32 accumulation, exact products). P goes in as two halves p_hi + p_lo in
// the input precision (p to ~2^-17 instead of 2^-9), so the error stays that of fp32 maths; the output
// accumulator lives in wmma fragments and is rescaled through shared memory only when a row max moved.
// fp32: the same tiles on SIMT cores in fp32.
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/tensor.h"

namespace omni {
namespace {

using namespace nvcuda;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = 16 * kWarps;  // query rows per CTA; CUDA_BLOCK_M in omni_kernels/paged_prefill_attention.py
constexpr int kBN = 64;           // keys per tile

constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// 16-byte asynchronous global -> shared copy (sm_80+); zero-fills the destination when !valid (src-size 0:
// nothing is read).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
constexpr int cmax(int a, int b) { return a > b ? a : b; }

template <typename scalar_t>
struct PrefillParams {
  const scalar_t* q;
  const scalar_t* k_cache;
  const scalar_t* v_cache;
  const int32_t* block_tables;
  const int32_t* cu_seqlens;
  const int32_t* context_lens;
  scalar_t* out;
  int64_t q_stride_t, q_stride_h;
  int64_t kc_stride_b, kc_stride_p, kc_stride_h;
  int64_t vc_stride_b, vc_stride_p, vc_stride_h;
  int64_t bt_stride_b, o_stride_t, o_stride_h;
  float scale_log2;
  int page_size, group_size, num_seqs;
};

// Shared memory layout (bytes). Rows are padded by 16 bytes against bank conflicts; every wmma pointer
// stays 32-byte aligned (16-row offsets of the padded rows, 16-column offsets).
template <typename scalar_t, int D>
struct Layout {
  static constexpr bool kTC = !std::is_same<scalar_t, float>::value;
  static constexpr int kPad = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int kLd = D + kPad;     // Q, K, V tile rows (elements)
  static constexpr int kLdS = kBN + 4;     // fp32 score rows
  static constexpr int kLdO = D + 4;       // fp32 output staging rows (tensor-core path)
  static constexpr int kLdP = kBN + kPad;  // P rows (tensor-core path)
  static constexpr int kTileBytes = round_up(kBM * kLd * static_cast<int>(sizeof(scalar_t)), 128);
  static constexpr int kWarpFBytes = round_up(16 * (kTC ? cmax(kLdS, kLdO) : kLdS) * 4, 128);
  static constexpr int kWarpPBytes = kTC ? round_up(2 * 16 * kLdP * static_cast<int>(sizeof(scalar_t)), 128) : 0;
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kTileBytes;
  static constexpr int kOffV = kOffK + kTileBytes;
  static constexpr int kOffF = kOffV + kTileBytes;
  static constexpr int kOffP = kOffF + kWarps * kWarpFBytes;
  static constexpr int kOffStats = kOffP + kWarps * kWarpPBytes;
  static constexpr int kBytes = kOffStats + 2 * kWarps * 16 * 4;
  static_assert(kBM == kBN, "Q and K/V tiles share one row layout");
};

// Tensor-core state of one warp: its 16 query rows as A fragments, its 16 x D output as accumulators.
template <typename scalar_t, int D>
struct TensorCoreWarp {
  using L = Layout<scalar_t, D>;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> qa[D / 16];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[D / 16];

  __device__ void init(const scalar_t* sQw) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      wmma::load_matrix_sync(qa[ks], sQw + ks * 16, L::kLd);
      wmma::fill_fragment(o[ks], 0.f);
    }
  }

  // sF[16][kLdS] = Q K^T for the tile (unscaled).
  __device__ void scores(const scalar_t* sK, float* sF) {
#pragma unroll
    for (int nf = 0; nf < kBN / 16; ++nf) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::col_major> kb;  // K rows = columns of K^T
        wmma::load_matrix_sync(kb, sK + nf * 16 * L::kLd + ks * 16, L::kLd);
        wmma::mma_sync(s, qa[ks], kb, s);
      }
      wmma::store_matrix_sync(sF + nf * 16, s, L::kLdS, wmma::mem_row_major);
    }
  }

  // O[r] *= scale[r] through shared memory (sF is free once P is written).
  __device__ void rescale(float* sF, const float* sScale, int lane) {
#pragma unroll
    for (int nf = 0; nf < D / 16; ++nf) wmma::store_matrix_sync(sF + nf * 16, o[nf], L::kLdO, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < 16 * D; i += 32) sF[(i / D) * L::kLdO + i % D] *= sScale[i / D];
    __syncwarp();
#pragma unroll
    for (int nf = 0; nf < D / 16; ++nf) wmma::load_matrix_sync(o[nf], sF + nf * 16, L::kLdO, wmma::mem_row_major);
  }

  // O += (P_hi + P_lo) V.
  __device__ void pv(const scalar_t* sPhi, const scalar_t* sPlo, const scalar_t* sV) {
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> ph, pl;
      wmma::load_matrix_sync(ph, sPhi + ks * 16, L::kLdP);
      wmma::load_matrix_sync(pl, sPlo + ks * 16, L::kLdP);
#pragma unroll
      for (int nf = 0; nf < D / 16; ++nf) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::row_major> vb;
        wmma::load_matrix_sync(vb, sV + ks * 16 * L::kLd + nf * 16, L::kLd);
        wmma::mma_sync(o[nf], ph, vb, o[nf]);
        wmma::mma_sync(o[nf], pl, vb, o[nf]);
      }
    }
  }

  // Unnormalised output row r, dims d..: written to sF[r][kLdO] for the epilogue.
  __device__ void stage(float* sF) {
#pragma unroll
    for (int nf = 0; nf < D / 16; ++nf) wmma::store_matrix_sync(sF + nf * 16, o[nf], L::kLdO, wmma::mem_row_major);
  }
};

// fp32 state of one warp: lane owns dims lane * DPL .. + DPL of the warp's 16 output rows.
template <int D>
struct SimtWarp {
  using L = Layout<float, D>;
  static constexpr int DPL = D / 32;
  static_assert(D % 128 == 0 || D == 64, "fp32 path: head_dim 64 or a multiple of 128");
  float o[16][DPL];
  const float* sQw;

  __device__ void init(const float* q_rows) {
    sQw = q_rows;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
#pragma unroll
      for (int i = 0; i < DPL; ++i) o[r][i] = 0.f;
    }
  }

  // Lane computes keys lane and lane + 32 for the 16 rows (float4 reads; padded K rows: no bank conflicts).
  __device__ void scores(const float* sK, float* sF, int lane) {
    float s0[16], s1[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) s0[r] = s1[r] = 0.f;
    const float* k0 = sK + lane * L::kLd;
    const float* k1 = sK + (lane + 32) * L::kLd;
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
      const float4 a = *reinterpret_cast<const float4*>(k0 + d);
      const float4 c = *reinterpret_cast<const float4*>(k1 + d);
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const float4 qv = *reinterpret_cast<const float4*>(sQw + r * L::kLd + d);  // broadcast
        s0[r] = fmaf(qv.x, a.x, fmaf(qv.y, a.y, fmaf(qv.z, a.z, fmaf(qv.w, a.w, s0[r]))));
        s1[r] = fmaf(qv.x, c.x, fmaf(qv.y, c.y, fmaf(qv.z, c.z, fmaf(qv.w, c.w, s1[r]))));
      }
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      sF[r * L::kLdS + lane] = s0[r];
      sF[r * L::kLdS + lane + 32] = s1[r];
    }
  }

  // O = O * scale[r] + P V, P in place in sF.
  __device__ void rescale_pv(const float* sF, const float* sScale, const float* sV, int lane) {
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const float a = sScale[r];
#pragma unroll
      for (int i = 0; i < DPL; ++i) o[r][i] *= a;
    }
#pragma unroll 4
    for (int k = 0; k < kBN; ++k) {
      float v[DPL];
#pragma unroll
      for (int i = 0; i < DPL; ++i) v[i] = sV[k * L::kLd + lane * DPL + i];
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const float pk = sF[r * L::kLdS + k];  // broadcast
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[r][i] = fmaf(pk, v[i], o[r][i]);
      }
    }
  }
};

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads) paged_prefill_kernel(const PrefillParams<scalar_t> p) {
  using L = Layout<scalar_t, D>;
  constexpr bool TC = L::kTC;
  constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int CPR = D / VEC;                 // 16-byte chunks per row
  constexpr int CHUNKS = kBN * CPR / kThreads;  // chunks per thread per tile
  static_assert((kBN * CPR) % kThreads == 0, "tile chunks must divide over the CTA");

  extern __shared__ __align__(128) unsigned char smem[];
  scalar_t* sQ = reinterpret_cast<scalar_t*>(smem + L::kOffQ);
  scalar_t* sK = reinterpret_cast<scalar_t*>(smem + L::kOffK);
  scalar_t* sV = reinterpret_cast<scalar_t*>(smem + L::kOffV);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  float* sF = reinterpret_cast<float*>(smem + L::kOffF + warp * L::kWarpFBytes);
  scalar_t* sPhi = reinterpret_cast<scalar_t*>(smem + L::kOffP + warp * L::kWarpPBytes);
  scalar_t* sPlo = sPhi + 16 * L::kLdP;
  float* sScale = reinterpret_cast<float*>(smem + L::kOffStats) + warp * 16;
  float* sL = reinterpret_cast<float*>(smem + L::kOffStats) + (kWarps + warp) * 16;

  // The sequence of this tile: the largest b with cu[b] / kBM + b <= pid (strictly increasing in b).
  const int pid = blockIdx.x;
  const int h = blockIdx.y;
  int lo = 0;
  int hi = p.num_seqs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (p.cu_seqlens[mid] / kBM + mid <= pid) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int b = lo;
  const int seq_start = p.cu_seqlens[b];
  const int n = p.cu_seqlens[b + 1] - seq_start;
  const int i0 = (pid - (seq_start / kBM + b)) * kBM;
  if (i0 >= n) return;  // a spare tile of the layout (uniform over the CTA)
  const int rows = min(kBM, n - i0);
  const int ctx = p.context_lens[b];
  const int pos0 = ctx - n + i0;  // position of the tile's first row (>= 0 since n <= ctx)
  const int kv_end = pos0 + rows;  // keys 0 .. kv_end - 1 feed this tile
  const int64_t k_head = static_cast<int64_t>(h / p.group_size) * p.kc_stride_h;
  const int64_t v_head = static_cast<int64_t>(h / p.group_size) * p.vc_stride_h;
  const int32_t* bt = p.block_tables + static_cast<int64_t>(b) * p.bt_stride_b;

  // Q tile; rows past the sequence end are zeros.
  for (int c = tid; c < kBM * CPR; c += kThreads) {
    const int r = c / CPR;
    const int col = (c % CPR) * VEC;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows) {
      val = __ldg(reinterpret_cast<const uint4*>(p.q + static_cast<int64_t>(seq_start + i0 + r) * p.q_stride_t +
                                                 static_cast<int64_t>(h) * p.q_stride_h + col));
    }
    *reinterpret_cast<uint4*>(sQ + r * L::kLd + col) = val;
  }
  __syncthreads();

  using Warp = typename std::conditional<TC, TensorCoreWarp<scalar_t, D>, SimtWarp<D>>::type;
  Warp state;
  state.init(sQ + warp * 16 * L::kLd);

  // Row statistics: lanes 2r and 2r+1 both hold those of row r of the warp. Rows past the sequence end take
  // the last row's position (finite maths, never stored).
  const int r_own = lane >> 1;
  const int half = lane & 1;
  const int pos = pos0 + min(warp * 16 + r_own, rows - 1);
  float m_run = -INFINITY;
  float l_run = 0.f;

  // Tile loads: 16-byte cp.async copies straight into shared memory; rows past kv_end are zero-filled (a
  // masked 0 * garbage could still be NaN). The next K tile is requested as soon as the scores are done, the
  // next V tile as soon as P V is done.
  auto issue_tile = [&](scalar_t* dst, const scalar_t* cache, int64_t stride_b, int64_t stride_p, int64_t head,
                        int n0) {
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      const int c = tid + i * kThreads;
      const int t = n0 + c / CPR;
      const scalar_t* src = cache;  // any valid address when nothing is read
      if (t < kv_end) {
        src = cache + static_cast<int64_t>(bt[t / p.page_size]) * stride_b +
              static_cast<int64_t>(t % p.page_size) * stride_p + head + (c % CPR) * VEC;
      }
      cp_async_16(dst + (c / CPR) * L::kLd + (c % CPR) * VEC, src, t < kv_end);
    }
  };
  issue_tile(sK, p.k_cache, p.kc_stride_b, p.kc_stride_p, k_head, 0);
  issue_tile(sV, p.v_cache, p.vc_stride_b, p.vc_stride_p, v_head, 0);
  cp_async_commit();

  for (int n0 = 0; n0 < kv_end; n0 += kBN) {
    const bool more = n0 + kBN < kv_end;  // uniform over the CTA
    cp_async_wait_all();
    __syncthreads();  // this tile's K and V have landed, from every thread's copies

    if constexpr (TC) {
      state.scores(sK, sF);
    } else {
      state.scores(sK, sF, lane);
    }
    __syncthreads();  // every warp is done with sK
    if (more) {
      issue_tile(sK, p.k_cache, p.kc_stride_b, p.kc_stride_p, k_head, n0 + kBN);
      cp_async_commit();
    }

    // Online softmax of row r_own over columns 2k + half.
    float* srow = sF + r_own * L::kLdS;
    const int visible = pos - n0;  // columns 0 .. visible of this tile are causal for the row
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < kBN / 2; ++k) {
      const int c = 2 * k + half;
      if (c <= visible) mx = fmaxf(mx, srow[c] * p.scale_log2);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);  // finite: key 0 is visible to every row in the first tile
    const float alpha = exp2f(m_run - m_new);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kBN / 2; ++k) {
      const int c = 2 * k + half;
      const float e = c <= visible ? exp2f(srow[c] * p.scale_log2 - m_new) : 0.f;
      sum += e;
      if constexpr (TC) {
        const scalar_t e_hi = from_float<scalar_t>(e);
        sPhi[r_own * L::kLdP + c] = e_hi;
        sPlo[r_own * L::kLdP + c] = from_float<scalar_t>(e - to_float(e_hi));
      } else {
        srow[c] = e;
      }
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    if (half == 0) sScale[r_own] = alpha;
    __syncwarp();

    if constexpr (TC) {
      if (__any_sync(0xffffffffu, alpha != 1.f)) state.rescale(sF, sScale, lane);  // warp-uniform branch
      state.pv(sPhi, sPlo, sV);
    } else {
      state.rescale_pv(sF, sScale, sV, lane);
    }
    if (more) {
      __syncthreads();  // every warp is done with sV
      issue_tile(sV, p.v_cache, p.vc_stride_b, p.vc_stride_p, v_head, n0 + kBN);
      cp_async_commit();
    }
  }

  // Epilogue: normalise and store the valid rows.
  if (half == 0) sL[r_own] = l_run;
  __syncwarp();
  const int64_t out_head = static_cast<int64_t>(h) * p.o_stride_h;
  if constexpr (TC) {
    state.stage(sF);
    __syncwarp();
    for (int i = lane; i < 16 * D; i += 32) {
      const int r = i / D;
      const int row = warp * 16 + r;
      if (row < rows) {
        p.out[static_cast<int64_t>(seq_start + i0 + row) * p.o_stride_t + out_head + i % D] =
            from_float<scalar_t>(sF[r * L::kLdO + i % D] / sL[r]);
      }
    }
  } else {
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      if (row < rows) {
        const float inv = 1.f / sL[r];
#pragma unroll
        for (int i = 0; i < SimtWarp<D>::DPL; ++i) {
          p.out[static_cast<int64_t>(seq_start + i0 + row) * p.o_stride_t + out_head + lane * SimtWarp<D>::DPL + i] =
              from_float<scalar_t>(state.o[r][i] * inv);
        }
      }
    }
  }
}

template <typename scalar_t, int D>
void launch_prefill(const PrefillParams<scalar_t>& p, int num_tokens, int num_q_heads, cudaStream_t stream) {
  using L = Layout<scalar_t, D>;
  auto kernel = paged_prefill_kernel<scalar_t, D>;
  // Above the default 48 KB of dynamic shared memory a kernel must opt in (not a stream operation: fine
  // during CUDA-graph capture).
  OMNI_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  const dim3 grid(num_tokens / kBM + p.num_seqs, num_q_heads);
  kernel<<<grid, kThreads, L::kBytes, stream>>>(p);
  OMNI_CHECK_LAUNCH();
}

}  // namespace

// Shapes, dtypes, value ranges and alignment were checked by the Python front door and launcher.
void paged_prefill_attention(const TensorRef& q, const TensorRef& k_cache, const TensorRef& v_cache,
                             const TensorRef& block_tables, const TensorRef& cu_seqlens_q,
                             const TensorRef& context_lens, const TensorRef& out, double scale,
                             std::uintptr_t stream_handle) {
  ensure_device();
  const int num_tokens = static_cast<int>(q.size(0));
  const int num_seqs = static_cast<int>(context_lens.size(0));
  if (num_tokens == 0 || num_seqs == 0) return;
  const int num_q_heads = static_cast<int>(q.size(1));
  const int head_dim = static_cast<int>(q.size(2));
  OMNI_CHECK(num_q_heads <= 65535, "paged_prefill_attention: at most 65535 query heads, got " << num_q_heads);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  OMNI_DISPATCH_FLOAT(q.dtype, "paged_prefill_attention", scalar_t, [&] {
    PrefillParams<scalar_t> p{};
    p.q = q.data<scalar_t>();
    p.k_cache = k_cache.data<scalar_t>();
    p.v_cache = v_cache.data<scalar_t>();
    p.block_tables = block_tables.data<int32_t>();
    p.cu_seqlens = cu_seqlens_q.data<int32_t>();
    p.context_lens = context_lens.data<int32_t>();
    p.out = out.data<scalar_t>();
    p.q_stride_t = q.stride(0);
    p.q_stride_h = q.stride(1);
    p.kc_stride_b = k_cache.stride(0);
    p.kc_stride_p = k_cache.stride(1);
    p.kc_stride_h = k_cache.stride(2);
    p.vc_stride_b = v_cache.stride(0);
    p.vc_stride_p = v_cache.stride(1);
    p.vc_stride_h = v_cache.stride(2);
    p.bt_stride_b = block_tables.stride(0);
    p.o_stride_t = out.stride(0);
    p.o_stride_h = out.stride(1);
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
    p.page_size = static_cast<int>(k_cache.size(1));
    p.group_size = num_q_heads / static_cast<int>(k_cache.size(2));
    p.num_seqs = num_seqs;
    switch (head_dim) {
      case 64: launch_prefill<scalar_t, 64>(p, num_tokens, num_q_heads, stream); break;
      case 128: launch_prefill<scalar_t, 128>(p, num_tokens, num_q_heads, stream); break;
      default: OMNI_CHECK(false, "paged_prefill_attention: the cuda backend supports head_dim 64 and 128, got "
                                     << head_dim);
    }
  });
}

}  // namespace omni
