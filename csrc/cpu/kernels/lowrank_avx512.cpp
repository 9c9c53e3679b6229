// AVX-512 (F, BW, VL, DQ) + FMA + F16C variant of the fused low-rank / merge kernels
// (16 fp32 lanes). Same structure as lowrank_avx2.cpp: only the code between the target
// pragmas uses the ISA, and dispatch.cpp hands out this table only when the CPU has it.
#include <cstdint>
#include <cstring>

#include "../../dropout_hash.h"
#include "lowrank.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
// GCC 12 flags the deliberately undefined operand of _mm512_undefined_epi32() inside its own headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// Only the explicit fma() fuses: a separate multiply and add (the epilogue's W + fl(s * sum))
// must stay two roundings, as in the portable variant.
#pragma GCC optimize("fp-contract=off")

namespace {

struct V {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float a) { return _mm512_set1_ps(a); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg and_(reg a, reg b) { return _mm512_and_ps(a, b); }
  static float hsum(reg v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // Nearest even, any NaN -> 0x7FC0, as c10::BFloat16.
  static void store_bf16(uint16_t* p, reg v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static float bf16_to_f(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t f_to_bf16(float f) {
    uint16_t out[16];
    store_bf16(out, _mm512_set1_ps(f));
    return out[0];
  }
  static float f16_to_f(uint16_t h) { return _cvtsh_ss(h); }
  static uint16_t f_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

  static __m512i hash32(__m512i v) {
    v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
    v = _mm512_mullo_epi32(v, _mm512_set1_epi32(0x7feb352d));
    v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 15));
    v = _mm512_mullo_epi32(v, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
    v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
    return v;
  }
  static reg keep(uint32_t lo0, uint32_t inner, uint32_t threshold) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo0)), lanes);
    const __m512i h = hash32(_mm512_xor_si512(idx, _mm512_set1_epi32(static_cast<int>(inner))));
    const __mmask16 ge = _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32(static_cast<int>(threshold)));
    return _mm512_castsi512_ps(_mm512_movm_epi32(ge));
  }
  static reg load_bits(const uint32_t* bits) { return _mm512_castsi512_ps(_mm512_loadu_si512(bits)); }
};

#include "lowrank_impl.h"

}  // namespace

#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace lora_ext {
namespace cpu {

const Kernels& kernels_avx512() {
  static const Kernels k{"avx512", 16, &stage, &shrink, &expand, &outer, &colsum, &merge_pack, &merge};
  return k;
}

}  // namespace cpu
}  // namespace lora_ext

#else

namespace lora_ext {
namespace cpu {
const Kernels& kernels_avx512() { return kernels_default(); }
}  // namespace cpu
}  // namespace lora_ext

#endif
