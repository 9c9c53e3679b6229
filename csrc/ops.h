// Host declarations shared by the CPU and CUDA implementations.
//
// Op schemas (namespace lora_ext), declared once in registration.cpp and mirrored
// for the pure-PyTorch fallback in lora_ext/ops/dense.py:
//
//   lora_linear(x [M,K], weight [N,K], bias [N]?, lora_A [r,K], lora_B [N,r],
//               scale, dropout_p, dropout_seed int64[]?, strategy) -> y [M,N]
//       y = x W^T + bias + scale * (drop(x) A^T) B^T
//   lora_linear_backward(grad_out [M,N], x, weight, lora_A, lora_B, scale,
//               dropout_p, dropout_seed?, strategy, output_mask bool[5])
//       -> (grad_x [M,K], grad_weight [N,K], grad_bias [N], grad_A [r,K], grad_B [N,r])
//       output_mask selects (x, weight, bias, lora_A, lora_B); an output that
//       is not asked for is returned as an empty tensor of shape [0].
//   merge_(weight(a!), lora_A, lora_B, scale) -> ()      W += scale * B A
//   merged_weight(weight, lora_A, lora_B, scale) -> W + scale * B A
//   dropout_mask(seed, rows, cols, p) -> bool [rows, cols] (True = kept)
//   lora_linear_xa(same arguments as lora_linear) -> (y, xa [M, r])
//       y as lora_linear; xa = drop01(x) A^T in the accumulation dtype, drop01 the
//       dropout's 0/1 keep mask without the 1/(1-p) factor (all zeros for p = 1)
//   lora_linear_backward_xa(grad_out, x, xa, weight, ...as lora_linear_backward)
//       the gradients of lora_linear_backward, grad_B = scale/(1-p) * grad_out^T xa
//       from the given xa instead of recomputing it from x
//
// Numerics (docs/design.md, "Numerics"): products accumulate in fp32 (fp64 for
// float64 inputs), the low-rank intermediates stay in the accumulation dtype,
// and every output is rounded to its dtype once.
// Checks: each op entry below validates its inputs once (csrc/host/checks.h);
// the *_impl functions trust their inputs and are what other C++ code calls.
// Every backend must register a kernel with the same C++ signature for an op
// (merge_ takes `at::Tensor weight` by value on CPU and CUDA alike): the
// dispatcher aborts the process at library load when two signatures differ.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace lora_ext {

using GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The C++ parameter lists of the dense LoRA ops (their schemas' arguments, in order),
// shared by every backend's declaration below and by the internal variants.
// clang-format off
#define LORA_EXT_LINEAR_PARAMS                                                                                   \
  const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, \
      const at::Tensor& lora_B, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,    \
      int64_t strategy
#define LORA_EXT_LINEAR_BACKWARD_PARAMS                                                                       \
  const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,        \
      const at::Tensor& lora_B, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed, \
      int64_t strategy, std::array<bool, 5> output_mask
#define LORA_EXT_LINEAR_BACKWARD_XA_PARAMS                                                                    \
  const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& xa, const at::Tensor& weight,            \
      const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,                     \
      const std::optional<at::Tensor>& dropout_seed, int64_t strategy, std::array<bool, 5> output_mask
// clang-format on

// The checked op entries of one backend: lora_linear_<backend>, lora_linear_backward_<backend>,
// merge_<backend>, merged_weight_<backend>, dropout_mask_<backend>.
#define LORA_EXT_DECLARE_DENSE_OPS(backend)                                                                        \
  at::Tensor lora_linear_##backend(LORA_EXT_LINEAR_PARAMS);                                                        \
  GradTuple lora_linear_backward_##backend(LORA_EXT_LINEAR_BACKWARD_PARAMS);                                       \
  void merge_##backend(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);      \
  at::Tensor merged_weight_##backend(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, \
                                     double scale);                                                                \
  at::Tensor dropout_mask_##backend(const at::Tensor& seed, int64_t rows, int64_t cols, double p)

// CPU (csrc/cpu/lora_cpu.cpp).
LORA_EXT_DECLARE_DENSE_OPS(cpu);

// The CPU autograd pair that keeps xa = drop(x) A^T from the forward for grad_B (CPU only:
// csrc/autograd.cpp takes it when the forward computes xa anyway).
std::tuple<at::Tensor, at::Tensor> lora_linear_xa_cpu(LORA_EXT_LINEAR_PARAMS);
GradTuple lora_linear_backward_xa_cpu(LORA_EXT_LINEAR_BACKWARD_XA_PARAMS);

// CUDA (csrc/cuda/lora_cuda.cpp; compiled only with LORA_EXT_WITH_CUDA).
LORA_EXT_DECLARE_DENSE_OPS(cuda);

// The CUDA lora_linear / lora_linear_backward without their checks, on x's device and
// current stream (the NF4 CUDA ops run them on the dequantized weight).
at::Tensor lora_linear_cuda_impl(LORA_EXT_LINEAR_PARAMS);
GradTuple lora_linear_backward_cuda_impl(LORA_EXT_LINEAR_BACKWARD_PARAMS);

}  // namespace lora_ext
