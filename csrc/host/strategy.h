// Cost model that picks how the low-rank branch is applied (docs/design.md,
// "Cost model"). resolve_strategy() is the one place the choice is made: the
// CPU and CUDA kernels call it, and so does the pybind strategy_plan that
// lora_ext.strategy_plan reports (csrc/bindings.cpp).
//
// Both strategies compute the same function; they differ in which extra bytes
// they move on top of the frozen base GEMM:
//
//   shrink/expand : xa = drop(x) A^T (one more read of x, M*K elements), then
//                   y += s * xa B^T inside a GEMM with beta = 1 (one read and
//                   one write of y, 2*M*N elements).
//   merge on fly  : W_eff = W + s * B A in a transient buffer (read W, write
//                   and re-read W_eff: about 3*N*K words of W_eff's dtype),
//                   then a single GEMM. Independent of M. Not possible with
//                   dropout, whose mask applies to x on the LoRA branch only.
//                   The CPU kernels keep W_eff in fp32 (weff_size = 4); the
//                   CUDA kernels round it to the weight dtype, which cuBLAS
//                   needs for a tensor-core GEMM (weff_size = elem_size).
//
// Forward picks merge when c_fwd*N*K*weff_size < (M*K + 2*M*N)*elem_size.
// Backward (grad_x = g W + s * (g B) A): shrink/expand re-reads and re-writes
// grad_x (2*M*K elements) while merge pays about the same words of W_eff, so it
// picks merge when c_bwd*N*K*weff_size < 2*M*K*elem_size. In both cases the
// low-rank grads (grad_A, grad_B) are computed from one row-chunked pass over g and x.
//
// c_fwd = c_bwd = 3 is the byte count above. On the CPU the constants were set
// from a sweep of both strategies (python -m benchmarks.bench_cpu_kernels --strategy,
// BENCHMARKS.md, 2026-12-02, AVX-512 and forced AVX2, fp32, K = N = 1024 and 4096,
// M = 128 .. 8192): the forward's measured crossover is where c_fwd = 3 puts it
// (M = K at K = N, merge / shrink_expand 0.97 - 1.00 there), the backward's lies
// later than 3 predicts (merge 0.4 - 1.0 % slower at M = 2 N, faster from 3 N on, on
// both capabilities), so the CPU backward takes c_bwd = 4.5 (merge from M > 2.25 N).
// CUDA keeps 3 for both: no GPU measurement yet.
//
// native_lowp_gemm: the CPU runs the bf16 base GEMMs natively (cpu::bf16_gemm_native(), AMX):
// then auto never merges, since the merged W_eff (fp32, see weff_size) would take the fp32 GEMM,
// about 4x slower than the native bf16 one, and a W_eff rounded to bf16 would lose the part of
// s B A below half a step of W. A forced merge still merges (on the fp32 way).
#pragma once

#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace lora_ext {

// Values of the `strategy` argument of the ops (checked by check_strategy, host/checks.h).
enum Strategy : int64_t { kAuto = 0, kShrinkExpand = 1, kMerge = 2 };

struct StrategyPlan {
  bool merge_forward = false;
  bool merge_backward = false;
};

// Words of W_eff the merge strategy is charged (see the comment at the top).
inline double merge_words_forward(c10::DeviceType) { return 3.0; }
inline double merge_words_backward(c10::DeviceType device) { return device == c10::DeviceType::CUDA ? 3.0 : 4.5; }

// Bytes per element of the transient merged weight on `device`.
inline int64_t weff_size(c10::DeviceType device, int64_t elem_size) {
  return device == c10::DeviceType::CUDA ? elem_size : 4;
}

// The strategy the kernels of `device` take for x [M, K], weight [N, K] of
// `elem_size`-byte elements. `requested` was validated by the op's checks.
inline StrategyPlan resolve_strategy(c10::DeviceType device, int64_t M, int64_t N, int64_t K, int64_t elem_size,
                                     double dropout_p, int64_t requested, bool native_lowp_gemm = false) {
  TORCH_INTERNAL_ASSERT(requested >= kAuto && requested <= kMerge, "lora_ext: unchecked strategy ", requested);
  StrategyPlan plan;
  if (dropout_p > 0.0 || requested == kShrinkExpand) return plan;
  if (requested == kMerge) return {true, true};
  if (native_lowp_gemm) return plan;
  const double weff_bytes = double(N) * double(K) * double(weff_size(device, elem_size));
  const double fwd_shrink_bytes = (double(M) * double(K) + 2.0 * double(M) * double(N)) * double(elem_size);
  const double bwd_shrink_bytes = 2.0 * double(M) * double(K) * double(elem_size);
  plan.merge_forward = merge_words_forward(device) * weff_bytes < fwd_shrink_bytes;
  plan.merge_backward = merge_words_backward(device) * weff_bytes < bwd_shrink_bytes;
  return plan;
}

}  // namespace lora_ext
