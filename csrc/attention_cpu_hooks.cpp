// Test and benchmark hooks of the CPU attention: the tile product on its own, and the ISA selector
// (which hand-written kernels run; Python: transfusion_fast.ops._cpu_attention.set_cpu_isa).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "attention_cpu.h"

namespace transfusion_fast::attention_cpu {
namespace {

// The tile product of the attention (gemm: the selected ISA's register-tiled kernel, BLAS on the
// portable path) on fp32 tensors, in row-major terms: returns alpha * op(b) @ a + beta * c, with a
// (k, m), op(b) = b (n, k) or b^T for b (k, n), c (n, m); a and b may have any row stride (leading
// dimension). c is copied first and is not read when beta == 0.
at::Tensor attention_cpu_tile_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool trans_b,
                                   double alpha, double beta) {
  for (const auto& [t, name] : {std::pair{&a, "a"}, std::pair{&b, "b"}, std::pair{&c, "c"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && (t->stride(1) == 1 || t->size(1) <= 1),
                "attention_cpu_tile_gemm: ", name, " must be a 2-d float32 tensor with unit column stride, got ",
                t->scalar_type(), " of shape ", t->sizes(), " and strides ", t->strides());
  }
  const int64_t k = a.size(0), m = a.size(1), n = c.size(0);
  TORCH_CHECK(c.size(1) == m, "attention_cpu_tile_gemm: c must be (n, ", m, "), got ", c.sizes());
  const std::vector<int64_t> b_shape = trans_b ? std::vector<int64_t>{k, n} : std::vector<int64_t>{n, k};
  TORCH_CHECK(b.sizes() == at::IntArrayRef(b_shape), "attention_cpu_tile_gemm: b must be ", at::IntArrayRef(b_shape),
              ", got ", b.sizes());
  at::Tensor out = c.contiguous().clone();
  gemm(active_isa(), kN, trans_b ? kT : kN, m, n, k, static_cast<float>(alpha), a.const_data_ptr<float>(),
       std::max<int64_t>(a.stride(0), 1), b.const_data_ptr<float>(), std::max<int64_t>(b.stride(0), 1),
       static_cast<float>(beta), out.mutable_data_ptr<float>(), std::max<int64_t>(m, 1));
  return out;
}

std::string attention_cpu_isa() { return isa_name(active_isa()); }

// Selects the kernels every later call runs ("avx512", "avx2", "portable") and returns the previous
// selection; refuses an ISA this CPU (or build) cannot run.
std::string attention_cpu_set_isa(const std::string& isa) { return isa_name(set_active_isa(isa)); }

// The ISAs this CPU and build can run, best last.
std::vector<std::string> attention_cpu_isas() {
  std::vector<std::string> names;
  for (Isa isa : supported_isas()) names.emplace_back(isa_name(isa));
  return names;
}

}  // namespace
}  // namespace transfusion_fast::attention_cpu

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  using namespace transfusion_fast::attention_cpu;
  m.def("attention_cpu_tile_gemm(Tensor a, Tensor b, Tensor c, bool trans_b, float alpha, float beta) -> Tensor");
  m.def("attention_cpu_isa() -> str", &attention_cpu_isa);
  m.def("attention_cpu_set_isa(str isa) -> str", &attention_cpu_set_isa);
  m.def("attention_cpu_isas() -> str[]", &attention_cpu_isas);
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("attention_cpu_tile_gemm", &transfusion_fast::attention_cpu::attention_cpu_tile_gemm);
}
