// AVX2 + FMA + F16C variant of the fused low-rank / merge kernels (8 fp32 lanes).
//
// Only the functions between the target pragmas are compiled for AVX2; they have
// internal linkage and are reached only through the table returned by
// kernels_avx2(), which dispatch.cpp hands out only when the CPU has AVX2, FMA and F16C.
#include <cstdint>
#include <cstring>

#include "../../dropout_hash.h"
#include "lowrank.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// Only the explicit fma() fuses: a separate multiply and add (the epilogue's W + fl(s * sum))
// must stay two roundings, as in the portable variant.
#pragma GCC optimize("fp-contract=off")

namespace {

struct V {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float a) { return _mm256_set1_ps(a); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg and_(reg a, reg b) { return _mm256_and_ps(a, b); }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // bf16 -> fp32: the 16 bits become the high half of the fp32 word.
  static reg load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  // fp32 -> bf16 as c10::BFloat16 rounds: nearest even, any NaN -> 0x7FC0.
  static void store_bf16(uint16_t* p, reg v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, reg v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static float bf16_to_f(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t f_to_bf16(float f) {
    uint16_t out[8];
    store_bf16(out, _mm256_set1_ps(f));
    return out[0];
  }
  static float f16_to_f(uint16_t h) { return _cvtsh_ss(h); }
  static uint16_t f_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

  static __m256i hash32(__m256i v) {
    v = _mm256_xor_si256(v, _mm256_srli_epi32(v, 16));
    v = _mm256_mullo_epi32(v, _mm256_set1_epi32(0x7feb352d));
    v = _mm256_xor_si256(v, _mm256_srli_epi32(v, 15));
    v = _mm256_mullo_epi32(v, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
    v = _mm256_xor_si256(v, _mm256_srli_epi32(v, 16));
    return v;
  }
  // All-ones lanes where hash32((lo0 + lane) ^ inner) >= threshold (unsigned).
  static reg keep(uint32_t lo0, uint32_t inner, uint32_t threshold) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo0)), lanes);
    const __m256i h = hash32(_mm256_xor_si256(idx, _mm256_set1_epi32(static_cast<int>(inner))));
    const __m256i ge = _mm256_cmpeq_epi32(_mm256_max_epu32(h, _mm256_set1_epi32(static_cast<int>(threshold))), h);
    return _mm256_castsi256_ps(ge);
  }
  static reg load_bits(const uint32_t* bits) {
    return _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits)));
  }
};

#include "lowrank_impl.h"

}  // namespace

#pragma GCC pop_options

namespace lora_ext {
namespace cpu {

const Kernels& kernels_avx2() {
  static const Kernels k{"avx2", 8, &stage, &shrink, &expand, &shrink_t, &outer, &colsum, &merge_pack, &merge, nullptr};
  return k;
}

}  // namespace cpu
}  // namespace lora_ext

#else  // not x86-64: the variant does not exist; dispatch.cpp never selects it

namespace lora_ext {
namespace cpu {
const Kernels& kernels_avx2() { return kernels_default(); }
}  // namespace cpu
}  // namespace lora_ext

#endif
