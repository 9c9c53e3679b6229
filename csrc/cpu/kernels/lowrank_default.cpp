// Portable variant of the fused low-rank / merge kernels: GCC/Clang vector extensions
// (8 fp32 lanes, lowered to whatever the baseline ISA has, SSE2 on x86-64), separate
// multiply and add (no FMA in the baseline), fp16 through c10::Half.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "../../dropout_hash.h"
#include "lowrank.h"

// The 32-byte vector type is internal to this file (never crosses an ABI boundary).
#pragma GCC diagnostic ignored "-Wpsabi"
// Keep multiply and add separate even where the compiler targets an ISA with FMA.
#pragma GCC optimize("fp-contract=off")

namespace {

typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

struct V {
  using reg = vf8;
  static constexpr int W = 8;
  static reg zero() { return reg{0, 0, 0, 0, 0, 0, 0, 0}; }
  static reg set1(float a) { return reg{a, a, a, a, a, a, a, a}; }
  static reg load(const float* p) {
    reg v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, reg v) { std::memcpy(p, &v, sizeof(v)); }
  static reg fma(reg a, reg b, reg c) {
    const reg prod = a * b;  // two roundings, the same in every lane and for every tile position
    return prod + c;
  }
  static reg mul(reg a, reg b) { return a * b; }
  static reg add(reg a, reg b) { return a + b; }
  static reg and_(reg a, reg b) {
    vu8 ua, ub;
    std::memcpy(&ua, &a, sizeof(a));
    std::memcpy(&ub, &b, sizeof(b));
    const vu8 r = ua & ub;
    reg out;
    std::memcpy(&out, &r, sizeof(out));
    return out;
  }
  static float hsum(reg v) {
    // pairwise, like the SIMD variants' reduction tree
    const float s0 = v[0] + v[4], s1 = v[1] + v[5], s2 = v[2] + v[6], s3 = v[3] + v[7];
    return (s0 + s2) + (s1 + s3);
  }
  static float bf16_to_f(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t f_to_bf16(float f) { return c10::detail::round_to_nearest_even(f); }
  static float f16_to_f(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
  static uint16_t f_to_f16(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
  static reg load_bf16(const uint16_t* p) {
    reg v;
    for (int l = 0; l < W; ++l) v[l] = bf16_to_f(p[l]);
    return v;
  }
  static void store_bf16(uint16_t* p, reg v) {
    for (int l = 0; l < W; ++l) p[l] = f_to_bf16(v[l]);
  }
  static reg load_f16(const uint16_t* p) {
    reg v;
    for (int l = 0; l < W; ++l) v[l] = f16_to_f(p[l]);
    return v;
  }
  static void store_f16(uint16_t* p, reg v) {
    for (int l = 0; l < W; ++l) p[l] = f_to_f16(v[l]);
  }
  static vu8 hash32(vu8 v) { return lora_ext::dropout_hash32(v); }
  static reg keep(uint32_t lo0, uint32_t inner, uint32_t threshold) {
    const vu8 idx = vu8{0, 1, 2, 3, 4, 5, 6, 7} + lo0;
    const vu8 h = hash32(idx ^ inner);
    const vi8 ge = h >= threshold;  // -1 (all ones) where true
    reg out;
    std::memcpy(&out, &ge, sizeof(out));
    return out;
  }
  static reg load_bits(const uint32_t* bits) {
    reg v;
    std::memcpy(&v, bits, sizeof(v));
    return v;
  }
};

#include "lowrank_impl.h"

}  // namespace

namespace lora_ext {
namespace cpu {

const Kernels& kernels_default() {
  static const Kernels k{"default", 8,       &stage,      &shrink, &expand, &shrink_t,
                         &outer,    &colsum, &merge_pack, &merge,  nullptr};
  return k;
}

}  // namespace cpu
}  // namespace lora_ext
