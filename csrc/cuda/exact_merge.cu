// Exact merge / unmerge kernels (csrc/host/exact_merge.h: the per-element function).
//
// One thread per element, grid-stride: d = s * sum_j B[n, j] A[j, k] in fp32 with every product and
// sum rounded on its own (__fmul_rn / __fadd_rn: no contraction into FMA, so the CPU kernel and the
// pure-PyTorch fallback compute the same bits), then the merge and, in the same pass, the check
// whether round(W' - d) gives W back. A and B are tiny and stay in L1/L2; W is read and written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "exact_merge_kernels.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Exact;

template <>
struct Exact<float> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float widen(float v) { return v; }
  static __device__ __forceinline__ float narrow(float v) { return v; }
  static __device__ __forceinline__ Bits bits(float v) { return __float_as_uint(v); }
};

template <>
struct Exact<__half> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half narrow(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ Bits bits(__half v) { return __half_as_ushort(v); }
};

template <>
struct Exact<__nv_bfloat16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ Bits bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};

__device__ __forceinline__ float delta(const float* __restrict__ A, const float* __restrict__ B, int64_t K, int64_t r,
                                       int64_t n, int64_t k, float scale) {
  const float* b = B + n * r;
  float acc = __fmul_rn(b[0], A[k]);
  for (int64_t j = 1; j < r; ++j) acc = __fadd_rn(acc, __fmul_rn(b[j], A[j * K + k]));
  return __fmul_rn(scale, acc);
}

template <typename T>
__global__ void merge_exact_kernel(T* W, const float* __restrict__ A, const float* __restrict__ B, int64_t N, int64_t K,
                                   int64_t r, float scale, int64_t* index, T* value, int64_t capacity,
                                   unsigned long long* count, uint32_t* overflow) {
  using E = Exact<T>;
  const int64_t total = N * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / K, k = e - n * K;
    const float d = delta(A, B, K, r, n, k, scale);
    const T w = W[e];
    const T merged = E::narrow(__fadd_rn(E::widen(w), d));
    const T back = E::narrow(__fsub_rn(E::widen(merged), d));
    if (E::bits(back) != E::bits(w)) {
      const unsigned long long slot = atomicAdd(count, 1ull);
      if (static_cast<int64_t>(slot) >= capacity) {  // no room: leave it unmerged for the overflow pass
        atomicOr(overflow + (e >> 5), 1u << (e & 31));
        continue;
      }
      index[slot] = e;
      value[slot] = w;
    }
    W[e] = merged;
  }
}

template <typename T>
__global__ void merge_exact_overflow_kernel(T* W, const float* __restrict__ A, const float* __restrict__ B, int64_t N,
                                            int64_t K, int64_t r, float scale, int64_t* index, T* value,
                                            unsigned long long* count, const uint32_t* __restrict__ overflow) {
  using E = Exact<T>;
  const int64_t total = N * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!((overflow[e >> 5] >> (e & 31)) & 1u)) continue;
    const int64_t n = e / K, k = e - n * K;
    const float d = delta(A, B, K, r, n, k, scale);
    const T w = W[e];
    const unsigned long long slot = atomicAdd(count, 1ull);
    index[slot] = e;
    value[slot] = w;
    W[e] = E::narrow(__fadd_rn(E::widen(w), d));
  }
}

template <typename T>
__global__ void unmerge_exact_kernel(T* W, const float* __restrict__ A, const float* __restrict__ B, int64_t N,
                                     int64_t K, int64_t r, float scale) {
  using E = Exact<T>;
  const int64_t total = N * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / K, k = e - n * K;
    W[e] = E::narrow(__fsub_rn(E::widen(W[e]), delta(A, B, K, r, n, k, scale)));
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

#define LORA_EXACT_DISPATCH(dtype, CALL) \
  switch (dtype) {                       \
    case DType::kFloat32: {              \
      using T = float;                   \
      CALL;                              \
      break;                             \
    }                                    \
    case DType::kFloat16: {              \
      using T = __half;                  \
      CALL;                              \
      break;                             \
    }                                    \
    case DType::kBFloat16: {             \
      using T = __nv_bfloat16;           \
      CALL;                              \
      break;                             \
    }                                    \
    default:                             \
      return cudaErrorInvalidValue;      \
  }

cudaError_t launch_merge_exact(DType dtype, void* W, const float* A32, const float* B32, int64_t N, int64_t K,
                               int64_t r, float scale, int64_t* index, void* value, int64_t capacity,
                               unsigned long long* count, uint32_t* overflow, cudaStream_t stream) {
  if (N * K == 0) return cudaSuccess;
  LORA_EXACT_DISPATCH(dtype, (merge_exact_kernel<T><<<grid_for(N * K), kThreads, 0, stream>>>(
                                 static_cast<T*>(W), A32, B32, N, K, r, scale, index, static_cast<T*>(value), capacity,
                                 count, overflow)));
  return cudaGetLastError();
}

cudaError_t launch_merge_exact_overflow(DType dtype, void* W, const float* A32, const float* B32, int64_t N, int64_t K,
                                        int64_t r, float scale, int64_t* index, void* value, unsigned long long* count,
                                        const uint32_t* overflow, cudaStream_t stream) {
  if (N * K == 0) return cudaSuccess;
  LORA_EXACT_DISPATCH(
      dtype, (merge_exact_overflow_kernel<T><<<grid_for(N * K), kThreads, 0, stream>>>(
                 static_cast<T*>(W), A32, B32, N, K, r, scale, index, static_cast<T*>(value), count, overflow)));
  return cudaGetLastError();
}

cudaError_t launch_unmerge_exact(DType dtype, void* W, const float* A32, const float* B32, int64_t N, int64_t K,
                                 int64_t r, float scale, cudaStream_t stream) {
  if (N * K == 0) return cudaSuccess;
  LORA_EXACT_DISPATCH(dtype, (unmerge_exact_kernel<T><<<grid_for(N * K), kThreads, 0, stream>>>(static_cast<T*>(W), A32,
                                                                                                B32, N, K, r, scale)));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora_ext
