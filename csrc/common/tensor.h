// TensorRef: what the Python launcher hands to C++ for one tensor. A raw device pointer plus
// dtype, sizes and strides (in elements), so the extension never links against torch.
#pragma once

#include <cstdint>
#include <vector>

#include "check.h"

namespace omni {

// Codes shared with omni_kernels/_cuda.py (_DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown";
}

struct TensorRef {
  std::uintptr_t ptr = 0;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int device = 0;

  int dim() const { return static_cast<int>(sizes.size()); }
  int64_t size(int i) const { return sizes.at(i < 0 ? i + dim() : i); }
  int64_t stride(int i) const { return strides.at(i < 0 ? i + dim() : i); }
  template <typename T>
  T* data() const { return reinterpret_cast<T*>(ptr); }
};

// Lazily checks once per process that a device exists, so that a machine without a GPU gets a
// clear error instead of a CUDA status code from deep inside a launch.
void ensure_device();

}  // namespace omni
