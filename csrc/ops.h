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

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                           const std::optional<at::Tensor>& dropout_seed, int64_t strategy);

GradTuple lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                   const std::optional<at::Tensor>& dropout_seed, int64_t strategy,
                                   std::array<bool, 5> output_mask);

void merge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

at::Tensor merged_weight_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                             double scale);

at::Tensor dropout_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p);

// CUDA (csrc/cuda/lora_cuda.cpp; compiled only with LORA_EXT_WITH_CUDA).

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                            const std::optional<at::Tensor>& dropout_seed, int64_t strategy);

GradTuple lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                    const std::optional<at::Tensor>& dropout_seed, int64_t strategy,
                                    std::array<bool, 5> output_mask);

void merge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

at::Tensor merged_weight_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              double scale);

at::Tensor dropout_mask_cuda(const at::Tensor& seed, int64_t rows, int64_t cols, double p);

// The CUDA lora_linear / lora_linear_backward without their checks, on x's device and
// current stream (the NF4 CUDA ops run them on the dequantized weight).
at::Tensor lora_linear_cuda_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                 const std::optional<at::Tensor>& dropout_seed, int64_t strategy);

GradTuple lora_linear_backward_cuda_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                         double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                                         int64_t strategy, std::array<bool, 5> output_mask);

}  // namespace lora_ext
