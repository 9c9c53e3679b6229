// The checked entries of the NF4 dequantize and LoRA ops, one template for every device: check the
// device of x, gather the storage arguments into NF4Params once, validate once, then
// call the device's unchecked implementation. Each backend registers
//   lora_linear_nf4_entry<Device, &its_forward> and lora_linear_nf4_backward_entry<Device, &its_backward>
// where
//   Tensor its_forward(x, const NF4Params&, bias, lora_A, lora_B, scale, dropout_p, dropout_seed)
//   NF4GradTuple its_backward(grad_out, x, const NF4Params&, lora_A, lora_B, scale, dropout_p,
//                             dropout_seed, std::array<bool, 4> mask)
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "checks.h"
#include "common.h"
#include "nf4_params.h"

namespace lora_ext {

// nf4_dequantize: Dequantize(const NF4Params&, shape, dtype) after the checks.
template <c10::DeviceType Device, auto Dequantize>
at::Tensor nf4_dequantize_entry(const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  check_device(packed, Device, "packed");
  check_nf4_shape(shape);
  const NF4Params w =
      nf4_params(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape[0], shape[1]);
  check_nf4_storage(w);
  check_nf4_out_dtype(dtype);
  return Dequantize(w, shape, dtype);
}

template <c10::DeviceType Device, auto Forward>
at::Tensor lora_linear_nf4_entry(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                 int64_t nested_blocksize, int64_t out_features, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                 const std::optional<at::Tensor>& dropout_seed) {
  check_device(x, Device, "x");
  const NF4Params w = nf4_params(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                 out_features, x.dim() == 2 ? x.size(1) : 0);
  check_nf4_lora(x, w, bias, lora_A, lora_B, scale, dropout_p, dropout_seed);
  return Forward(x, w, bias, lora_A, lora_B, scale, dropout_p, dropout_seed);
}

template <c10::DeviceType Device, auto Backward>
NF4GradTuple lora_linear_nf4_backward_entry(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed,
                                            const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                            const std::optional<at::Tensor>& nested_code, double offset,
                                            int64_t blocksize, int64_t nested_blocksize, int64_t out_features,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                            double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                                            std::array<bool, 4> mask) {
  check_device(x, Device, "x");
  const NF4Params w = nf4_params(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                 out_features, x.dim() == 2 ? x.size(1) : 0);
  check_nf4_lora(x, w, std::nullopt, lora_A, lora_B, scale, dropout_p, dropout_seed);
  check_grad_out(grad_out, x, out_features);
  return Backward(grad_out, x, w, lora_A, lora_B, scale, dropout_p, dropout_seed, mask);
}

}  // namespace lora_ext
