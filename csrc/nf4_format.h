// NF4 storage format shared by the CPU kernels, the CUDA kernels and the host
// launchers (no torch header: nvcc includes it).
//
// bitsandbytes' layout: a weight [N, K] is flattened row-major and cut into
// blocks of `blocksize` elements (the last may be shorter). Element e has the
// 4-bit code in byte e / 2 (high nibble for even e) and the scale
// absmax[e / blocksize]. Value = kNF4Code[code] * absmax, in fp32, rounded once
// to the output dtype. With double quantization the fp32 scale of block b is
// dyn[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset (two fp32
// roundings, no FMA).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NF4_HD __host__ __device__ __forceinline__
#else
#define NF4_HD inline
#endif

// bitsandbytes get_4bit_type("nf4"), ascending (lora_ext/ops/reference.py NF4_CODE_VALUES); a macro so the
// CUDA __constant__ table is initialised from the same literals.
#define LORA_EXT_NF4_CODE_VALUES                                                                      \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,    \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, \
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f

namespace lora_ext {
namespace nf4 {

constexpr float kNF4Code[16] = {LORA_EXT_NF4_CODE_VALUES};

constexpr int64_t kLUTSize = 65536;  // bitsandbytes' CPU 8-bit quantization table

NF4_HD bool is_supported_blocksize(int64_t bs) {
  return bs == 32 || bs == 64 || bs == 128 || bs == 256 || bs == 512 || bs == 1024 || bs == 2048 || bs == 4096;
}

NF4_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The 4-bit code of flat element e.
NF4_HD int nibble(const uint8_t* packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

}  // namespace nf4
}  // namespace lora_ext
