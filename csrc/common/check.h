// Error checking shared by every op: host-side argument checks and CUDA runtime status.
// Kernels never check; launchers (here and in the Python front doors) do.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace omni {

[[noreturn]] inline void fail(const char* file, int line, const std::string& msg) {
  std::ostringstream os;
  os << msg << " (" << file << ":" << line << ")";
  throw std::runtime_error(os.str());
}

}  // namespace omni

#define OMNI_CHECK(cond, msg)                                                   \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::ostringstream omni_os_;                                              \
      omni_os_ << msg;                                                          \
      ::omni::fail(__FILE__, __LINE__, omni_os_.str());                         \
    }                                                                           \
  } while (0)

#define OMNI_CUDA_CHECK(expr)                                                   \
  do {                                                                          \
    cudaError_t omni_err_ = (expr);                                             \
    if (omni_err_ != cudaSuccess) {                                             \
      ::omni::fail(__FILE__, __LINE__,                                          \
                   std::string("CUDA error: ") + cudaGetErrorString(omni_err_)); \
    }                                                                           \
  } while (0)

// After a launch: report a bad configuration at once instead of at the next sync.
#define OMNI_CHECK_LAUNCH() OMNI_CUDA_CHECK(cudaGetLastError())
