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
void paged_decode_attention(const TensorRef& q, const TensorRef& k_cache, const TensorRef& v_cache,
                            const TensorRef& block_tables, const TensorRef& context_lens, const TensorRef& out,
                            const TensorRef& part_acc, const TensorRef& part_ml, double scale,
                            int64_t partition_size, int64_t num_parts, std::uintptr_t stream);
void paged_prefill_attention(const TensorRef& q, const TensorRef& k_cache, const TensorRef& v_cache,
                             const TensorRef& block_tables, const TensorRef& cu_seqlens_q,
                             const TensorRef& context_lens, const TensorRef& out, double scale,
                             std::uintptr_t stream);
void window_attention(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& out,
                      const TensorRef& cu_seqlens, const TensorRef& seg_ids, bool packed, int64_t max_seqlen,
                      double scale, std::uintptr_t stream);
void apply_tmrope(const TensorRef& q, const TensorRef& k, const TensorRef& positions, const TensorRef& inv_freq,
                  int section_t, int section_th, std::uintptr_t stream);
void tmrope_store_kv(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& positions,
                     const TensorRef& inv_freq, const TensorRef& k_cache, const TensorRef& v_cache,
                     const TensorRef& slot_mapping, int section_t, int section_th, std::uintptr_t stream);
void sliding_block_attention(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& out,
                             const std::optional<TensorRef>& cu_seqlens, int block_size, int look_back,
                             int look_ahead, double scale, bool allow_tf32, std::uintptr_t stream);
void anti_aliased_snake(const TensorRef& x, const TensorRef& alpha, const TensorRef& beta,
                        const TensorRef& up_filter, const TensorRef& down_filter, const TensorRef& out,
                        std::uintptr_t stream);
void add_rms_norm(const TensorRef& x, const std::optional<TensorRef>& residual, const TensorRef& weight,
                  const TensorRef& normed, const std::optional<TensorRef>& new_residual, double eps,
                  std::uintptr_t stream);
void silu_and_mul(const TensorRef& gate_up, const TensorRef& out, std::uintptr_t stream);
void w4a16_linear(const TensorRef& x, const TensorRef& qweight, const TensorRef& scales,
                  const std::optional<TensorRef>& zeros, const std::optional<TensorRef>& perm,
                  const std::optional<TensorRef>& bias, const TensorRef& out, const std::optional<TensorRef>& partial,
                  int64_t group_size, int64_t blocks_per_split, std::uintptr_t stream);

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
  m.def("paged_decode_attention", &omni::paged_decode_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("out"), py::arg("part_acc"),
        py::arg("part_ml"), py::arg("scale"), py::arg("partition_size"), py::arg("num_parts"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_prefill_attention", &omni::paged_prefill_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("cu_seqlens_q"), py::arg("context_lens"),
        py::arg("out"), py::arg("scale"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("window_attention", &omni::window_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("cu_seqlens"), py::arg("seg_ids"), py::arg("packed"), py::arg("max_seqlen"), py::arg("scale"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("apply_tmrope", &omni::apply_tmrope, py::arg("q"), py::arg("k"), py::arg("positions"),
        py::arg("inv_freq"), py::arg("section_t"), py::arg("section_th"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("tmrope_store_kv", &omni::tmrope_store_kv, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("positions"), py::arg("inv_freq"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("section_t"), py::arg("section_th"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("sliding_block_attention", &omni::sliding_block_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("cu_seqlens"), py::arg("block_size"), py::arg("look_back"), py::arg("look_ahead"),
        py::arg("scale"), py::arg("allow_tf32"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("anti_aliased_snake", &omni::anti_aliased_snake, py::arg("x"), py::arg("alpha"), py::arg("beta"),
        py::arg("up_filter"), py::arg("down_filter"), py::arg("out"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &omni::add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("normed"), py::arg("new_residual"), py::arg("eps"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_and_mul", &omni::silu_and_mul, py::arg("gate_up"), py::arg("out"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("w4a16_linear", &omni::w4a16_linear, py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("perm"), py::arg("bias"), py::arg("out"), py::arg("partial"), py::arg("group_size"),
        py::arg("blocks_per_split"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
