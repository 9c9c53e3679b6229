// The one dtype enum of the kernel interfaces (csrc/cuda/kernels.h,
// csrc/cuda/nf4_kernels.h). No torch header: nvcc includes it. The host side
// maps at::ScalarType onto it with kernel_dtype() (common.h).
#pragma once

namespace lora_ext {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace lora_ext
