// Op schemas of the exact merge / unmerge (csrc/host/exact_merge.h describes the function),
// declared once. Device files register only implementations (csrc/cpu/exact_merge_cpu.cpp,
// csrc/cuda/exact_merge_cuda.cpp); the fake kernels and the pure-PyTorch fallback live in
// lora_ext/ops/exact_merge.py, mirroring these strings (tests/test_dispatcher.py checks it).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lora_ext, m) {
  m.def("merge_exact_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> (Tensor, Tensor)");
  m.def(
      "unmerge_exact_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale, Tensor index, Tensor value) "
      "-> ()");
}
