// The templated loops behind lowrank.h, written once against a vector type V.
//
// Included (without an include guard, on purpose) by each ISA translation unit,
// inside that unit's own anonymous namespace and after its `struct V` and the
// `#pragma GCC target` of the ISA, so every function here is compiled for that
// ISA and none of them is visible to (or merged with) another unit. This file
// includes nothing: lowrank.h, dropout_hash.h, <cstdint> and <cstring> must come
// first, before the target pragma, so no shared inline function is compiled with
// the ISA's flags.
//
// V provides: reg, W (lanes), zero, set1, load/store (fp32), fma(a, b, c) = a*b + c,
// mul, add, and_, hsum, load_bf16/store_bf16, load_f16/store_f16 (W elements), their scalar forms
// bf16_to_f/f_to_bf16/f16_to_f/f_to_f16, keep(lo0, inner, threshold) (all-ones lanes
// where hash32((lo0 + lane) ^ inner) >= threshold) and load_bits (W uint32 masks).
//
// Register blocking (AVX2 has 16 vector registers): shrink 3 rows x 4 ranks of
// lane-wise partial sums, expand 4 rows x 3 vectors, outer 6 ranks x 2 vectors (8 x 3 with AVX-512), so
// each inner step does 12 FMAs on at most 8 loads. Every output element is summed
// over the rank in the same order wherever it sits in a tile (the last, partial
// vector uses zero-padded loads through the same code), so results do not depend
// on the layout or on the tile an element falls in.

// The register blocks (the *_blk functions) are forced inline into their loops: left to GCC,
// merge_blk<8> became a call per 8 x 48 block that stored its 24 accumulators to the stack
// for the epilogue (the block's 16 rank steps then cost ~25 % more than MKL's addmm_ in L2).
#ifndef LORA_EXT_BLOCK
#if defined(__GNUC__) || defined(__clang__)
#define LORA_EXT_BLOCK inline __attribute__((always_inline))
#else
#define LORA_EXT_BLOCK inline
#endif
#endif

using lora_ext::cpu::Drop;
using lora_ext::cpu::DT;
using lora_ext::cpu::Kernels;
using reg = V::reg;
constexpr int W = V::W;

template <DT D>
struct IO;
template <>
struct IO<DT::kFloat32> {
  using T = float;
  static reg load(const T* p) { return V::load(p); }
  static void store(T* p, reg v) { V::store(p, v); }
  static float to_f(T x) { return x; }
  static T from_f(float x) { return x; }
};
template <>
struct IO<DT::kBFloat16> {
  using T = uint16_t;
  static reg load(const T* p) { return V::load_bf16(p); }
  static void store(T* p, reg v) { V::store_bf16(p, v); }
  static float to_f(T x) { return V::bf16_to_f(x); }
  static T from_f(float x) { return V::f_to_bf16(x); }
};
template <>
struct IO<DT::kFloat16> {
  using T = uint16_t;
  static reg load(const T* p) { return V::load_f16(p); }
  static void store(T* p, reg v) { V::store_f16(p, v); }
  static float to_f(T x) { return V::f16_to_f(x); }
  static T from_f(float x) { return V::f_to_f16(x); }
};

// n < W valid elements, the rest zero.
template <DT D>
inline reg load_part(const typename IO<D>::T* p, int64_t n) {
  typename IO<D>::T tmp[W];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, p, size_t(n) * sizeof(typename IO<D>::T));
  return IO<D>::load(tmp);
}

template <DT D>
inline void store_part(typename IO<D>::T* p, reg v, int64_t n) {
  typename IO<D>::T tmp[W];
  IO<D>::store(tmp, v);
  std::memcpy(p, tmp, size_t(n) * sizeof(typename IO<D>::T));
}

template <DT D>
inline reg load_n(const typename IO<D>::T* p, int64_t n) {
  return n >= W ? IO<D>::load(p) : load_part<D>(p, n);
}

template <DT D>
inline void store_n(typename IO<D>::T* p, reg v, int64_t n) {
  if (n >= W) {
    IO<D>::store(p, v);
  } else {
    store_part<D>(p, v, n);
  }
}

// Keep mask (all-ones lanes) for the W consecutive element indices idx0, idx0 + 1, ...
inline reg keep_mask(const Drop& d, uint64_t idx0) {
  const uint32_t lo0 = static_cast<uint32_t>(idx0);
  const uint32_t s_lo = static_cast<uint32_t>(d.seed), s_hi = static_cast<uint32_t>(d.seed >> 32);
  if (lo0 <= 0xFFFFFFFFu - uint32_t(W - 1)) {  // no carry into the high word inside the vector
    const uint32_t hi = static_cast<uint32_t>(idx0 >> 32);
    const uint32_t inner = lora_ext::dropout_hash32(s_lo ^ lora_ext::dropout_hash32(hi ^ s_hi));
    return V::keep(lo0, inner, static_cast<uint32_t>(d.threshold));
  }
  uint32_t bits[W];
  for (int l = 0; l < W; ++l) bits[l] = lora_ext::dropout_keep(d.seed, idx0 + uint64_t(l), d.threshold) ? ~0u : 0u;
  return V::load_bits(bits);
}

// ---------------------------------------------------------------- stage

template <DT D>
void stage_t(const void* src_, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst, int64_t ldd,
             int64_t row0, const Drop* drop) {
  using T = typename IO<D>::T;
  const T* src = static_cast<const T*>(src_);
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * rs;
    float* o = dst + i * ldd;
    const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(cols);
    if (cs == 1) {
      for (int64_t k = 0; k < cols; k += W) {
        const int64_t n = cols - k;
        reg v = load_n<D>(s + k, n);
        if (drop) v = V::and_(v, keep_mask(*drop, base + uint64_t(k)));
        store_n<DT::kFloat32>(o + k, v, n);
      }
    } else {
      for (int64_t k = 0; k < cols; ++k) {
        float v = IO<D>::to_f(s[k * cs]);
        if (drop && !lora_ext::dropout_keep(drop->seed, base + uint64_t(k), drop->threshold)) v = 0.0f;
        o[k] = v;
      }
    }
  }
}

void stage(const void* src, DT dt, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst, int64_t ldd,
           int64_t row0, const Drop* drop) {
  switch (dt) {
    case DT::kFloat32:
      return stage_t<DT::kFloat32>(src, rs, cs, rows, cols, dst, ldd, row0, drop);
    case DT::kBFloat16:
      return stage_t<DT::kBFloat16>(src, rs, cs, rows, cols, dst, ldd, row0, drop);
    case DT::kFloat16:
      return stage_t<DT::kFloat16>(src, rs, cs, rows, cols, dst, ldd, row0, drop);
  }
}

// ---------------------------------------------------------------- shrink: Z = X P^T

template <int R, int J>
LORA_EXT_BLOCK void shrink_blk(const float* X, int64_t ldx, int64_t K, const float* P, int64_t ldp, float* Z,
                               int64_t ldz) {
  reg acc[R][J];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) acc[i][j] = V::zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    reg xv[R];
    for (int i = 0; i < R; ++i) xv[i] = V::load(X + i * ldx + k);
    for (int j = 0; j < J; ++j) {
      const reg p = V::load(P + j * ldp + k);
      for (int i = 0; i < R; ++i) acc[i][j] = V::fma(xv[i], p, acc[i][j]);
    }
  }
  if (k < K) {
    const int64_t n = K - k;
    reg xv[R];
    for (int i = 0; i < R; ++i) xv[i] = load_part<DT::kFloat32>(X + i * ldx + k, n);
    for (int j = 0; j < J; ++j) {
      const reg p = load_part<DT::kFloat32>(P + j * ldp + k, n);
      for (int i = 0; i < R; ++i) acc[i][j] = V::fma(xv[i], p, acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) Z[i * ldz + j] = V::hsum(acc[i][j]);
}

template <int R>
inline void shrink_rows(const float* X, int64_t ldx, int64_t K, const float* P, int64_t ldp, int64_t r, float* Z,
                        int64_t ldz) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) shrink_blk<R, 4>(X, ldx, K, P + j * ldp, ldp, Z + j, ldz);
  switch (r - j) {
    case 3:
      shrink_blk<R, 3>(X, ldx, K, P + j * ldp, ldp, Z + j, ldz);
      break;
    case 2:
      shrink_blk<R, 2>(X, ldx, K, P + j * ldp, ldp, Z + j, ldz);
      break;
    case 1:
      shrink_blk<R, 1>(X, ldx, K, P + j * ldp, ldp, Z + j, ldz);
      break;
    default:
      break;
  }
}

void shrink(const float* X, int64_t ldx, int64_t rows, int64_t K, const float* P, int64_t ldp, int64_t r, float* Z,
            int64_t ldz) {
  int64_t m = 0;
  for (; m + 3 <= rows; m += 3) shrink_rows<3>(X + m * ldx, ldx, K, P, ldp, r, Z + m * ldz, ldz);
  if (rows - m == 2) shrink_rows<2>(X + m * ldx, ldx, K, P, ldp, r, Z + m * ldz, ldz);
  if (rows - m == 1) shrink_rows<1>(X + m * ldx, ldx, K, P, ldp, r, Z + m * ldz, ldz);
}

// ---------------------------------------------------------------- shrink_t: Z = X PT (PT = P^T [K, r])
//
// For r a multiple of W (r = NV vectors): each row's r outputs are NV vector accumulators, and
// every k adds X[m, k] * PT[k, :] (one broadcast, NV loads shared by the R rows of the block).
// No horizontal sums, X read once.
//
// k runs in chunks of shrink_t_chunk(r) columns (a 16 KiB slice of PT, which stays in L1 while
// every row block of the call passes over it; a whole PT of K = 1024, r = 16 is 64 KiB and came
// from L2 once per row block), the partial sums parked in Z between chunks. With one vector per
// row (NV = 1, AVX-512) a row's FMA chain would be the only work per broadcast, so its k split
// into C = 2 interleaved chains (even and odd k of the chunk) added at the chunk's end. The order
// of the sums depends on k, K and r only, the same for every row wherever it falls in a block, so
// the blocking does not change the bits. (r = 16, K = 1024, 32-row steps, one AVX-512 thread:
// 3.1 -> 3.7 G vector FMAs/s in L2, 2.85 -> 3.3 from memory; the software prefetch of the next
// rows this loop had measured no gain and is gone.)

constexpr int kAccRegs = W >= 16 ? 24 : 12;    // accumulators a block may hold (32 / 16 vector registers)
constexpr int64_t kShrinkTChunkFloats = 4096;  // 16 KiB of PT per k chunk

inline int64_t shrink_t_chunk(int64_t r) {
  const int64_t kc = (kShrinkTChunkFloats / r) & ~int64_t(1);  // even: the C = 2 chains pair k0 + 2t, k0 + 2t + 1
  return kc < 16 ? 16 : kc;
}

template <int R, int NV, int C>
LORA_EXT_BLOCK void shrink_t_blk(const float* X, int64_t ldx, int64_t k0, int64_t k1, const float* PT, int64_t r,
                                 float* Z, int64_t ldz) {
  reg acc[C][R][NV];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < NV; ++v) acc[c][i][v] = c == 0 && k0 > 0 ? V::load(Z + i * ldz + v * W) : V::zero();
  int64_t k = k0;
  for (; k + C <= k1; k += C) {
    reg p[C][NV];
    for (int c = 0; c < C; ++c)
      for (int v = 0; v < NV; ++v) p[c][v] = V::load(PT + (k + c) * r + v * W);
    for (int i = 0; i < R; ++i) {
      for (int c = 0; c < C; ++c) {
        const reg xb = V::set1(X[i * ldx + k + c]);
        for (int v = 0; v < NV; ++v) acc[c][i][v] = V::fma(xb, p[c][v], acc[c][i][v]);
      }
    }
  }
  for (; k < k1; ++k) {  // an odd chunk length (the last chunk only): its last k on chain 0
    reg p[NV];
    for (int v = 0; v < NV; ++v) p[v] = V::load(PT + k * r + v * W);
    for (int i = 0; i < R; ++i) {
      const reg xb = V::set1(X[i * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[0][i][v] = V::fma(xb, p[v], acc[0][i][v]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < NV; ++v) {
      reg t = acc[0][i][v];
      for (int c = 1; c < C; ++c) t = V::add(t, acc[c][i][v]);
      V::store(Z + i * ldz + v * W, t);
    }
  }
}

template <int NV>
void shrink_t_nv(const float* X, int64_t ldx, int64_t rows, int64_t K, const float* PT, int64_t r, float* Z,
                 int64_t ldz) {
  constexpr int C = W >= 16 && NV == 1 ? 2 : 1;
  constexpr int RB = kAccRegs / NV > 8 ? 8 : (kAccRegs / NV < 1 ? 1 : kAccRegs / NV);
  if (K <= 0) {
    for (int64_t m = 0; m < rows; ++m) std::memset(Z + m * ldz, 0, size_t(r) * sizeof(float));
    return;
  }
  const int64_t kc = shrink_t_chunk(r);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = k0 + kc < K ? k0 + kc : K;
    int64_t m = 0;
    for (; m + RB <= rows; m += RB) shrink_t_blk<RB, NV, C>(X + m * ldx, ldx, k0, k1, PT, r, Z + m * ldz, ldz);
    // The tail in blocks of 4 and 2 rows: a single row is one FMA chain per vector, latency-bound
    // (a step of 23 rows, K = 1376, spent a third of its time on its 7 single rows).
    if constexpr (RB > 4) {
      if (m + 4 <= rows) shrink_t_blk<4, NV, C>(X + m * ldx, ldx, k0, k1, PT, r, Z + m * ldz, ldz), m += 4;
    }
    if constexpr (RB > 2) {
      if (m + 2 <= rows) shrink_t_blk<2, NV, C>(X + m * ldx, ldx, k0, k1, PT, r, Z + m * ldz, ldz), m += 2;
    }
    for (; m < rows; ++m) shrink_t_blk<1, NV, C>(X + m * ldx, ldx, k0, k1, PT, r, Z + m * ldz, ldz);
  }
}

// Returns false (nothing done) unless r is 1 .. 8 vectors.
bool shrink_t(const float* X, int64_t ldx, int64_t rows, int64_t K, const float* PT, int64_t r, float* Z, int64_t ldz) {
  if (r % W != 0) return false;
  switch (r / W) {
    case 1:
      return shrink_t_nv<1>(X, ldx, rows, K, PT, r, Z, ldz), true;
    case 2:
      return shrink_t_nv<2>(X, ldx, rows, K, PT, r, Z, ldz), true;
    case 3:
      return shrink_t_nv<3>(X, ldx, rows, K, PT, r, Z, ldz), true;
    case 4:
      return shrink_t_nv<4>(X, ldx, rows, K, PT, r, Z, ldz), true;
    case 6:
      return shrink_t_nv<6>(X, ldx, rows, K, PT, r, Z, ldz), true;
    case 8:
      return shrink_t_nv<8>(X, ldx, rows, K, PT, r, Z, ldz), true;
    default:
      return false;
  }
}

// ---------------------------------------------------------------- expand: out = base + mask * s (Z Q)

// R rows x LV vectors starting at column l; the last vector holds `nlast` valid columns.
template <int R, int LV, DT BD, DT OD, bool MASK>
LORA_EXT_BLOCK void expand_blk(const float* Z, int64_t ldz, int64_t r, const float* Q, int64_t ldq, int64_t nlast,
                               float scale, const typename IO<BD>::T* base, int64_t ldb, typename IO<OD>::T* out,
                               int64_t ldo, uint64_t idx0, uint64_t L, const Drop* drop) {
  reg acc[R][LV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < LV; ++v) acc[i][v] = V::zero();
  if (nlast >= W) {
    for (int64_t j = 0; j < r; ++j) {
      reg q[LV];
      for (int v = 0; v < LV; ++v) q[v] = V::load(Q + j * ldq + v * W);
      for (int i = 0; i < R; ++i) {
        const reg z = V::set1(Z[i * ldz + j]);
        for (int v = 0; v < LV; ++v) acc[i][v] = V::fma(z, q[v], acc[i][v]);
      }
    }
  } else {
    for (int64_t j = 0; j < r; ++j) {
      reg q[LV];
      for (int v = 0; v < LV; ++v) q[v] = load_n<DT::kFloat32>(Q + j * ldq + v * W, v == LV - 1 ? nlast : W);
      for (int i = 0; i < R; ++i) {
        const reg z = V::set1(Z[i * ldz + j]);
        for (int v = 0; v < LV; ++v) acc[i][v] = V::fma(z, q[v], acc[i][v]);
      }
    }
  }
  const reg s = V::set1(scale);
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < LV; ++v) {
      const int64_t n = v == LV - 1 ? nlast : W;
      reg t = V::mul(s, acc[i][v]);
      if (MASK) t = V::and_(t, keep_mask(*drop, idx0 + uint64_t(i) * L + uint64_t(v * W)));
      const reg b = load_n<BD>(base + i * ldb + v * W, n);
      store_n<OD>(out + i * ldo + v * W, V::add(b, t), n);
    }
  }
}

template <int R, DT BD, DT OD, bool MASK>
inline void expand_rows(const float* Z, int64_t ldz, int64_t r, const float* Q, int64_t ldq, int64_t l0, int64_t l1,
                        float scale, const typename IO<BD>::T* base, int64_t ldb, typename IO<OD>::T* out, int64_t ldo,
                        uint64_t row_idx, uint64_t L, const Drop* drop) {
  int64_t l = l0;
  for (; l + 3 * W <= l1; l += 3 * W)
    expand_blk<R, 3, BD, OD, MASK>(Z, ldz, r, Q + l, ldq, W, scale, base + l, ldb, out + l, ldo, row_idx + l, L, drop);
  for (; l < l1; l += W)
    expand_blk<R, 1, BD, OD, MASK>(Z, ldz, r, Q + l, ldq, l1 - l, scale, base + l, ldb, out + l, ldo, row_idx + l, L,
                                   drop);
}

template <DT BD, DT OD, bool MASK>
void expand_t(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Q, int64_t ldq, int64_t L, float scale,
              const void* base_, int64_t ldb, void* out_, int64_t ldo, int64_t row0, const Drop* drop) {
  const auto* base = static_cast<const typename IO<BD>::T*>(base_);
  auto* out = static_cast<typename IO<OD>::T*>(out_);
  // Columns per tile: a multiple of the 3-vector block such that the r x tile slice of Q is
  // about 128 KiB (stays in L2 while the rows of the call stream through it); long tiles
  // keep the reads of base/out sequential.
  int64_t tile = (int64_t(32768) / (r > 0 ? r : 1)) / (3 * W) * (3 * W);
  if (tile < 3 * W) tile = 3 * W;
  const uint64_t UL = static_cast<uint64_t>(L);
  for (int64_t l0 = 0; l0 < L; l0 += tile) {
    const int64_t l1 = l0 + tile < L ? l0 + tile : L;
    int64_t m = 0;
    for (; m < rows; m += 4) {
      const uint64_t row_idx = static_cast<uint64_t>(row0 + m) * UL;
      const float* z = Z + m * ldz;
      const auto* b = base + m * ldb;
      auto* o = out + m * ldo;
      switch (rows - m >= 4 ? 4 : rows - m) {
        case 4:
          expand_rows<4, BD, OD, MASK>(z, ldz, r, Q, ldq, l0, l1, scale, b, ldb, o, ldo, row_idx, UL, drop);
          break;
        case 3:
          expand_rows<3, BD, OD, MASK>(z, ldz, r, Q, ldq, l0, l1, scale, b, ldb, o, ldo, row_idx, UL, drop);
          break;
        case 2:
          expand_rows<2, BD, OD, MASK>(z, ldz, r, Q, ldq, l0, l1, scale, b, ldb, o, ldo, row_idx, UL, drop);
          break;
        default:
          expand_rows<1, BD, OD, MASK>(z, ldz, r, Q, ldq, l0, l1, scale, b, ldb, o, ldo, row_idx, UL, drop);
          break;
      }
    }
  }
}

template <DT BD, DT OD>
void expand_mask(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Q, int64_t ldq, int64_t L,
                 float scale, const void* base, int64_t ldb, void* out, int64_t ldo, int64_t row0, const Drop* drop) {
  if (drop) {
    expand_t<BD, OD, true>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, ldo, row0, drop);
  } else {
    expand_t<BD, OD, false>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, ldo, row0, drop);
  }
}

template <DT BD>
void expand_base(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Q, int64_t ldq, int64_t L,
                 float scale, const void* base, int64_t ldb, void* out, DT odt, int64_t ldo, int64_t row0,
                 const Drop* drop) {
  switch (odt) {
    case DT::kFloat32:
      return expand_mask<BD, DT::kFloat32>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, ldo, row0, drop);
    case DT::kBFloat16:
      return expand_mask<BD, DT::kBFloat16>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, ldo, row0, drop);
    case DT::kFloat16:
      return expand_mask<BD, DT::kFloat16>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, ldo, row0, drop);
  }
}

void expand(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Q, int64_t ldq, int64_t L, float scale,
            const void* base, DT bdt, int64_t ldb, void* out, DT odt, int64_t ldo, int64_t row0, const Drop* drop) {
  switch (bdt) {
    case DT::kFloat32:
      return expand_base<DT::kFloat32>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, odt, ldo, row0, drop);
    case DT::kBFloat16:
      return expand_base<DT::kBFloat16>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, odt, ldo, row0, drop);
    case DT::kFloat16:
      return expand_base<DT::kFloat16>(Z, ldz, rows, r, Q, ldq, L, scale, base, ldb, out, odt, ldo, row0, drop);
  }
}

// ---------------------------------------------------------------- outer: acc += Z^T X

template <int J, int LV>
LORA_EXT_BLOCK void outer_blk(const float* Z, int64_t ldz, const float* X, int64_t ldx, int64_t rows, int64_t nlast,
                              float* acc, int64_t lda) {
  reg a[J][LV];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < LV; ++v) a[j][v] = load_n<DT::kFloat32>(acc + j * lda + v * W, v == LV - 1 ? nlast : W);
  if (nlast >= W) {
    for (int64_t m = 0; m < rows; ++m) {
      reg x[LV];
      for (int v = 0; v < LV; ++v) x[v] = V::load(X + m * ldx + v * W);
      for (int j = 0; j < J; ++j) {
        const reg z = V::set1(Z[m * ldz + j]);
        for (int v = 0; v < LV; ++v) a[j][v] = V::fma(z, x[v], a[j][v]);
      }
    }
  } else {
    for (int64_t m = 0; m < rows; ++m) {
      reg x[LV];
      for (int v = 0; v < LV; ++v) x[v] = load_n<DT::kFloat32>(X + m * ldx + v * W, v == LV - 1 ? nlast : W);
      for (int j = 0; j < J; ++j) {
        const reg z = V::set1(Z[m * ldz + j]);
        for (int v = 0; v < LV; ++v) a[j][v] = V::fma(z, x[v], a[j][v]);
      }
    }
  }
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < LV; ++v) store_n<DT::kFloat32>(acc + j * lda + v * W, a[j][v], v == LV - 1 ? nlast : W);
}

// Block shape: 6 ranks x 2 vectors with 16 vector registers; 8 x 3 with 32 (AVX-512), so a
// rank-16 update streams X twice instead of three times. Each accumulator element is one FMA
// chain over m whatever the blocking, so the shape does not change the bits.
constexpr int kOuterJ = W >= 16 ? 8 : 6;
constexpr int kOuterLV = W >= 16 ? 3 : 2;

template <int J>
inline void outer_ranks(const float* Z, int64_t ldz, const float* X, int64_t ldx, int64_t rows, int64_t L, float* acc,
                        int64_t lda) {
  int64_t l = 0;
  for (; l + kOuterLV * W <= L; l += kOuterLV * W) outer_blk<J, kOuterLV>(Z, ldz, X + l, ldx, rows, W, acc + l, lda);
  for (; l < L; l += W) outer_blk<J, 1>(Z, ldz, X + l, ldx, rows, L - l, acc + l, lda);
}

void outer(const float* Z, int64_t ldz, const float* X, int64_t ldx, int64_t rows, int64_t r, int64_t L, float* acc,
           int64_t lda) {
  int64_t j = 0;
  for (; j + kOuterJ <= r; j += kOuterJ) outer_ranks<kOuterJ>(Z + j, ldz, X, ldx, rows, L, acc + j * lda, lda);
  const float* z = Z + j;
  float* a = acc + j * lda;
  switch (r - j) {
    case 7:
      outer_ranks<7>(z, ldz, X, ldx, rows, L, a, lda);
      break;
    case 6:
      outer_ranks<6>(z, ldz, X, ldx, rows, L, a, lda);
      break;
    case 5:
      outer_ranks<5>(z, ldz, X, ldx, rows, L, a, lda);
      break;
    case 4:
      outer_ranks<4>(z, ldz, X, ldx, rows, L, a, lda);
      break;
    case 3:
      outer_ranks<3>(z, ldz, X, ldx, rows, L, a, lda);
      break;
    case 2:
      outer_ranks<2>(z, ldz, X, ldx, rows, L, a, lda);
      break;
    case 1:
      outer_ranks<1>(z, ldz, X, ldx, rows, L, a, lda);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------- colsum: acc += sum over rows

void colsum(const float* X, int64_t ldx, int64_t rows, int64_t L, float* acc) {
  int64_t l = 0;
  for (; l + 4 * W <= L; l += 4 * W) {
    reg a[4];
    for (int v = 0; v < 4; ++v) a[v] = V::load(acc + l + v * W);
    for (int64_t m = 0; m < rows; ++m)
      for (int v = 0; v < 4; ++v) a[v] = V::add(a[v], V::load(X + m * ldx + l + v * W));
    for (int v = 0; v < 4; ++v) V::store(acc + l + v * W, a[v]);
  }
  for (; l < L; l += W) {
    const int64_t n = L - l;
    reg a = load_n<DT::kFloat32>(acc + l, n);
    for (int64_t m = 0; m < rows; ++m) a = V::add(a, load_n<DT::kFloat32>(X + m * ldx + l, n));
    store_n<DT::kFloat32>(acc + l, a, n);
  }
}

// ---------------------------------------------------------------- merge: out = base + fl(s * Z Q)
//
// The expand's arithmetic (every element: a chain of FMAs over j = 0 .. r-1 from zero, times s,
// plus base, rounded once into odt), with the [r, L] factor Q packed first by column blocks of
// 3W: block c holds Q[j, 3Wc + u] at Qp[(c r + j) 3W + u], zero past L. A block's r x 3W slice
// is then contiguous (the unpacked rows of Q sit L floats apart: at L = 4096 every one of them
// falls in the same L1 set). The rows go in blocks of kMergeRows (8): each block walks its rows
// from the first column to the last (8 sequential streams through W, which the hardware
// prefetcher follows), in column tiles whose packed panel is at most 256 KiB (all of Q at r = 16,
// L <= 4096: it stays in L2), kMergeBlockRows rows x 3 vectors at a time; a row's last block
// takes only the vectors its columns need (L = 1024 or 4096 end on one whole vector: the
// 3-vector block with masked loads cost ~10 % at L = 1024). Measured on an AVX-512 Xeon against
// 64-row blocks with 16 KiB (L1) panels: merge_ of 4096 x 4096 fp32 3.76 -> 3.59 ms (2 threads,
// 1.03 -> 0.97x MKL's addmm_), the expand at L = 1024 in L2 +10-20 %. W is read and written
// once; no temporary besides the packed Q.

constexpr int64_t kMergeRows = 8;
constexpr int kMergeBlockRows = W >= 16 ? 8 : 4;
constexpr int64_t kMergePanel = 65536;  // fp32 elements of packed Q per column tile (256 KiB)

// R rows x NV vectors of columns (NV = 3 but in the last block of a row, which takes the
// vectors its n columns need; FULL: n = NV W, else the last vector holds n - (NV - 1) W).
template <int R, int NV, bool FULL, DT BD, DT OD>
LORA_EXT_BLOCK void merge_blk(const float* Z, int64_t ldz, int64_t r, const float* qp, int64_t n, float scale,
                              const typename IO<BD>::T* base, int64_t ldb, typename IO<OD>::T* out, int64_t ldo,
                              int64_t pf_rows) {
  reg acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  for (int64_t j = 0; j < r; ++j) {
    reg q[NV];
    for (int v = 0; v < NV; ++v) q[v] = V::load(qp + j * 3 * W + v * W);
    for (int i = 0; i < R; ++i) {
      const reg z = V::set1(Z[i * ldz + j]);
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(z, q[v], acc[i][v]);
    }
  }
  // the same columns of the next rows (their lines, first to last byte)
  constexpr int64_t bsz = sizeof(typename IO<BD>::T);
  for (int64_t i = 0; i < pf_rows; ++i) {
    const char* p0 = reinterpret_cast<const char*>(base + (R + i) * ldb);
    const uintptr_t a0 = reinterpret_cast<uintptr_t>(p0) & ~uintptr_t(63);
    const uintptr_t a1 = reinterpret_cast<uintptr_t>(p0) + uintptr_t(NV * W * bsz - 1);
    for (uintptr_t a = a0; a <= a1; a += 64) __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
  }
  // every load of the block before its first store: rows ldb apart share their low 12 address
  // bits, and a load behind a store to the row above would wait on a false (4K-alias) dependency
  const reg s = V::set1(scale);
  constexpr int FV = FULL ? NV : NV - 1;  // full vectors
  const int64_t nlast = n - FV * W;       // columns of the partial last vector (not FULL)
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < FV; ++v) acc[i][v] = V::add(IO<BD>::load(base + i * ldb + v * W), V::mul(s, acc[i][v]));
    if constexpr (!FULL) acc[i][FV] = V::add(load_part<BD>(base + i * ldb + FV * W, nlast), V::mul(s, acc[i][FV]));
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < FV; ++v) IO<OD>::store(out + i * ldo + v * W, acc[i][v]);
    if constexpr (!FULL) store_part<OD>(out + i * ldo + FV * W, acc[i][FV], nlast);
  }
}

template <int R, DT BD, DT OD>
inline void merge_rows(const float* Z, int64_t ldz, int64_t r, const float* Qp, int64_t c0, int64_t c1, int64_t L,
                       float scale, const typename IO<BD>::T* base, int64_t ldb, typename IO<OD>::T* out, int64_t ldo,
                       int64_t pf_rows) {
  constexpr int64_t BW = 3 * W;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t l = c * BW;
    const float* qp = Qp + c * r * BW;
    const auto* b = base + l;
    auto* o = out + l;
    const int64_t n = L - l;
    if (n >= BW) {
      merge_blk<R, 3, true, BD, OD>(Z, ldz, r, qp, BW, scale, b, ldb, o, ldo, pf_rows);
    } else if (n % W == 0) {  // the last block, whole vectors (L = 1024: one): no partial loads
      if (n == W) merge_blk<R, 1, true, BD, OD>(Z, ldz, r, qp, n, scale, b, ldb, o, ldo, 0);
      if (n == 2 * W) merge_blk<R, 2, true, BD, OD>(Z, ldz, r, qp, n, scale, b, ldb, o, ldo, 0);
    } else if (n < W) {
      merge_blk<R, 1, false, BD, OD>(Z, ldz, r, qp, n, scale, b, ldb, o, ldo, 0);
    } else if (n < 2 * W) {
      merge_blk<R, 2, false, BD, OD>(Z, ldz, r, qp, n, scale, b, ldb, o, ldo, 0);
    } else {
      merge_blk<R, 3, false, BD, OD>(Z, ldz, r, qp, n, scale, b, ldb, o, ldo, 0);
    }
  }
}

template <DT BD, DT OD>
void merge_t(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Qp, int64_t L, float scale,
             const void* base_, int64_t ldb, void* out_, int64_t ldo) {
  const auto* base = static_cast<const typename IO<BD>::T*>(base_);
  auto* out = static_cast<typename IO<OD>::T*>(out_);
  constexpr int64_t BW = 3 * W;
  const int64_t nblk = (L + BW - 1) / BW;
  int64_t tile = kMergePanel / (r * BW);  // column blocks per tile
  if (tile < 1) tile = 1;
  for (int64_t m0 = 0; m0 < rows; m0 += kMergeRows) {
    const int64_t m1 = m0 + kMergeRows < rows ? m0 + kMergeRows : rows;
    for (int64_t c0 = 0; c0 < nblk; c0 += tile) {
      const int64_t c1 = c0 + tile < nblk ? c0 + tile : nblk;
      for (int64_t m = m0; m < m1;) {
        const float* z = Z + m * ldz;
        const auto* b = base + m * ldb;
        auto* o = out + m * ldo;
        const int64_t left = m1 - m;
        // kMergeBlockRows rows x 3 vectors of accumulators (8 with AVX-512's 32 registers, 4 with
        // 16), prefetching the row block's next rows of the same columns (with kMergeRows = 8 only
        // AVX2's first block of 4 has any: the 8 sequential row streams are left to the hardware
        // prefetcher); fewer rows at the end of the row block
        constexpr int64_t RB = kMergeBlockRows;
        if (left >= RB) {
          merge_rows<RB, BD, OD>(z, ldz, r, Qp, c0, c1, L, scale, b, ldb, o, ldo, left >= 2 * RB ? RB : left - RB);
          m += RB;
        } else if (RB > 4 && left >= 4) {
          merge_rows<4, BD, OD>(z, ldz, r, Qp, c0, c1, L, scale, b, ldb, o, ldo, 0);
          m += 4;
        } else if (left >= 2) {
          merge_rows<2, BD, OD>(z, ldz, r, Qp, c0, c1, L, scale, b, ldb, o, ldo, 0);
          m += 2;
        } else {
          merge_rows<1, BD, OD>(z, ldz, r, Qp, c0, c1, L, scale, b, ldb, o, ldo, 0);
          m += 1;
        }
      }
    }
  }
}

template <DT BD>
void merge_base(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Qp, int64_t L, float scale,
                const void* base, int64_t ldb, void* out, DT odt, int64_t ldo) {
  switch (odt) {
    case DT::kFloat32:
      return merge_t<BD, DT::kFloat32>(Z, ldz, rows, r, Qp, L, scale, base, ldb, out, ldo);
    case DT::kBFloat16:
      return merge_t<BD, DT::kBFloat16>(Z, ldz, rows, r, Qp, L, scale, base, ldb, out, ldo);
    case DT::kFloat16:
      return merge_t<BD, DT::kFloat16>(Z, ldz, rows, r, Qp, L, scale, base, ldb, out, ldo);
  }
}

void merge(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Qp, int64_t L, float scale,
           const void* base, DT bdt, int64_t ldb, void* out, DT odt, int64_t ldo) {
  switch (bdt) {
    case DT::kFloat32:
      return merge_base<DT::kFloat32>(Z, ldz, rows, r, Qp, L, scale, base, ldb, out, odt, ldo);
    case DT::kBFloat16:
      return merge_base<DT::kBFloat16>(Z, ldz, rows, r, Qp, L, scale, base, ldb, out, odt, ldo);
    case DT::kFloat16:
      return merge_base<DT::kFloat16>(Z, ldz, rows, r, Qp, L, scale, base, ldb, out, odt, ldo);
  }
}

// Qp = Q [r, L] (row stride ldq) packed by column blocks of 3W (see merge), zero padded.
void merge_pack(const float* Q, int64_t ldq, int64_t r, int64_t L, float* Qp) {
  constexpr int64_t BW = 3 * W;
  const int64_t nblk = (L + BW - 1) / BW;
  for (int64_t c = 0; c < nblk; ++c) {
    const int64_t l = c * BW, n = L - l < BW ? L - l : BW;
    for (int64_t j = 0; j < r; ++j) {
      float* d = Qp + (c * r + j) * BW;
      std::memcpy(d, Q + j * ldq + l, size_t(n) * sizeof(float));
      if (n < BW) std::memset(d + n, 0, size_t(BW - n) * sizeof(float));
    }
  }
}
