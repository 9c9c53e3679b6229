// Host-callable launchers of the mixed-adapter kernels (csrc/cuda/mixed.cu), no torch header
// (nvcc never parses torch; see kernels.h). Driven by csrc/cuda/mixed_cuda.cpp.
//
// The rows are grouped by adapter once per call (a stable sort of adapter_index on the device,
// mixed_cuda.cpp): sorted position p holds row perm[p] of adapter sorted[p] (-1: base only), and
// adapter a owns positions [start[a + 1], start[a + 2]). Each launcher below is one pass over
// all rows (or all adapters' factors) for one product; none loops over adapters on the host.
// "Acc" is float, or double for kFloat64. xa and gb are [M, r] Acc buffers in sorted order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels.h"

namespace lora_ext {
namespace cuda {

struct MixedRows {
  const int64_t* perm;    // [M] sorted position -> row of x
  const int64_t* sorted;  // [M] adapter of each sorted position
  const int64_t* start;   // [n + 2] first sorted position of adapter b - 1; start[n + 1] = M
  int64_t M;
  int64_t n;
};

struct MixedFactors {
  const void* A;             // [n, r, K] contiguous, the op's dtype
  const void* B;             // [n, N, r] contiguous
  const double* scale_q;     // [n] scale[a] / (1 - p[a]) (0 for p == 1), on the device
  const int64_t* threshold;  // [n] dropout thresholds (0: no dropout), on the device
  const int64_t* seed;       // the device-side dropout seed, or nullptr without dropout
  int64_t r;
  int64_t N;
  int64_t K;
};

// xa[p, j] = scale_q[a] * sum_k drop_a(x)[row, k] A[a, j, k]   (0 for a == -1)
cudaError_t launch_mixed_shrink(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix x, void* xa,
                                cudaStream_t stream);

// y[row, c] = round(base[row, c] + sum_j xa[p, j] B[a, c, j]); base is an Acc [M, N] row-major buffer
// (x W^T + bias) indexed by row.
cudaError_t launch_mixed_expand(DType dtype, MixedRows rows, MixedFactors f, const void* base, const void* xa, Matrix y,
                                cudaStream_t stream);

// gb[p, j] = sum_c g[row, c] B[a, c, j]   (0 for a == -1)
cudaError_t launch_mixed_gb(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix g, void* gb, cudaStream_t stream);

// grad_x[row, k] = round(gw[row, k] + scale_q[a] keep_a(row, k) sum_j gb[p, j] A[a, j, k]); gw = g W, Acc [M, K].
cudaError_t launch_mixed_grad_x(DType dtype, MixedRows rows, MixedFactors f, const void* gw, const void* gb,
                                Matrix grad_x, cudaStream_t stream);

// grad_A[a, j, k] = round(scale_q[a] sum_{p of a} gb[p, j] drop_a(x)[perm[p], k]), contiguous [n, r, K].
cudaError_t launch_mixed_grad_A(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix x, const void* gb,
                                void* grad_A, cudaStream_t stream);

// grad_B[a, c, j] = round(sum_{p of a} g[perm[p], c] xa[p, j]) (xa carries scale_q), contiguous [n, N, r].
cudaError_t launch_mixed_grad_B(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix g, const void* xa,
                                void* grad_B, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
