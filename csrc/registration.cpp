// Op schemas, declared once. Device files register only their implementations
// (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered from Python
// (lora_ext/ops/dense.py, one OpDef per op, registered by lora_ext/ops/_library.py), which
// also mirrors these schemas for the pure-PyTorch fallback; tests/test_dispatcher.py checks
// that the two agree.
#include <torch/library.h>

TORCH_LIBRARY(lora_ext, m) {
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
      "float dropout_p, Tensor? dropout_seed, int strategy) -> Tensor");
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scale, float dropout_p, Tensor? dropout_seed, int strategy, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lora_linear_xa(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
      "float dropout_p, Tensor? dropout_seed, int strategy) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_backward_xa(Tensor grad_out, Tensor x, Tensor xa, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scale, float dropout_p, Tensor? dropout_seed, int strategy, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()");
  m.def("merged_weight(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  m.def("dropout_mask(Tensor seed, int rows, int cols, float p) -> Tensor");
}
