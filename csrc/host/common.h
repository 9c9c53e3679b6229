// Host helpers shared by the CPU and CUDA implementations: accumulation dtype,
// low-precision test, the kernel dtype enum, row chunking, log2 of a power of
// two, and the device checks of a backend's kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "dtype.h"

namespace lora_ext {

// fp64 inputs accumulate in fp64, everything else in fp32 (docs/design.md, "Numerics").
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType acc_dtype(const at::Tensor& t) { return acc_dtype(t.scalar_type()); }

// fp16 / bf16: widened to fp32 chunk by chunk and rounded once into the output.
inline bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
inline bool is_low_precision(const at::Tensor& t) { return is_low_precision(t.scalar_type()); }

// The kernel interface's dtype of a float tensor (the ops' checks admit only these four).
inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "lora_ext: the kernels support float32, float16, bfloat16 and float64, got ", t);
  }
}

// Rows per chunk of a row-chunked pass over a [M, width] operand: about `budget`
// width-units (elements or bytes, as the caller counts `width`) per chunk, at
// least `min_rows` rows, at most M, at least 1. Each backend picks its budget
// (docs/design.md, "Memory contract").
inline int64_t chunk_rows(int64_t M, int64_t width, int64_t budget, int64_t min_rows) {
  const int64_t rows = budget / std::max<int64_t>(width, 1);
  return std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(rows, min_rows)));
}

// log2 of a power of two (the NF4 blocksizes).
inline int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

// A backend's kernel got a tensor of another device (a device error: TypeError in Python).
inline void check_device(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK_TYPE(t.device().type() == type, "lora_ext: ", name, " must be a ", c10::DeviceTypeName(type),
                   " tensor for the ", c10::DeviceTypeName(type), " kernel, got ", t.device());
}
inline void check_cpu(const at::Tensor& t, const char* name) { check_device(t, c10::DeviceType::CPU, name); }
inline void check_cuda(const at::Tensor& t, const char* name) { check_device(t, c10::DeviceType::CUDA, name); }

}  // namespace lora_ext
