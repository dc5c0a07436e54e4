// The one pybind11 module, omni_kernels._C. Every op takes TensorRefs (raw device pointers with
// dtype, sizes and strides) and a CUDA stream handle; nothing here links against torch.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <mutex>
#include <string>

#include "common/tensor.h"

namespace py = pybind11;

namespace omni {

void store_kv_cache(const TensorRef& k, const TensorRef& v, const TensorRef& k_cache, const TensorRef& v_cache,
                    const TensorRef& slot_mapping, std::uintptr_t stream);

void ensure_device() {
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
      error = std::string("omni_kernels._C: no usable CUDA device (") + cudaGetErrorString(status) + ")";
      cudaGetLastError();  // clear the sticky status so that later queries start clean
    } else if (count == 0) {
      error = "omni_kernels._C: no CUDA device on this machine";
    }
  });
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace omni

PYBIND11_MODULE(_C, m) {
  m.doc() = "omni CUDA kernels over raw device pointers (see omni_kernels/_cuda.py)";

  py::enum_<omni::DType>(m, "DType")
      .value("float32", omni::DType::kFloat32)
      .value("float16", omni::DType::kFloat16)
      .value("bfloat16", omni::DType::kBFloat16)
      .value("int32", omni::DType::kInt32)
      .value("int64", omni::DType::kInt64);

  py::class_<omni::TensorRef>(m, "TensorRef")
      .def(py::init([](std::uintptr_t ptr, omni::DType dtype, std::vector<int64_t> sizes,
                       std::vector<int64_t> strides, int device) {
             OMNI_CHECK(sizes.size() == strides.size(), "TensorRef: sizes and strides differ in length");
             return omni::TensorRef{ptr, dtype, std::move(sizes), std::move(strides), device};
           }),
           py::arg("ptr"), py::arg("dtype"), py::arg("sizes"), py::arg("strides"), py::arg("device"))
      .def_readonly("sizes", &omni::TensorRef::sizes)
      .def_readonly("strides", &omni::TensorRef::strides);

  m.def("device_count", [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return count;
  }, "Number of CUDA devices the static runtime sees (0 without a driver or GPU).");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
#ifdef OMNI_CUDA_ARCH_LIST
  m.attr("archs") = OMNI_CUDA_ARCH_LIST;
#endif

  m.def("store_kv_cache", &omni::store_kv_cache, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
