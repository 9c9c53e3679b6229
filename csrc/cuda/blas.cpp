// cuBLAS wrapper of the CUDA ops (see blas.h).
#include "blas.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <cublas_v2.h>

#include <algorithm>
#include <climits>

#include "cuda_check.h"

namespace lora_ext {
namespace cuda {
namespace {

cudaDataType_t blas_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kDouble:
      return CUDA_R_64F;
    default:
      TORCH_CHECK_TYPE(false, "lora_ext: no cuBLAS type for ", t);
  }
}

int blas_int(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v >= 0 && v <= INT_MAX, "lora_ext: ", what, " = ", v,
                    " exceeds the 32-bit range of the cuBLAS API used by the CUDA kernels");
  return static_cast<int>(v);
}

bool row_major_ok(const at::Tensor& t) {
  const int64_t R = t.size(0), C = t.size(1);
  return (t.stride(1) == 1 || C <= 1) && (R <= 1 || t.stride(0) >= std::max<int64_t>(C, 1));
}

bool col_major_ok(const at::Tensor& t) {
  const int64_t R = t.size(0), C = t.size(1);
  return (t.stride(0) == 1 || R <= 1) && (C <= 1 || t.stride(1) >= std::max<int64_t>(R, 1));
}

}  // namespace

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

at::Tensor blas_friendly(const at::Tensor& t) { return (row_major_ok(t) || col_major_ok(t)) ? t : t.contiguous(); }

Operand operand(const at::Tensor& t_in) {
  TORCH_INTERNAL_ASSERT(t_in.dim() == 2);
  const at::Tensor t = blas_friendly(t_in);
  const int64_t R = t.size(0), C = t.size(1);
  if (row_major_ok(t)) {
    return {t.data_ptr(), R <= 1 ? std::max<int64_t>(C, 1) : t.stride(0), false, t.scalar_type(), t};
  }
  return {t.data_ptr(), C <= 1 ? std::max<int64_t>(R, 1) : t.stride(1), true, t.scalar_type(), t};
}

// cuBLAS is column-major, so this computes C^T = B^T A^T.
void gemm(int64_t m, int64_t n, int64_t k, double alpha, const Operand& a, const Operand& b, double beta, void* c,
          at::ScalarType c_type, int64_t ldc, cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(a.dtype == b.dtype, "lora_ext: gemm operands of different dtypes");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty inner dimension: C = beta * C
    TORCH_INTERNAL_ASSERT(beta == 0.0 || beta == 1.0);
    if (beta == 0.0) {
      const size_t elem = c10::elementSize(c_type);
      LORA_CUDA_CHECK(cudaMemset2DAsync(c, static_cast<size_t>(ldc) * elem, 0, static_cast<size_t>(n) * elem,
                                        static_cast<size_t>(m), stream));
    }
    return;
  }
  // PyTorch's handle comes bound to the current stream (the `stream` passed here)
  // and to PyTorch's own cuBLAS workspace. Do not call cublasSetStream again: it
  // resets the workspace to cuBLAS's default pool (cuBLAS docs), which breaks
  // CUDA-graph capture and PyTorch's workspace accounting.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_INTERNAL_ASSERT(stream == current_stream(), "lora_ext: cuBLAS calls must run on the current stream");
  const cublasOperation_t op_b = b.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = a.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int im = blas_int(m, "rows"), in = blas_int(n, "columns"), ik = blas_int(k, "inner dimension");
  const int lda = blas_int(a.ld, "leading dimension"), ldb = blas_int(b.ld, "leading dimension");
  const int ldc_i = blas_int(ldc, "leading dimension");
  if (a.dtype == at::kDouble) {
    TORCH_INTERNAL_ASSERT(c_type == at::kDouble);
    const double al = alpha, be = beta;
    LORA_CUBLAS_CHECK(cublasGemmEx(handle, op_b, op_a, in, im, ik, &al, b.ptr, CUDA_R_64F, ldb, a.ptr, CUDA_R_64F, lda,
                                   &be, c, CUDA_R_64F, ldc_i, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT));
  } else {
    // CUBLAS_COMPUTE_32F honours the handle's math mode, so fp32 GEMMs use TF32
    // exactly when torch.backends.cuda.matmul.allow_tf32 says so, like F.linear.
    const float al = static_cast<float>(alpha), be = static_cast<float>(beta);
    LORA_CUBLAS_CHECK(cublasGemmEx(handle, op_b, op_a, in, im, ik, &al, b.ptr, blas_dtype(b.dtype), ldb, a.ptr,
                                   blas_dtype(a.dtype), lda, &be, c, blas_dtype(c_type), ldc_i, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  }
}

void gemm_into(int64_t m, int64_t n, int64_t k, const Operand& a, const Operand& b, double beta, at::Tensor& c,
               cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(c.dim() == 2 && c.size(0) == m && c.size(1) == n && (c.stride(1) == 1 || n <= 1));
  gemm(m, n, k, 1.0, a, b, beta, c.data_ptr(), c.scalar_type(), std::max<int64_t>(c.stride(0), std::max<int64_t>(n, 1)),
       stream);
}

}  // namespace cuda
}  // namespace lora_ext
