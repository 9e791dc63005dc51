// The Python module transfusion_fast._C. Importing it registers every op of csrc/ with the
// dispatcher under torch.ops.transfusion_fast (see the TORCH_LIBRARY_FRAGMENT blocks beside it).
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "transfusion_fast compiled ops (CPU always, CUDA when built with nvcc)";
  m.def("with_cuda", []() {
#ifdef TF_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
}
