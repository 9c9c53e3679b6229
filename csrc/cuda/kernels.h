// Host-callable launchers of the lora_ext CUDA kernels.
//
// This header is shared by the nvcc-compiled .cu files and the g++-compiled
// launcher (lora_cuda.cpp), so it includes no torch/ATen header: nvcc never
// parses torch, which keeps CUDA compiles fast. Every launcher enqueues on the
// given stream and returns cudaGetLastError() (or cudaErrorInvalidValue for a
// grid it cannot express); lora_cuda.cpp turns a failure into a TORCH_CHECK.
//
// Tensors are passed as a data pointer plus element strides (64-bit), so
// non-contiguous, offset and transposed views need no copy. "acc" below is
// the accumulation type: double for kFloat64, float otherwise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../host/dtype.h"

namespace lora_ext {
namespace cuda {

// A read-only 2-D view: element (i, j) lives at data[i * s0 + j * s1].
struct ConstMatrix {
  const void* data;
  int64_t s0;
  int64_t s1;
};

// A writable 2-D view with the same addressing.
struct Matrix {
  void* data;
  int64_t s0;
  int64_t s1;
};

// out[n, k] = round(in[n, k] + scale * sum_j B[n, j] A[j, k]) for an [N, K]
// weight, A [r, K], B [N, r]. `out` may alias `in` (merge_ in place): each
// element is read and written by the same thread. Uses 16-byte vector loads
// and stores when both in and out are row-contiguous and 16-byte aligned with
// K a multiple of the vector width; a strided scalar path otherwise.
cudaError_t launch_merge_lowrank(DType dtype, ConstMatrix in, Matrix out, ConstMatrix A, ConstMatrix B, int64_t N,
                                 int64_t K, int64_t r, double scale, cudaStream_t stream);

// out[i] = dropout_keep(*seed, i, threshold) for i < numel (bool, row-major).
cudaError_t launch_dropout_mask(const int64_t* seed, bool* out, int64_t numel, uint64_t threshold, cudaStream_t stream);

// out[i, k] = in[i, k] * keep(*seed, (row_offset + i) * index_cols + k) for an
// [rows, cols] block (a row chunk of a logical [M, index_cols] tensor). The
// 0/1 factor is a multiply, so NaN/Inf in dropped elements propagate exactly
// as in x * mask (the pure-PyTorch reference and torch's own dropout).
// `out` may alias `in`.
cudaError_t launch_apply_dropout(DType dtype, ConstMatrix in, Matrix out, int64_t rows, int64_t cols,
                                 int64_t row_offset, int64_t index_cols, const int64_t* seed, uint64_t threshold,
                                 cudaStream_t stream);

// Packs a scaled acc-typed low-rank matrix v [rows, r] into the GEMM operand
// out [rows, out_cols] of type `dtype` (row stride ld_out):
//   cols [t*r, (t+1)*r), t < nsplit : split t of scale * v
//   col nsplit*r (if ones_column)   : 1   (multiplies a bias row/column of the other operand)
//   remaining columns                : 0   (alignment padding)
// With nsplit == 2 (fp16/bf16) split 0 is hi = round(scale*v) and split 1 is
// lo = round(scale*v - hi), so hi + lo carries ~16 (bf16) / 22 (fp16) bits of
// the fp32 value: a tensor-core GEMM over [hi | lo] then behaves as if the
// intermediate had stayed in fp32. With nsplit == 1 (fp32/fp64) it is
// scale*v itself.
cudaError_t launch_split_pack(DType dtype, const void* v, int64_t ld_v, int64_t rows, int64_t r, double scale,
                              int nsplit, bool ones_column, void* out, int64_t ld_out, int64_t out_cols,
                              cudaStream_t stream);

// out[i, j] = round(scale * sum_{t < nsplit} p[i*s0 + j*s1 + t*split_stride])
// for an acc-typed partial-product buffer p; out is contiguous [rows, cols].
// Recombines the hi/lo halves produced through launch_split_pack, rounding
// once to `dtype`.
cudaError_t launch_combine_splits(DType dtype, const void* p, int64_t s0, int64_t s1, int64_t split_stride, int nsplit,
                                  int64_t rows, int64_t cols, double scale, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
