// The Python module prism_kernels._C_<variant>: the CPU kernels as plain
// functions, plus a little introspection.
//
// The extension does not register anything with the `prism` torch.library ops.
// Their schemas and their CPU / CUDA implementations live in
// prism_kernels/ops.py, whose CPU implementation calls `attention` /
// `segment_means` / `matched_rows` below when the selected backend is "cpp" (or "auto" with the
// extension built). pybind11 functions are the cheapest way in from Python
// (no second trip through the dispatcher); the GIL is released while a kernel
// runs.
#include <torch/extension.h>

#include "common.h"

namespace prism {

std::tuple<at::Tensor, at::Tensor> segment_means_cpu(const at::Tensor& x, int64_t num_segments);
std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& log_counts,
                                                 const std::optional<at::Tensor>& q_pos,
                                                 const std::optional<at::Tensor>& k_pos,
                                                 double scale, int64_t decode_chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> matched_rows_cpu(const at::Tensor& q0, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& seg_of,
                                                                int64_t num_segments, double scale);
namespace attn {
int64_t decode_chunk(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t threads);
bool set_decode_enabled(bool on);
int64_t decode_calls();
}  // namespace attn

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prism CPU kernels (called by the CPU implementation of the prism ops, prism_kernels/ops.py)";
  m.def("segment_means", &prism::segment_means_cpu,
        "segment_means(x, num_segments) -> (means, counts): kernel form of prism::segment_means",
        py::arg("x"), py::arg("num_segments"), py::call_guard<py::gil_scoped_release>());
  m.def("matched_rows", &prism::matched_rows_cpu,
        "matched_rows(q0, k, v, seg_of, num_segments, scale) -> (km, vm, bias): kernel form of "
        "prism::matched_rows",
        py::arg("q0"), py::arg("k"), py::arg("v"), py::arg("seg_of"), py::arg("num_segments"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("attention",
        [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const std::optional<at::Tensor>& lc, const std::optional<at::Tensor>& qp,
           const std::optional<at::Tensor>& kp, double scale) {
          return prism::attention_cpu(q, k, v, lc, qp, kp, scale, -1);
        },
        "attention(q, k, v, log_counts, q_pos, k_pos, scale) -> (out, lse): kernel form of "
        "prism::attention",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("log_counts"), py::arg("q_pos"),
        py::arg("k_pos"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("attention_with_chunk", &prism::attention_cpu,
        "attention with the decode path's choice made by the caller: decode_chunk < 0 decides "
        "as `attention` does, 0 never takes the split-K decode path (the general kernels), "
        "> 0 takes it with that many keys per chunk (tests, A/B timing)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("log_counts"), py::arg("q_pos"),
        py::arg("k_pos"), py::arg("scale"), py::arg("decode_chunk"),
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_chunk", &prism::attn::decode_chunk,
        "keys per chunk the decode path uses for this shape and thread count (0: not taken)",
        py::arg("B"), py::arg("H"), py::arg("Hkv"), py::arg("nq"), py::arg("nk"),
        py::arg("threads"));
  m.def("set_decode_enabled", &prism::attn::set_decode_enabled,
        "turn the split-K decode path on/off (default on; PRISM_ATTN_DECODE=0 starts it off); "
        "returns the previous setting", py::arg("on"));
  m.def("decode_calls", &prism::attn::decode_calls,
        "how many times the split-K decode path has run in this process (tests)");
  m.def("capability", &prism::capability, "ISA this variant was compiled for");
  m.def("block_sizes", [](int64_t nq, int64_t nk, bool causal) {
    auto b = prism::choose_blocks(nq, nk, causal);
    return std::make_pair(b.q_block, b.k_block);
  }, "(query block, key block) the attention kernel uses for Nq, Nk, causal",
        py::arg("nq"), py::arg("nk"), py::arg("causal") = false);
  m.def("has_blas", &prism::have_blas, "whether sgemm_/dgemm_ were found (else portable loops)");
}
