// Exact merge / unmerge (lora_ext/ops/exact_merge.py): checks shared by the CPU and CUDA entries.
//
//   merge_exact_(weight(a!) [N,K], lora_A [r,K], lora_B [N,r], scale) -> (index [E], value [E])
//   unmerge_exact_(weight(a!), lora_A, lora_B, scale, index [E], value [E]) -> ()
//
// The per-element function every path computes, bit for bit (fp32, no fused multiply-add):
//   acc = B[n,0] A[0,k];  acc = acc + B[n,j] A[j,k] for j = 1 .. r-1 (each product and sum rounded)
//   d   = float(scale) * acc
//   merge:   W'[n,k] = round_T(W[n,k] + d)
//   unmerge: W[n,k]  = round_T(W'[n,k] - d)
// The merge records, sorted by flat index n*K + k, every element whose unmerge would not give its
// original bits back (index int32, or int64 when N*K >= 2^31; the original value in W's dtype);
// unmerge writes those originals back after its pass.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#include "checks.h"

namespace lora_ext {

inline void check_exact_weight(const at::Tensor& weight) {
  const auto dt = weight.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "lora_ext: exact merge takes float32, float16 or bfloat16 weights, got weight of dtype ",
                   dtype_str(dt), " (use merge_ without a record)");
}

// check_adapter, except that the factors may also be float32 (the kernels compute in fp32).
inline void check_exact_adapter(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_float_dtype(weight, "weight");
  check_float_dtype(lora_A, "lora_A");
  if (lora_A.scalar_type() == at::kFloat && weight.scalar_type() != at::kFloat) {
    // the shape checks on a free fp32 stand-in for weight
    check_adapter(at::empty({}, weight.options().dtype(at::kFloat)).expand(weight.sizes()), lora_A, lora_B);
  } else {
    check_adapter(weight, lora_A, lora_B);
  }
  check_exact_weight(weight);
}

inline at::ScalarType exact_index_dtype(int64_t numel) {
  return numel > std::numeric_limits<int32_t>::max() ? at::kLong : at::kInt;
}

inline void check_merge_record(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& value) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
                   "lora_ext: merge record index must be int32 or int64, got ", dtype_str(index.scalar_type()));
  TORCH_CHECK_TYPE(value.scalar_type() == weight.scalar_type(),
                   "lora_ext: merge record value must have weight's dtype ", dtype_str(weight.scalar_type()), ", got ",
                   dtype_str(value.scalar_type()));
  TORCH_CHECK_TYPE(index.device() == weight.device() && value.device() == weight.device(),
                   "lora_ext: merge record index and value must be on weight's device ", weight.device(), ", got ",
                   index.device(), " and ", value.device());
  TORCH_CHECK_VALUE(index.dim() == 1 && value.dim() == 1 && index.size(0) == value.size(0),
                    "lora_ext: merge record index and value must be 1-D of one length, got shapes ", shape_str(index),
                    " and ", shape_str(value));
  if (index.numel() > 0) {
    const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < weight.numel(), "lora_ext: merge record index must lie in [0, ", weight.numel(),
                      ") for weight of shape ", shape_str(weight), ", got values in [", lo, ", ", hi, "]");
  }
}

}  // namespace lora_ext
