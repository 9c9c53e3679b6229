// Cost model that picks how the low-rank branch is applied (DESIGN.md §2).
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
// Forward picks merge when 3*N*K*weff_size < (M*K + 2*M*N)*elem_size.
// Backward (grad_x = g W + s * (g B) A): shrink/expand re-reads and re-writes
// grad_x (2*M*K elements) while merge pays the same 3*N*K words, so it picks
// merge when 3*N*K*weff_size < 2*M*K*elem_size. In both cases the low-rank
// grads (grad_A, grad_B) are computed from one row-chunked pass over g and x.
#pragma once

#include <cstdint>

namespace lora_ext {

// Values of the `strategy` argument of the ops.
enum Strategy : int64_t { kAuto = 0, kShrinkExpand = 1, kMerge = 2 };

inline bool use_merge_forward(int64_t strategy, int64_t M, int64_t N, int64_t K, int64_t elem_size,
                              double dropout_p, int64_t weff_size = 4) {
  if (dropout_p > 0.0) return false;
  if (strategy == kShrinkExpand) return false;
  if (strategy == kMerge) return true;
  const double merge_bytes = 3.0 * double(N) * double(K) * double(weff_size);
  const double shrink_bytes = (double(M) * double(K) + 2.0 * double(M) * double(N)) * double(elem_size);
  return merge_bytes < shrink_bytes;
}

inline bool use_merge_backward(int64_t strategy, int64_t M, int64_t N, int64_t K, int64_t elem_size,
                               double dropout_p, int64_t weff_size = 4) {
  if (dropout_p > 0.0) return false;
  if (strategy == kShrinkExpand) return false;
  if (strategy == kMerge) return true;
  const double merge_bytes = 3.0 * double(N) * double(K) * double(weff_size);
  const double shrink_bytes = 2.0 * double(M) * double(K) * double(elem_size);
  return merge_bytes < shrink_bytes;
}

}  // namespace lora_ext
