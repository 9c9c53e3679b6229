// The cuBLAS layer of the CUDA ops: PyTorch's handle and current stream, 2-D
// operands described as cuBLAS sees them, and a checked GEMM with fp32 (fp64
// for double) accumulation. Used by lora_cuda.cpp (and through its *_impl
// functions by nf4_cuda.cpp). Host code only.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lora_ext {
namespace cuda {

// PyTorch's current stream on the current device: every kernel and GEMM runs there.
cudaStream_t current_stream();

// A logical [rows, cols] matrix as cuBLAS sees it: element (i, j) at
// ptr[i*ld + j] (row-major) or ptr[j*ld + i] (trans, i.e. column-major).
// Any view with one unit stride (offset views, row slices, transposes) is used
// in place; anything else is copied once (`hold` keeps the copy alive).
struct Operand {
  const void* ptr;
  int64_t ld;
  bool trans;
  at::ScalarType dtype;
  at::Tensor hold;

  Operand t() const { return {ptr, ld, !trans, dtype, hold}; }
};

// t itself when cuBLAS can read it in place, else a contiguous copy (for
// example an expanded, stride-0 grad_out). Done once per op, before chunking.
at::Tensor blas_friendly(const at::Tensor& t);

Operand operand(const at::Tensor& t);

// C[m, n] (row-major, leading dimension ldc, type c_type) = alpha * A[m, k] B[k, n] + beta * C,
// accumulated in fp32 (fp64 for double inputs) on `stream`, which must be the current stream
// (PyTorch's cuBLAS handle is bound to it). An empty inner dimension gives C = beta * C.
void gemm(int64_t m, int64_t n, int64_t k, double alpha, const Operand& a, const Operand& b, double beta, void* c,
          at::ScalarType c_type, int64_t ldc, cudaStream_t stream);

// gemm into the [m, n] tensor c (unit column stride) with alpha = 1.
void gemm_into(int64_t m, int64_t n, int64_t k, const Operand& a, const Operand& b, double beta, at::Tensor& c,
               cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
