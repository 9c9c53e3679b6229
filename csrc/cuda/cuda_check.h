// CUDA runtime / cuBLAS status -> TORCH_CHECK with the failing call, its
// location and the library's own description. Host code only (lora_cuda.cpp).
#pragma once

#include <c10/util/Exception.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#define LORA_CUDA_CHECK(expr)                                                                         \
  do {                                                                                                \
    const cudaError_t lora_err_ = (expr);                                                             \
    TORCH_CHECK(lora_err_ == cudaSuccess, "lora_ext: CUDA error ", cudaGetErrorName(lora_err_), " (", \
                cudaGetErrorString(lora_err_), ") from `", #expr, "` at ", __FILE__, ":", __LINE__);  \
  } while (0)

#define LORA_CUBLAS_CHECK(expr)                                                                                    \
  do {                                                                                                             \
    const cublasStatus_t lora_st_ = (expr);                                                                        \
    TORCH_CHECK(lora_st_ == CUBLAS_STATUS_SUCCESS, "lora_ext: cuBLAS error ", cublasGetStatusName(lora_st_), " (", \
                cublasGetStatusString(lora_st_), ") from `", #expr, "` at ", __FILE__, ":", __LINE__);             \
  } while (0)
