// AVX-512 (F, BW, VL, DQ) + FMA + F16C variant of the fused low-rank / merge kernels
// (16 fp32 lanes). Same structure as lowrank_avx2.cpp: only the code between the target
// pragmas uses the ISA, and dispatch.cpp hands out this table only when the CPU has it.
#include <cstdint>
#include <cstring>

#include "../../dropout_hash.h"
#include "lowrank.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <vector>

// The AMX merge needs a compiler that knows the AMX intrinsics (GCC 11, clang 12) and Linux's
// permission call for the tile state; elsewhere it is left out (cpu_has_amx() is false).
#if defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define LORA_EXT_AMX 1
#else
#define LORA_EXT_AMX 0
#endif

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

// ---------------------------------------------------------------- shrink_t at r = 8 (half a vector)
//
// r = 8 is half of the 16 lanes, so the generic shrink_t does not take it and the dot-product
// shrink (horizontal sums, half shrink_t's rate) was the path: in the op r = 8 cost 0.98-1.08x
// r = 16's time for half the low-rank work. Here each vector holds
// two k at once: lane 2j + c accumulates X[m, k + c] * PT[k + c, j], fed by one 64-bit broadcast
// of the pair X[m, k], X[m, k + 1] against a pair-interleaved copy of PT's rows k and k + 1
// (made per chunk of kPairChunk k in a 16 KiB buffer on the stack), and lanes 2j, 2j + 1 are
// added at each chunk's end. As in shrink_t, the pairs alternate between C = 2 chains, the
// partial sums are parked in Z between chunks, and the order of the sums depends on k and K
// alone, the same for every row. An odd chunk length pads its last pair with zero factors and
// broadcasts only X[m, K - 1] (its other lanes zero, so an inf in X is not multiplied by 0).

constexpr int64_t kPairChunk = 512;  // k per chunk: 512 x 8 floats of PT

// buf[t * 16 + 2j + c] = PT[(2t + c) * 8 + j] for 2t + c < n, zero past n.
inline void interleave_pairs(const float* PT, int64_t n, float* buf) {
  const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  int64_t t = 0;
  for (; 2 * t + 2 <= n; ++t) _mm512_storeu_ps(buf + t * 16, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(PT + t * 16)));
  if (2 * t < n) {
    const __m512 lo = _mm512_castps256_ps512(_mm256_loadu_ps(PT + t * 16));
    _mm512_storeu_ps(buf + t * 16, _mm512_permutexvar_ps(idx, _mm512_insertf32x8(lo, _mm256_setzero_ps(), 1)));
  }
}

template <int R>
LORA_EXT_BLOCK void shrink_t_pair_blk(const float* X, int64_t ldx, int64_t n, const float* buf, bool first, float* Z,
                                      int64_t ldz) {
  constexpr int C = 2;
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < R; ++i)
      acc[c][i] = c == 0 && !first ? _mm512_maskz_expandloadu_ps(0x5555, Z + i * ldz) : _mm512_setzero_ps();
  const int64_t np = n / 2;  // whole pairs
  int64_t t = 0;
  for (; t + C <= np; t += C) {
    for (int c = 0; c < C; ++c) {
      const __m512 p = _mm512_loadu_ps(buf + (t + c) * 16);
      for (int i = 0; i < R; ++i) {
        double xx;
        std::memcpy(&xx, X + i * ldx + 2 * (t + c), sizeof(xx));
        acc[c][i] = _mm512_fmadd_ps(_mm512_castpd_ps(_mm512_set1_pd(xx)), p, acc[c][i]);
      }
    }
  }
  for (; t < np; ++t) {
    const __m512 p = _mm512_loadu_ps(buf + t * 16);
    for (int i = 0; i < R; ++i) {
      double xx;
      std::memcpy(&xx, X + i * ldx + 2 * t, sizeof(xx));
      acc[0][i] = _mm512_fmadd_ps(_mm512_castpd_ps(_mm512_set1_pd(xx)), p, acc[0][i]);
    }
  }
  if (n % 2 != 0) {
    const __m512 p = _mm512_loadu_ps(buf + np * 16);
    for (int i = 0; i < R; ++i) {
      const __m512 xb = _mm512_maskz_mov_ps(0x5555, _mm512_set1_ps(X[i * ldx + n - 1]));
      acc[0][i] = _mm512_fmadd_ps(xb, p, acc[0][i]);
    }
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  for (int i = 0; i < R; ++i) {
    const __m512 a = _mm512_add_ps(acc[0][i], acc[1][i]);
    const __m512 sum = _mm512_add_ps(a, _mm512_permute_ps(a, 0xB1));  // lane 2j: lanes 2j + 2j+1
    _mm256_storeu_ps(Z + i * ldz, _mm512_castps512_ps256(_mm512_permutexvar_ps(even, sum)));
  }
}

void shrink_t_pair(const float* X, int64_t ldx, int64_t rows, int64_t K, const float* PT, float* Z, int64_t ldz) {
  if (K <= 0) {
    for (int64_t m = 0; m < rows; ++m) std::memset(Z + m * ldz, 0, 8 * sizeof(float));
    return;
  }
  alignas(64) float buf[kPairChunk * 8];
  for (int64_t k0 = 0; k0 < K; k0 += kPairChunk) {
    const int64_t n = K - k0 < kPairChunk ? K - k0 : kPairChunk;
    interleave_pairs(PT + k0 * 8, n, buf);
    const float* x = X + k0;
    const bool first = k0 == 0;
    int64_t m = 0;
    for (; m + 8 <= rows; m += 8) shrink_t_pair_blk<8>(x + m * ldx, ldx, n, buf, first, Z + m * ldz, ldz);
    if (m + 4 <= rows) shrink_t_pair_blk<4>(x + m * ldx, ldx, n, buf, first, Z + m * ldz, ldz), m += 4;
    if (m + 2 <= rows) shrink_t_pair_blk<2>(x + m * ldx, ldx, n, buf, first, Z + m * ldz, ldz), m += 2;
    for (; m < rows; ++m) shrink_t_pair_blk<1>(x + m * ldx, ldx, n, buf, first, Z + m * ldz, ldz);
  }
}

// The table's shrink_t: r = 8 through the pair form, the multiples of 16 through the generic one.
bool shrink_t_any(const float* X, int64_t ldx, int64_t rows, int64_t K, const float* PT, int64_t r, float* Z,
                  int64_t ldz) {
  if (r == 8) return shrink_t_pair(X, ldx, rows, K, PT, Z, ldz), true;
  return shrink_t(X, ldx, rows, K, PT, r, Z, ldz);
}

// ---------------------------------------------------------------- bf16 merge on AVX512-BF16
//
// merge_blk's tiling (R rows x 3 vectors, the packed panel of a column tile kept in L1, the
// next rows prefetched, every load of a block before its first store) with one vdpbf16ps per
// pair of ranks instead of two FMAs. Reached only through kernels_avx512().merge_bf16, which is
// set only when the CPU has AVX512-BF16.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")

// V::store_bf16 (nearest even, c10::BFloat16's bits) in one vcvtneps2bf16 where that gives the same
// bits: every lane a normal number. It flushes subnormals to zero and keeps NaN payloads, so a
// vector with a zero, subnormal, infinite or NaN lane takes V::store_bf16.
inline void store_bf16_cvt(uint16_t* p, __m512 v) {
  const __m512i e = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7F800000));
  const __mmask16 special =
      _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()) | _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0x7F800000));
  if (__builtin_expect(special != 0, 0)) {
    V::store_bf16(p, v);
    return;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

template <int R, bool FULL>
LORA_EXT_BLOCK void merge_bf16_blk(const uint32_t* zp, int64_t rp, const uint32_t* qp, int64_t n, float scale,
                                   const uint16_t* base, int64_t ldb, uint16_t* out, int64_t ldo, int64_t pf_rows) {
  __m512 acc[R][3];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 3; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < rp; ++p) {
    __m512bh q[3];
    for (int v = 0; v < 3; ++v) q[v] = (__m512bh)_mm512_loadu_si512(qp + p * 3 * W + v * W);
    for (int i = 0; i < R; ++i) {
      const __m512bh z = (__m512bh)_mm512_set1_epi32(static_cast<int>(zp[i * rp + p]));
      for (int v = 0; v < 3; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], z, q[v]);
    }
  }
  for (int64_t i = 0; i < pf_rows; ++i) {
    const char* p0 = reinterpret_cast<const char*>(base + (R + i) * ldb);
    const uintptr_t a0 = reinterpret_cast<uintptr_t>(p0) & ~uintptr_t(63);
    const uintptr_t a1 = reinterpret_cast<uintptr_t>(p0) + uintptr_t(3 * W * 2 - 1);
    for (uintptr_t a = a0; a <= a1; a += 64) __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
  }
  const reg s = V::set1(scale);
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < 3; ++v) {
      const int64_t nv = FULL ? W : (n - v * W > W ? W : n - v * W);
      if (!FULL && nv <= 0) break;
      const reg b = FULL ? V::load_bf16(base + i * ldb + v * W) : load_n<DT::kBFloat16>(base + i * ldb + v * W, nv);
      acc[i][v] = V::add(b, V::mul(s, acc[i][v]));
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < 3; ++v) {
      const int64_t nv = FULL ? W : (n - v * W > W ? W : n - v * W);
      if (!FULL && nv <= 0) break;
      if (FULL) {
        store_bf16_cvt(out + i * ldo + v * W, acc[i][v]);
      } else {
        store_n<DT::kBFloat16>(out + i * ldo + v * W, acc[i][v], nv);
      }
    }
  }
}

template <int R>
inline void merge_bf16_rows(const uint32_t* zp, int64_t rp, const uint32_t* Qp, int64_t c0, int64_t c1, int64_t L,
                            float scale, const uint16_t* base, int64_t ldb, uint16_t* out, int64_t ldo,
                            int64_t pf_rows) {
  constexpr int64_t BW = 3 * W;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t l = c * BW;
    const uint32_t* qp = Qp + c * rp * BW;
    if (l + BW <= L) {
      merge_bf16_blk<R, true>(zp, rp, qp, BW, scale, base + l, ldb, out + l, ldo, pf_rows);
    } else {
      merge_bf16_blk<R, false>(zp, rp, qp, L - l, scale, base + l, ldb, out + l, ldo, 0);
    }
  }
}

void merge_bf16(const uint32_t* Zp, int64_t rows, int64_t rp, const uint32_t* Qp, int64_t L, float scale,
                const uint16_t* base, int64_t ldb, uint16_t* out, int64_t ldo) {
  static_assert(3 * W == lora_ext::cpu::kBf16PairBlock, "packed block = 3 vectors");
  constexpr int64_t BW = 3 * W;
  const int64_t nblk = (L + BW - 1) / BW;
  int64_t tile = kMergePanel / (2 * rp * BW);  // column blocks per tile (a pair is two ranks)
  if (tile < 1) tile = 1;
  for (int64_t m0 = 0; m0 < rows; m0 += kMergeRows) {
    const int64_t m1 = m0 + kMergeRows < rows ? m0 + kMergeRows : rows;
    for (int64_t c0 = 0; c0 < nblk; c0 += tile) {
      const int64_t c1 = c0 + tile < nblk ? c0 + tile : nblk;
      for (int64_t m = m0; m < m1;) {
        const uint32_t* z = Zp + m * rp;
        const uint16_t* b = base + m * ldb;
        uint16_t* o = out + m * ldo;
        const int64_t left = m1 - m;
        if (left >= 8) {
          merge_bf16_rows<8>(z, rp, Qp, c0, c1, L, scale, b, ldb, o, ldo, left >= 16 ? 8 : left - 8);
          m += 8;
        } else if (left >= 4) {
          merge_bf16_rows<4>(z, rp, Qp, c0, c1, L, scale, b, ldb, o, ldo, 0);
          m += 4;
        } else if (left >= 2) {
          merge_bf16_rows<2>(z, rp, Qp, c0, c1, L, scale, b, ldb, o, ldo, 0);
          m += 2;
        } else {
          merge_bf16_rows<1>(z, rp, Qp, c0, c1, L, scale, b, ldb, o, ldo, 0);
          m += 1;
        }
      }
    }
  }
}

#pragma GCC pop_options

bool cpu_has_avx512bf16() { return __builtin_cpu_supports("avx512bf16"); }

#if LORA_EXT_AMX
// ---------------------------------------------------------------- bf16 merge on AMX tiles
//
// The operands of merge_bf16 as tiles: A = 16 rows of Zp (rp pairs each, up to 16 pairs per
// tile), B = the matching pairs of a 16-column slice of a packed 48-column block of Qp (row
// stride 48 pairs), C = 16 x 16 fp32 sums; tdpbf16ps adds the pairs in rank order. A 48-column
// block's three C tiles go through a 3 KiB buffer into merge_bf16_blk's epilogue: W + fl(s * sum),
// rounded once (loads of all three vectors of a row before its stores, as there).
// Tiles: 0, 5, 6 = C, 1/2 = A/B of a full 16-pair chunk, 3/4 = A/B of the last, shorter chunk.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,amx-tile,amx-bf16")

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTilePairs = 16;  // pairs (32 ranks) per tdpbf16ps: 64-byte tile rows

// C tiles 0, 5, 6 += one chunk of pairs: A tile TA from z (row stride zs bytes), B tile TB from the
// three 16-column slices of the packed block at qk (row stride 48 pairs). A macro, not a function:
// GCC's tile intrinsics paste the tile number into the instruction text, so it must be a literal.
#define LORA_EXT_TDP_CHUNK(TA, TB, z, zs, qk)                                          \
  do {                                                                                 \
    constexpr int64_t qs_ = lora_ext::cpu::kBf16PairBlock * int64_t(sizeof(uint32_t)); \
    _tile_loadd(TA, (z), (zs));                                                        \
    _tile_loadd(TB, (qk), qs_);                                                        \
    _tile_dpbf16ps(0, TA, TB);                                                         \
    _tile_loadd(TB, (qk) + 16, qs_);                                                   \
    _tile_dpbf16ps(5, TA, TB);                                                         \
    _tile_loadd(TB, (qk) + 32, qs_);                                                   \
    _tile_dpbf16ps(6, TA, TB);                                                         \
  } while (0)

void merge_bf16_amx(const uint32_t* Zp, int64_t rows, int64_t rp, const uint32_t* Qp, int64_t L, float scale,
                    const uint16_t* base, int64_t ldb, uint16_t* out, int64_t ldo) {
  static_assert(lora_ext::cpu::kBf16PairBlock == 48, "a packed block holds 3 tile widths");
  constexpr int64_t QB = lora_ext::cpu::kBf16PairBlock;
  if (rows <= 0 || L <= 0) return;
  const int64_t full = rp / kTilePairs, tail = rp % kTilePairs;
  TileConfig cfg;
  // tile t: rows[t] rows of colsb[t] bytes (C: 16 x 16 fp32; A: 16 rows x pairs; B: pairs x 16 columns)
  auto shape = [&cfg](int t, int64_t rows_, int64_t colsb) {
    cfg.rows[t] = static_cast<uint8_t>(rows_);
    cfg.colsb[t] = static_cast<uint16_t>(colsb);
  };
  for (int t : {0, 5, 6}) shape(t, 16, 64);
  shape(1, 16, 4 * kTilePairs);
  shape(2, kTilePairs, 64);
  if (tail > 0) {
    shape(3, 16, 4 * tail);
    shape(4, tail, 64);
  }
  _tile_loadconfig(&cfg);
  alignas(64) float c[16 * QB];  // the three C tiles side by side: row i at c + 48 i
  std::vector<uint32_t> zpad;    // the last rows % 16 rows of Zp, zero-padded to 16 rows
  const reg s = V::set1(scale);
  const int64_t nblk = (L + QB - 1) / QB;
  for (int64_t m0 = 0; m0 < rows; m0 += 16) {
    const int64_t mc = rows - m0 < 16 ? rows - m0 : 16;
    const uint32_t* z = Zp + m0 * rp;
    if (mc < 16) {
      zpad.assign(static_cast<size_t>(16 * rp), 0u);
      std::memcpy(zpad.data(), z, static_cast<size_t>(mc * rp) * sizeof(uint32_t));
      z = zpad.data();
    }
    const int64_t zs = rp * int64_t(sizeof(uint32_t));
    for (int64_t cb = 0; cb < nblk; ++cb) {
      // the block's 48 columns as three C tiles (0, 5, 6), each A tile loaded once for the three
      const uint32_t* q = Qp + cb * rp * QB;
      _tile_zero(0);
      _tile_zero(5);
      _tile_zero(6);
      for (int64_t k = 0; k < full; ++k) LORA_EXT_TDP_CHUNK(1, 2, z + k * kTilePairs, zs, q + k * kTilePairs * QB);
      if (tail > 0) LORA_EXT_TDP_CHUNK(3, 4, z + full * kTilePairs, zs, q + full * kTilePairs * QB);
      _tile_stored(0, c, 3 * 64);
      _tile_stored(5, c + 16, 3 * 64);
      _tile_stored(6, c + 32, 3 * 64);
      const int64_t l0 = cb * QB;
      const int64_t n = L - l0 < QB ? L - l0 : QB;
      for (int64_t i = 0; i < mc; ++i) {
        const uint16_t* b = base + (m0 + i) * ldb + l0;
        uint16_t* o = out + (m0 + i) * ldo + l0;
        const float* ci = c + i * QB;
        if (n == QB) {
          const reg v0 = V::add(V::load_bf16(b), V::mul(s, V::load(ci)));
          const reg v1 = V::add(V::load_bf16(b + 16), V::mul(s, V::load(ci + 16)));
          const reg v2 = V::add(V::load_bf16(b + 32), V::mul(s, V::load(ci + 32)));
          store_bf16_cvt(o, v0);
          store_bf16_cvt(o + 16, v1);
          store_bf16_cvt(o + 32, v2);
        } else {
          for (int64_t l = 0; l < n; l += 16) {
            const int64_t nv = n - l < 16 ? n - l : 16;
            store_n<DT::kBFloat16>(o + l, V::add(load_n<DT::kBFloat16>(b + l, nv), V::mul(s, V::load(ci + l))), nv);
          }
        }
      }
    }
  }
  _tile_release();
}
#undef LORA_EXT_TDP_CHUNK

#pragma GCC pop_options

// CPUID.(7, 0):EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), XCR0 bits 17-18 (tile state enabled by
// the OS), and on Linux the per-process permission for the tile data (arch_prctl, kernel 5.16+).
bool amx_usable() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
  if (!__builtin_cpu_supports("avx512bf16")) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool amx_usable() { return false; }
#endif  // LORA_EXT_AMX

}  // namespace

#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace lora_ext {
namespace cpu {

const Kernels& kernels_avx512() {
  static const Kernels k{"avx512",
                         16,
                         &stage,
                         &shrink,
                         &expand,
                         &shrink_t_any,
                         &outer,
                         &colsum,
                         &merge_pack,
                         &merge,
                         cpu_has_avx512bf16() ? &merge_bf16 : nullptr,
#if LORA_EXT_AMX
                         cpu_has_amx() ? &merge_bf16_amx : nullptr
#else
                         nullptr
#endif
  };
  return k;
}

bool cpu_has_amx() {
  static const bool ok = amx_usable();
  return ok;
}

}  // namespace cpu
}  // namespace lora_ext

#else

namespace lora_ext {
namespace cpu {
const Kernels& kernels_avx512() { return kernels_default(); }
bool cpu_has_amx() { return false; }
}  // namespace cpu
}  // namespace lora_ext

#endif
