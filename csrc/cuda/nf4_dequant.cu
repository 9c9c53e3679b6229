// NF4 dequantization kernels: the transient weight of the fused QLoRA forward
// and backward (nf4_cuda.cpp), and nf4_dequantize on CUDA.
//
// Each thread handles 8 consecutive elements = 4 packed bytes read as one
// 32-bit load when aligned; blocksize >= 32, so the 8 elements share one
// scale. Products are __fmul_rn (no FMA contraction) so the result equals the
// CPU kernels and bitsandbytes' fp32 dequantization bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../nf4_format.h"
#include "nf4_kernels.h"

namespace lora_ext {
namespace nf4_cuda {
namespace {

__constant__ float kCode[16] = {LORA_EXT_NF4_CODE_VALUES};

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_float<double>(float v) {
  return static_cast<double>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales,
                                  int log2_blocksize, int64_t n, T* __restrict__ out) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // 8 elements per group
  const int64_t e0 = group * 8;
  if (e0 >= n) return;
  const float s = scales[e0 >> log2_blocksize];
  if (e0 + 8 <= n && (reinterpret_cast<uintptr_t>(packed + (e0 >> 1)) & 3) == 0) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + (e0 >> 1));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t byte = (word >> (8 * j)) & 0xFF;
      out[e0 + 2 * j] = from_float<T>(__fmul_rn(kCode[byte >> 4], s));
      out[e0 + 2 * j + 1] = from_float<T>(__fmul_rn(kCode[byte & 0xF], s));
    }
    return;
  }
  for (int64_t e = e0; e < n && e < e0 + 8; ++e) {
    out[e] = from_float<T>(__fmul_rn(kCode[nf4::nibble(packed, e)], s));
  }
}

__global__ void resolve_absmax_kernel(const uint8_t* __restrict__ q, const float* __restrict__ nested_absmax,
                                      const float* __restrict__ code, float offset, int64_t nested_blocksize,
                                      int64_t nblocks, float* __restrict__ scales) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= nblocks) return;
  scales[b] = __fadd_rn(__fmul_rn(code[q[b]], nested_absmax[b / nested_blocksize]), offset);
}

constexpr int kThreads = 256;

}  // namespace

cudaError_t launch_dequantize(DType out_type, const uint8_t* packed, const float* scales, int log2_blocksize, int64_t n,
                              void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (log2_blocksize < 3) return cudaErrorInvalidValue;  // 8 elements per thread share one scale
  const int64_t groups = (n + 7) / 8;
  const int64_t grid = (groups + kThreads - 1) / kThreads;
  if (grid > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const dim3 g(static_cast<unsigned>(grid));
  switch (out_type) {
    case DType::kFloat32:
      dequantize_kernel<float><<<g, kThreads, 0, stream>>>(packed, scales, log2_blocksize, n, static_cast<float*>(out));
      break;
    case DType::kFloat64:
      dequantize_kernel<double>
          <<<g, kThreads, 0, stream>>>(packed, scales, log2_blocksize, n, static_cast<double*>(out));
      break;
    case DType::kFloat16:
      dequantize_kernel<__half>
          <<<g, kThreads, 0, stream>>>(packed, scales, log2_blocksize, n, static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      dequantize_kernel<__nv_bfloat16>
          <<<g, kThreads, 0, stream>>>(packed, scales, log2_blocksize, n, static_cast<__nv_bfloat16*>(out));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_resolve_absmax(const uint8_t* q, const float* nested_absmax, const float* code, float offset,
                                  int64_t nested_blocksize, int64_t nblocks, float* scales, cudaStream_t stream) {
  if (nblocks == 0) return cudaSuccess;
  const int64_t grid = (nblocks + kThreads - 1) / kThreads;
  if (grid > 0x7FFFFFFF || nested_blocksize <= 0) return cudaErrorInvalidValue;
  resolve_absmax_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(q, nested_absmax, code, offset,
                                                                              nested_blocksize, nblocks, scales);
  return cudaGetLastError();
}

}  // namespace nf4_cuda
}  // namespace lora_ext
