// Per-dtype numerics for the lora_ext kernels: the accumulation type and the
// one rounding conversion back to storage, plus the DType -> template switch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace lora_ext {
namespace cuda {

template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};

template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

// Bit-exact conversion between a 16-byte vector and its kVec = 16 / sizeof(T)
// elements (no local-memory array round trip, which ptxas would spill).
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, T (&v)[16 / sizeof(T)]);
template <typename T>
__device__ __forceinline__ uint4 pack16(const T (&v)[16 / sizeof(T)]);

template <>
__device__ __forceinline__ void unpack16<float>(const uint4& raw, float (&v)[4]) {
  v[0] = __uint_as_float(raw.x);
  v[1] = __uint_as_float(raw.y);
  v[2] = __uint_as_float(raw.z);
  v[3] = __uint_as_float(raw.w);
}
template <>
__device__ __forceinline__ uint4 pack16<float>(const float (&v)[4]) {
  return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}
template <>
__device__ __forceinline__ void unpack16<double>(const uint4& raw, double (&v)[2]) {
  v[0] = __hiloint2double(static_cast<int>(raw.y), static_cast<int>(raw.x));
  v[1] = __hiloint2double(static_cast<int>(raw.w), static_cast<int>(raw.z));
}
template <>
__device__ __forceinline__ uint4 pack16<double>(const double (&v)[2]) {
  return make_uint4(static_cast<unsigned int>(__double2loint(v[0])), static_cast<unsigned int>(__double2hiint(v[0])),
                    static_cast<unsigned int>(__double2loint(v[1])), static_cast<unsigned int>(__double2hiint(v[1])));
}

template <typename H, H (*FromBits)(unsigned short), unsigned short (*ToBits)(H)>
struct Half16 {
  static __device__ __forceinline__ void unpack(const uint4& raw, H (&v)[8]) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = FromBits(static_cast<unsigned short>(w[i] & 0xffffu));
      v[2 * i + 1] = FromBits(static_cast<unsigned short>(w[i] >> 16));
    }
  }
  static __device__ __forceinline__ uint4 pack(const H (&v)[8]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<unsigned int>(ToBits(v[2 * i])) | (static_cast<unsigned int>(ToBits(v[2 * i + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

__device__ __forceinline__ __half half_from_bits(unsigned short b) { return __ushort_as_half(b); }
__device__ __forceinline__ unsigned short half_to_bits(__half h) { return __half_as_ushort(h); }
__device__ __forceinline__ __nv_bfloat16 bf16_from_bits(unsigned short b) { return __ushort_as_bfloat16(b); }
__device__ __forceinline__ unsigned short bf16_to_bits(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }

template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& raw, __half (&v)[8]) {
  Half16<__half, half_from_bits, half_to_bits>::unpack(raw, v);
}
template <>
__device__ __forceinline__ uint4 pack16<__half>(const __half (&v)[8]) {
  return Half16<__half, half_from_bits, half_to_bits>::pack(v);
}
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& raw, __nv_bfloat16 (&v)[8]) {
  Half16<__nv_bfloat16, bf16_from_bits, bf16_to_bits>::unpack(raw, v);
}
template <>
__device__ __forceinline__ uint4 pack16<__nv_bfloat16>(const __nv_bfloat16 (&v)[8]) {
  return Half16<__nv_bfloat16, bf16_from_bits, bf16_to_bits>::pack(v);
}

// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat64:
      return f(double{});
  }
  return cudaErrorInvalidValue;
}

// Grid size for a grid-stride loop over `work` items: enough blocks to fill
// the GPU several times over, never more than the work needs.
inline unsigned int grid_for(int64_t work, int threads, int64_t max_blocks = 65535) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned int>(blocks);
}

}  // namespace cuda
}  // namespace lora_ext
