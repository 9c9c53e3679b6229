// CUDA implementations of the lora_ext ops (schemas and semantics: ../ops.h).
// Registered for the CUDA dispatch key in lora_cuda.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "../ops.h"

namespace lora_ext {

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                            const std::optional<at::Tensor>& dropout_seed, int64_t strategy);

GradTuple lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                    double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                                    int64_t strategy, std::array<bool, 5> output_mask);

void merge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale);

at::Tensor merged_weight_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              double scale);

at::Tensor dropout_mask_cuda(const at::Tensor& seed, int64_t rows, int64_t cols, double p);

}  // namespace lora_ext
