// Registration of the CPU kernels of the `prism` ops, and a tiny Python module
// (prism_kernels._C_<variant>) for introspection.
//
// The op schemas are defined in Python (prism_kernels/ops.py); this file only
// attaches CPU implementations. Importing the module registers them, which is
// why prism_kernels/_cpp.py imports exactly one variant.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

namespace prism {

std::tuple<at::Tensor, at::Tensor> segment_means_cpu(const at::Tensor& x, int64_t num_segments);
std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& log_counts,
                                                 const std::optional<at::Tensor>& q_pos,
                                                 const std::optional<at::Tensor>& k_pos,
                                                 double scale);

const char* capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace prism

TORCH_LIBRARY_IMPL(prism, CPU, m) {
  m.impl("segment_means", &prism::segment_means_cpu);
  m.impl("attention", &prism::attention_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prism CPU kernels (registered as the CPU implementation of the prism ops)";
  m.def("capability", &prism::capability, "ISA this variant was compiled for");
  m.def("block_sizes", [](int64_t nq, int64_t nk, bool causal) {
    auto b = prism::choose_blocks(nq, nk, causal);
    return std::make_pair(b.q_block, b.k_block);
  }, "(query block, key block) the attention kernel uses for Nq, Nk, causal",
        py::arg("nq"), py::arg("nk"), py::arg("causal") = false);
  m.def("has_blas", &prism::have_blas, "whether sgemm_/dgemm_ were found (else portable loops)");
}
