// tmrope_store_kv: the decode step's fused TMRoPE + KV-cache write.
//   q: (T, Hq, D), k, v: (T, Hk, D), last dim contiguous, any token / head stride
//   positions: (3, T) int32/int64; inv_freq: (D/2,) float32 (HF's table)
//   k_cache, v_cache: (NB, P, Hk, D), last dim contiguous; slot_mapping: (T,) int32/int64, -1 skips the token
// q and k are rotated in place (as apply_tmrope does); the rotated k rows and the v rows are written to slot
// slot_mapping[t] of the caches. One launch instead of two, and the rotated keys are stored straight from
// registers. The kernel is apply_tmrope's (csrc/apply_tmrope.cu) with its STORE flag set.
#include <cstdint>

#include "common/tensor.h"

namespace omni {
namespace detail {

void tmrope_launch(const TensorRef& q, const TensorRef& k, const TensorRef& positions, const TensorRef& inv_freq,
                   int section_t, int section_th, const TensorRef* v, const TensorRef* k_cache,
                   const TensorRef* v_cache, const TensorRef* slot_mapping, std::uintptr_t stream);

}  // namespace detail

// Shapes, dtypes and value ranges were checked by the Python front door.
void tmrope_store_kv(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& positions,
                     const TensorRef& inv_freq, const TensorRef& k_cache, const TensorRef& v_cache,
                     const TensorRef& slot_mapping, int section_t, int section_th, std::uintptr_t stream) {
  detail::tmrope_launch(q, k, positions, inv_freq, section_t, section_th, &v, &k_cache, &v_cache, &slot_mapping,
                        stream);
}

}  // namespace omni
