// Op schemas of the NF4 (QLoRA) ops, declared once. Device files register
// only implementations (csrc/cpu/nf4_cpu.cpp, csrc/cuda/nf4_cuda.cpp); fake
// kernels and autograd live in lora_ext/ops/nf4.py (one OpDef per op, mirroring
// these strings; tests/test_dispatcher.py checks it), the pure-PyTorch fallback in
// lora_ext/ops/reference.py.
//
//   nf4_quantize(weight, blocksize) -> (packed uint8 [(n+1)/2], absmax fp32 [nblocks])
//   blockwise_quantize_8bit(x, code [256], blocksize) -> (codes uint8 [n], absmax fp32 [nblocks])
//   nf4_dequantize(packed, absmax, nested_absmax?, nested_code?, offset, blocksize,
//                  nested_blocksize, shape, dtype) -> Tensor [shape] in dtype
//   lora_linear_nf4(x [M,K], packed, absmax, nested_absmax?, nested_code?, offset, blocksize,
//                   nested_blocksize, out_features N, bias [N]?, lora_A [r,K], lora_B [N,r],
//                   scale, dropout_p, dropout_seed?) -> y [M,N]
//   lora_linear_nf4_backward(grad_out [M,N], x, <nf4 weight>, out_features, lora_A, lora_B,
//                   scale, dropout_p, dropout_seed?, output_mask bool[4] (x, bias, A, B))
//       -> (grad_x, grad_bias, grad_A, grad_B); an output not asked for is an empty [0] tensor.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lora_ext, m) {
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor, Tensor)");
  m.def("blockwise_quantize_8bit(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
      "int blocksize, int nested_blocksize, int[] shape, ScalarType dtype) -> Tensor");
  m.def(
      "lora_linear_nf4(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, int blocksize, int nested_blocksize, int out_features, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, float scale, float dropout_p, Tensor? dropout_seed) -> Tensor");
  m.def(
      "lora_linear_nf4_backward(Tensor grad_out, Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, float offset, int blocksize, int nested_blocksize, int out_features, Tensor lora_A, "
      "Tensor lora_B, float scale, float dropout_p, Tensor? dropout_seed, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
