// Counter-based dropout mask shared by the CPU, CUDA and pure-PyTorch paths.
//
// The keep/drop decision for element (m, k) of the logical [M, K] LoRA-branch
// input is a pure function of (seed, m*K + k, p). Nothing is stored between
// forward and backward: the backward regenerates the mask from the seed, and
// every implementation (C++, CUDA, lora_ext/ops/reference.py) produces the same
// bits, so the paths can be compared exactly even with dropout on.
//
//   hash32(v): v ^= v >> 16; v *= 0x7feb352d; v ^= v >> 15; v *= 0x846ca68b; v ^= v >> 16
//   h    = hash32(i_lo ^ hash32(s_lo ^ hash32(i_hi ^ s_hi)))
//   keep = h >= threshold(p),  threshold(p) = floor(p * 2^32) (2^32 for p == 1: drop all)
//
// with s_lo/s_hi the low/high 32 bits of the int64 seed and i_lo/i_hi those of
// the int64 element index.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD inline
#endif

namespace lora_ext {

// The 32-bit mixer; T is uint32_t, or a vector of them whose operators act lane by lane
// (the portable CPU kernel's GCC vector type), so every path computes the same bits.
template <class T>
LORA_HD T dropout_hash32(T v) {
  v ^= v >> 16;
  v *= 0x7feb352dU;
  v ^= v >> 15;
  v *= 0x846ca68bU;
  v ^= v >> 16;
  return v;
}

// Threshold for keep = (hash >= threshold). p is the drop probability in [0, 1].
LORA_HD uint64_t dropout_threshold(double p) {
  if (p <= 0.0) return 0;
  if (p >= 1.0) return uint64_t(1) << 32;
  return static_cast<uint64_t>(p * 4294967296.0);
}

LORA_HD bool dropout_keep(uint64_t seed, uint64_t index, uint64_t threshold) {
  const uint32_t s_lo = static_cast<uint32_t>(seed);
  const uint32_t s_hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t i_lo = static_cast<uint32_t>(index);
  const uint32_t i_hi = static_cast<uint32_t>(index >> 32);
  const uint32_t h = dropout_hash32(i_lo ^ dropout_hash32(s_lo ^ dropout_hash32(i_hi ^ s_hi)));
  return static_cast<uint64_t>(h) >= threshold;
}

}  // namespace lora_ext
