// CPU ops on the fused low-rank kernels (csrc/cpu/kernels): fp32, bf16 and fp16 with
// rank <= kMaxFusedRank. lora_cpu.cpp hands an op over when fused_cpu_kernels_apply()
// says so (after its input checks) and keeps its ATen path for float64, larger ranks and
// the "aten" variant. The base GEMMs stay ATen/BLAS calls.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "../ops.h"

namespace lora_ext {

bool fused_cpu_kernels_apply(at::ScalarType dtype, int64_t rank);

// Whether the CPU lora_linear of x, weight and a rank-`rank` adapter runs its base GEMMs
// natively in bf16 (cpu::bf16_gemm_native(), csrc/cpu/kernels/lowrank.h): x and weight bf16 and
// the fused kernels in use. The auto strategy then never merges (host/strategy.h).
bool native_bf16_gemm(const at::Tensor& x, const at::Tensor& weight, int64_t rank);

// The CPU lora_linear / lora_linear_backward on the fused kernels (inputs already checked).
// xa_out: also return xa = drop(x) A^T (fp32 [M, r], the 0/1 mask without 1/(1-p)) there
// (lora_linear_xa); xa: that tensor (fp32 [M, r] contiguous), used for grad_B instead of
// recomputing it (lora_linear_backward_xa).
at::Tensor lora_linear_cpu_fused(LORA_EXT_LINEAR_PARAMS, at::Tensor* xa_out = nullptr);
GradTuple lora_linear_backward_cpu_fused(LORA_EXT_LINEAR_BACKWARD_PARAMS, const at::Tensor* xa = nullptr);

// out = weight + scale * lora_B lora_A, accumulated in fp32 and rounded once into out's dtype
// (out may be weight itself: the in-place merge reads and writes W once).
void merged_rows_into_fused(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                            at::Tensor& out);

}  // namespace lora_ext
