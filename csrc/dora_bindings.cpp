// Op schemas of the DoRA ops, declared once. Device files register only implementations
// (csrc/cpu/dora_cpu.cpp, csrc/cuda/dora_cuda.cpp, both on the shared ATen routine of
// csrc/host/dora_impl.h); fake kernels, autograd and the pure-PyTorch fallback live in
// lora_ext/ops/dora.py (one OpDef per op, mirroring these strings; tests/test_dispatcher.py
// checks it). The math is docs/design.md, "DoRA".
//
//   dora_weight_norm(weight [N,K], lora_A [r,K], lora_B [N,r], scale, weight_sq_norm [N]?)
//       -> ||w_n + scale b_n A|| [N] in the accumulation dtype, from W A^T [N,r] and A A^T [r,r]
//   dora_linear(x [M,K], weight, bias [N]?, lora_A, lora_B, magnitude [N], weight_norm [N],
//               scale, dropout_p, dropout_seed?) -> y [M,N]
//   dora_linear_backward(grad_out [M,N], x, weight, lora_A, lora_B, magnitude, weight_norm,
//               scale, dropout_p, dropout_seed?, output_mask bool[6] (x, weight, bias, A, B, magnitude))
//       -> (grad_x, grad_weight, grad_bias, grad_A, grad_B, grad_magnitude); an output not asked
//          for is an empty [0] tensor.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lora_ext, m) {
  m.def("dora_weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scale, Tensor? weight_sq_norm) -> Tensor");
  m.def(
      "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
      "Tensor weight_norm, float scale, float dropout_p, Tensor? dropout_seed) -> Tensor");
  m.def(
      "dora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_norm, float scale, float dropout_p, Tensor? dropout_seed, "
      "bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
