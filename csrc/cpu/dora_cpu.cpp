// CPU registration of the DoRA ops (schemas: csrc/dora_bindings.cpp): the checked
// entries over the shared ATen routine of csrc/host/dora_impl.h, with the CPU
// dropout mask of csrc/cpu/lowrank_aten.h.
#include <torch/library.h>

#include "../host/dora_impl.h"
#include "lowrank_aten.h"

namespace lora_ext {
namespace {

using at::Tensor;

dora::Dropper cpu_dropper(const DropoutParams& drop) {
  return [&drop](const Tensor& x_c, int64_t row0) { return cpu::dropped(x_c, x_c.scalar_type(), row0, drop); };
}

Tensor dora_weight_norm_cpu(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale,
                            const std::optional<Tensor>& weight_sq_norm) {
  dora::check_weight_norm(weight, lora_A, lora_B, scale, weight_sq_norm);
  check_cpu(weight, "weight");
  return dora::weight_norm_impl(weight, lora_A, lora_B, scale, weight_sq_norm);
}

Tensor dora_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                       const Tensor& lora_B, const Tensor& magnitude, const Tensor& weight_norm, double scale,
                       double dropout_p, const std::optional<Tensor>& dropout_seed) {
  dora::check_dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed);
  check_cpu(x, "x");
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  return dora::forward_impl(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, drop, cpu_dropper(drop));
}

dora::DoraGrads dora_linear_backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                         const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
                                         const Tensor& weight_norm, double scale, double dropout_p,
                                         const std::optional<Tensor>& dropout_seed, std::array<bool, 6> output_mask) {
  dora::check_dora_linear(x, weight, std::nullopt, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p,
                          dropout_seed);
  check_grad_out(grad_out, x, weight.size(0));
  check_cpu(x, "x");
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  return dora::backward_impl(grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, scale, drop,
                             cpu_dropper(drop), output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("dora_weight_norm", &dora_weight_norm_cpu);
  m.impl("dora_linear", &dora_linear_cpu);
  m.impl("dora_linear_backward", &dora_linear_backward_cpu);
}

}  // namespace lora_ext
