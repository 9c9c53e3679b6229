// The mixed-adapter op (csrc/mixed_registration.cpp): its C++ parameter lists, named checks
// (the contract of lora_ext/ops/mixed_reference.py check_mixed, same order and messages) and the
// per-adapter dropout parameters. Shared by the CPU and CUDA entries.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../dropout_hash.h"
#include "checks.h"

namespace lora_ext {

using MixedGradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// clang-format off
#define LORA_EXT_MIXED_PARAMS                                                                                    \
  const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, \
      const at::Tensor& lora_B, c10::ArrayRef<double> scale, const at::Tensor& adapter_index,                    \
      c10::ArrayRef<double> dropout_p, const std::optional<at::Tensor>& dropout_seed
#define LORA_EXT_MIXED_BACKWARD_PARAMS                                                                            \
  const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,           \
      const at::Tensor& lora_B, c10::ArrayRef<double> scale, const at::Tensor& adapter_index,                    \
      c10::ArrayRef<double> dropout_p, const std::optional<at::Tensor>& dropout_seed, std::array<bool, 4> output_mask
// clang-format on

at::Tensor lora_linear_mixed_cpu(LORA_EXT_MIXED_PARAMS);
MixedGradTuple lora_linear_mixed_backward_cpu(LORA_EXT_MIXED_BACKWARD_PARAMS);
at::Tensor lora_linear_mixed_cuda(LORA_EXT_MIXED_PARAMS);
MixedGradTuple lora_linear_mixed_backward_cuda(LORA_EXT_MIXED_BACKWARD_PARAMS);

// adapter_index: int64 [M] on x's device with values in [-1, n) (reads the values: a host sync on CUDA).
inline void check_adapter_index(const at::Tensor& adapter_index, int64_t M, int64_t n, const at::Tensor& x) {
  TORCH_CHECK_TYPE(adapter_index.scalar_type() == at::kLong, "lora_ext: adapter_index must be int64, got ",
                   dtype_str(adapter_index.scalar_type()));
  TORCH_CHECK_TYPE(adapter_index.device() == x.device(), "lora_ext: adapter_index is on ", adapter_index.device(),
                   " but x is on ", x.device());
  TORCH_CHECK_VALUE(adapter_index.dim() == 1 && adapter_index.size(0) == M, "lora_ext: adapter_index must be [M] = [",
                    M, "] (one entry per row of x), got shape ", shape_str(adapter_index));
  if (M == 0) return;
  const at::Tensor bad = at::logical_or(adapter_index.lt(-1), adapter_index.ge(n));
  if (bad.any().item<bool>()) {
    const int64_t value = adapter_index.masked_select(bad)[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "lora_ext: adapter_index values must be in [-1, ", n, ") (-1 = base only, ", n,
                      " adapters), got ", value);
  }
}

inline void check_lora_linear_mixed(LORA_EXT_MIXED_PARAMS) {
  check_float_dtype(x, "x");
  check_float_dtype(weight, "weight");
  check_float_dtype(lora_A, "lora_A");
  check_float_dtype(lora_B, "lora_B");
  TORCH_CHECK_VALUE(x.dim() == 2, "lora_ext: x must be 2-D [M, K] at the op level, got shape ", shape_str(x));
  TORCH_CHECK_VALUE(weight.dim() == 2, "lora_ext: weight must be 2-D [N, K], got shape ", shape_str(weight));
  TORCH_CHECK_VALUE(lora_A.dim() == 3, "lora_ext: lora_A must be 3-D [n_adapters, r, K], got shape ",
                    shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_B.dim() == 3, "lora_ext: lora_B must be 3-D [n_adapters, N, r], got shape ",
                    shape_str(lora_B));
  check_same_dtype_device(weight, "weight", x, "x");
  check_same_dtype_device(weight, "weight", lora_A, "lora_A");
  check_same_dtype_device(weight, "weight", lora_B, "lora_B");
  const int64_t N = weight.size(0), K = weight.size(1), n = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK_VALUE(n > 0 && r > 0, "lora_ext: lora_A must hold at least one adapter of positive rank, got shape ",
                    shape_str(lora_A));
  TORCH_CHECK_VALUE(x.size(1) == K, "lora_ext: x has K = ", x.size(1), " (shape ", shape_str(x),
                    ") but weight is [N, K] = ", shape_str(weight));
  TORCH_CHECK_VALUE(lora_A.size(2) == K, "lora_ext: lora_A must be [n_adapters, r, K] with K = ", K, " (weight is ",
                    shape_str(weight), "), got shape ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_B.size(0) == n && lora_B.size(1) == N && lora_B.size(2) == r,
                    "lora_ext: lora_B must be [n_adapters, N, r] = [", n, ", ", N, ", ", r, "] (weight is ",
                    shape_str(weight), ", lora_A is ", shape_str(lora_A), "), got shape ", shape_str(lora_B));
  if (has_tensor(bias)) {
    check_float_dtype(*bias, "bias");
    check_same_dtype_device(weight, "weight", *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "lora_ext: bias must be [N] = [", N, "], got shape ",
                      shape_str(*bias));
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(scale.size()) == n, "lora_ext: scale must hold one value per adapter (", n,
                    "), got ", scale.size());
  for (double s : scale) TORCH_CHECK_VALUE(std::isfinite(s), "lora_ext: scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(static_cast<int64_t>(dropout_p.size()) == n,
                    "lora_ext: dropout_p must hold one value per adapter (", n, "), got ", dropout_p.size());
  double p_max = 0.0;
  for (double p : dropout_p) {
    TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "lora_ext: dropout_p must be in [0, 1], got ", dropout_p);
    p_max = std::max(p_max, p);
  }
  check_dropout_seed(p_max, dropout_seed, x);
  check_adapter_index(adapter_index, x.size(0), n, x);
}

inline void check_mixed_grad_out(const at::Tensor& grad_out, const at::Tensor& x, int64_t N) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == N,
                    "lora_ext: grad_out must be [M, N] = [", x.size(0), ", ", N, "], got shape ", shape_str(grad_out));
  check_same_dtype_device(x, "x", grad_out, "grad_out");
}

// Per-adapter dropout: threshold and 1/(1-p) factor (0 for p == 1), as make_dropout for one adapter.
struct MixedDropout {
  std::vector<uint64_t> threshold;
  std::vector<double> factor;
  bool on = false;
};

inline MixedDropout make_mixed_dropout(c10::ArrayRef<double> dropout_p) {
  MixedDropout d;
  for (double p : dropout_p) {
    d.threshold.push_back(dropout_threshold(p));
    d.factor.push_back(p >= 1.0 ? 0.0 : (p > 0.0 ? 1.0 / (1.0 - p) : 1.0));
    d.on = d.on || p > 0.0;
  }
  return d;
}

}  // namespace lora_ext
