// Op schemas of the mixed-adapter LoRA linear (one adapter, or none, per row), declared once.
// Device files register only implementations (csrc/cpu/mixed_cpu.cpp, csrc/cuda/mixed_cuda.cpp);
// fake kernels and autograd live in lora_ext/ops/mixed.py (one OpDef per op, mirroring these
// strings; tests/test_dispatcher.py checks it), the pure-PyTorch kernels in
// lora_ext/ops/mixed_reference.py.
//
//   lora_linear_mixed(x [M,K], weight [N,K], bias [N]?, lora_A [n,r,K], lora_B [n,N,r], scale float[n],
//                     adapter_index int64 [M] in [-1, n), dropout_p float[n], dropout_seed?) -> y [M,N]
//       y[i] = x[i] W^T + bias + scale[a] * (drop_a(x[i]) A[a]^T) B[a]^T, a = adapter_index[i] (-1: base only)
//   lora_linear_mixed_backward(grad_out [M,N], x, weight, lora_A, lora_B, scale, adapter_index, dropout_p,
//                     dropout_seed?, output_mask bool[4] (x, bias, A, B)) -> (grad_x, grad_bias, grad_A, grad_B)
//       an output not asked for is an empty [0] tensor; the weight is frozen (no gradient).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lora_ext, m) {
  m.def(
      "lora_linear_mixed(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float[] scale, "
      "Tensor adapter_index, float[] dropout_p, Tensor? dropout_seed) -> Tensor");
  m.def(
      "lora_linear_mixed_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float[] scale, Tensor adapter_index, float[] dropout_p, Tensor? dropout_seed, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
