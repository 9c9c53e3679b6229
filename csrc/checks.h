// Named input checks shared by the CPU and CUDA launchers. Every message names
// the tensor and shows the shapes involved, so a bad call is easy to fix.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

namespace lora_ext {

inline std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "lora_ext: ", name, " must be float32, float16, bfloat16 or float64, got ", dt);
}

inline void check_same_dtype_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                    const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "lora_ext: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), "lora_ext: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on one device");
}

inline void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale), "lora_ext: scale must be finite, got ", scale);
}

// weight [N, K], lora_A [r, K], lora_B [N, r]
inline void check_adapter(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(weight.dim() == 2, "lora_ext: weight must be 2-D [N, K], got shape ", shape_str(weight));
  TORCH_CHECK(lora_A.dim() == 2, "lora_ext: lora_A must be 2-D [r, K], got shape ", shape_str(lora_A));
  TORCH_CHECK(lora_B.dim() == 2, "lora_ext: lora_B must be 2-D [N, r], got shape ", shape_str(lora_B));
  check_float_dtype(weight, "weight");
  check_same_dtype_device(weight, "weight", lora_A, "lora_A");
  check_same_dtype_device(weight, "weight", lora_B, "lora_B");
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(r > 0, "lora_ext: rank must be positive, got lora_A of shape ", shape_str(lora_A));
  TORCH_CHECK(lora_A.size(1) == K, "lora_ext: lora_A must be [r, K] with K = ", K, " (weight is ",
              shape_str(weight), "), got lora_A of shape ", shape_str(lora_A));
  TORCH_CHECK(lora_B.size(0) == N && lora_B.size(1) == r, "lora_ext: lora_B must be [N, r] = [", N, ", ", r,
              "] (weight is ", shape_str(weight), ", lora_A is ", shape_str(lora_A), "), got lora_B of shape ",
              shape_str(lora_B));
}

// x [M, K] plus the adapter, bias [N] or none, dropout settings.
inline void check_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                              const std::optional<at::Tensor>& dropout_seed, int64_t strategy) {
  check_adapter(weight, lora_A, lora_B);
  TORCH_CHECK(x.dim() == 2, "lora_ext: x must be 2-D [M, K] at the op level, got shape ", shape_str(x));
  check_same_dtype_device(weight, "weight", x, "x");
  TORCH_CHECK(x.size(1) == weight.size(1), "lora_ext: x has K = ", x.size(1), " (shape ", shape_str(x),
              ") but weight is [N, K] = ", shape_str(weight));
  if (bias.has_value() && bias->defined()) {
    check_same_dtype_device(weight, "weight", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "lora_ext: bias must be [N] = [",
                weight.size(0), "], got shape ", shape_str(*bias));
  }
  check_scale(scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "lora_ext: dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(dropout_seed.has_value() && dropout_seed->defined(),
                "lora_ext: dropout_p > 0 needs a dropout_seed tensor");
    TORCH_CHECK(dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
                "lora_ext: dropout_seed must be a one-element int64 tensor, got shape ", shape_str(*dropout_seed),
                " and dtype ", dropout_seed->scalar_type());
    TORCH_CHECK(dropout_seed->device() == x.device(), "lora_ext: dropout_seed is on ", dropout_seed->device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK(strategy >= 0 && strategy <= 2, "lora_ext: strategy must be 0 (auto), 1 (shrink_expand) or 2 (merge), got ",
              strategy);
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0),
              "lora_ext: grad_out must be [M, N] = [", x.size(0), ", ", weight.size(0), "], got shape ",
              shape_str(grad_out));
  check_same_dtype_device(x, "x", grad_out, "grad_out");
}

}  // namespace lora_ext
