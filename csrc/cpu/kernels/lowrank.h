// Fused CPU kernels for the rank-r products of LoRA and for merge, on raw
// pointers with strides (no ATen inside). One table of function pointers per
// instruction set; lowrank_{default,avx2,avx512}.cpp each compile the same
// templated loops (lowrank_impl.h) for their ISA, and dispatch.cpp picks the
// table at run time (ATen's CPU capability, LORA_EXT_CPU_KERNEL, or a forced
// variant from set_cpu_kernel).
//
// Everything accumulates in fp32. Matrices are row-major views: element (i, k)
// of a matrix with row stride ld lives at p[i * ld + k] (unit inner stride)
// unless a column stride is given. Inputs/outputs may be fp32, bf16 or fp16;
// the intermediate [rows, r] products and the accumulators are fp32.
//
// Dropout (dropout_hash.h): element (m, k) of the logical [M, K] branch input
// is kept iff dropout_keep(seed, m * K + k, threshold); the kernels zero the
// dropped elements (the 1/(1-p) factor is folded into the caller's scale).
#pragma once

#include <cstdint>
#include <string>

#include "../../host/dtype.h"

namespace lora_ext {
namespace cpu {

using DT = DType;  // the one kernel dtype enum (csrc/host/dtype.h); these kernels take fp32, bf16 and fp16

inline int64_t dt_size(DT d) { return d == DT::kFloat32 ? 4 : 2; }

struct Drop {
  uint64_t seed = 0;
  uint64_t threshold = 0;  // keep = hash >= threshold; < 2^32 whenever a kernel sees it (p < 1)
};

struct Kernels {
  const char* name;
  // Vector width in fp32 lanes (for tiling decisions of the drivers).
  int lanes;

  // dst[i, k] = keep(row0 + i, k) ? src[i * rs + k * cs] : 0, widened to fp32, for i < rows, k < cols
  // (mask index (row0 + i) * cols + k; drop == nullptr: no dropout). dst has row stride ldd.
  void (*stage)(const void* src, DT dt, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst, int64_t ldd,
                int64_t row0, const Drop* drop);

  // Z[m, j] = sum_k X[m, k] * P[j, k] for m < rows, j < r (the "shrink": x A^T or g B with P = B^T).
  void (*shrink)(const float* X, int64_t ldx, int64_t rows, int64_t K, const float* P, int64_t ldp, int64_t r, float* Z,
                 int64_t ldz);

  // out[m, l] = base[m, l] + keep(row0 + m, l) * fl(scale * sum_j Z[m, j] * Q[j, l]) for m < rows, l < L
  // (the "expand": y += s xa B^T with Q = B^T, dx += s mask (gb A) with Q = A, merge W + s B A with
  // Z = B, Q = A). Mask index (row0 + m) * L + l; drop == nullptr: no mask. base and out may alias
  // (same pointer, dtype and stride) for an in-place update; the result is rounded once into odt.
  void (*expand)(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Q, int64_t ldq, int64_t L,
                 float scale, const void* base, DT bdt, int64_t ldb, void* out, DT odt, int64_t ldo, int64_t row0,
                 const Drop* drop);

  // The same Z with the factor transposed, PT = P^T [K, r] (row stride r), for r a multiple of
  // `lanes` up to 8 vectors (1, 2, 3, 4, 6 or 8 of them), and r = 8 with 16 lanes; returns false
  // (nothing written) for any other r. rows = 0 writes nothing and answers whether r is taken. No horizontal sums: each
  // Z[m, j] is summed over k in an order set by k, K and r alone (chunks of k, each one or two interleaved FMA chains),
  // the same for every row.
  bool (*shrink_t)(const float* X, int64_t ldx, int64_t rows, int64_t K, const float* PT, int64_t r, float* Z,
                   int64_t ldz);

  // acc[j, l] += sum_m Z[m, j] * X[m, l] for j < r, l < L, m < rows (dA += gb^T xd, dB^T += xa^T g).
  void (*outer)(const float* Z, int64_t ldz, const float* X, int64_t ldx, int64_t rows, int64_t r, int64_t L,
                float* acc, int64_t lda);

  // acc[l] += sum_m X[m, l] (grad of the bias).
  void (*colsum)(const float* X, int64_t ldx, int64_t rows, int64_t L, float* acc);

  // The merge: the expand without mask (same arithmetic, same bits) on a factor packed by
  // merge_pack. Qp = Q [r, L] (row stride ldq) in column blocks of 3 * lanes: block c holds
  // Q[j, 3 lanes c + u] at Qp[(c r + j) 3 lanes + u], zero past L; merge_packed_size floats.
  void (*merge_pack)(const float* Q, int64_t ldq, int64_t r, int64_t L, float* Qp);
  // out[m, l] = base[m, l] + fl(scale * sum_j Z[m, j] * Q[j, l]) for m < rows, l < L, rounded
  // once into odt; base and out may alias (in place: W read and written once).
  void (*merge)(const float* Z, int64_t ldz, int64_t rows, int64_t r, const float* Qp, int64_t L, float scale,
                const void* base, DT bdt, int64_t ldb, void* out, DT odt, int64_t ldo);

  // Optional (nullptr where the CPU or the variant lacks it): the bf16 merge on AVX512-BF16 dot
  // products, for bf16 W (in and out) and factors that are bf16 values. Same sums as merge: every
  // product of two bf16 values is exact in fp32, and the pairs are laid out so that each
  // vdpbf16ps adds rank j before rank j + 1 (DAZ/FTZ aside: subnormal fp32 terms are flushed).
  // Zp = pack_pairs(Z [rows, r]), Qp = pack_pairs_blocked(Q [r, L]) (below); rp = (r + 1) / 2.
  void (*merge_bf16)(const uint32_t* Zp, int64_t rows, int64_t rp, const uint32_t* Qp, int64_t L, float scale,
                     const uint16_t* base, int64_t ldb, uint16_t* out, int64_t ldo);

  // Optional: the same bf16 merge (same operands, same epilogue W + fl(s * sum) rounded once) on
  // AMX tiles (tdpbf16ps), set only where the CPU has AMX-BF16 and the OS grants the tile state.
  // Not the same bits as merge_bf16: AMX adds a tile's products with more than fp32 precision
  // before its one rounding (sum_j Z[m, j] Q[j, l] nearer the exact sum; the lowest bits of the
  // fp32 sum, hence now and then the bf16 result, differ). Used only while amx_enabled().
  void (*merge_bf16_amx)(const uint32_t* Zp, int64_t rows, int64_t rp, const uint32_t* Qp, int64_t L, float scale,
                         const uint16_t* base, int64_t ldb, uint16_t* out, int64_t ldo) = nullptr;
};

// The bf16 merge's operand layouts (portable code, any variant may pack them).
constexpr int64_t kBf16PairBlock = 48;  // columns per packed block: 3 vectors of 16 fp32 lanes

// The bf16 of a float that is a bf16 value (its high half).
inline uint32_t bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u >> 16;
}
// One 32-bit lane of vdpbf16ps holding ranks (j, j + 1): j in the high half (added first), j + 1 low.
inline uint32_t bf16_pair(float first, float second) { return (bf16_bits(first) << 16) | bf16_bits(second); }

// Zp[m * rp + p] = pair(Z[m, 2p], Z[m, 2p + 1]) (0 past r), for m < rows.
inline void pack_pairs(const float* Z, int64_t ldz, int64_t rows, int64_t r, uint32_t* Zp) {
  const int64_t rp = (r + 1) / 2;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t p = 0; p < rp; ++p)
      Zp[m * rp + p] = bf16_pair(Z[m * ldz + 2 * p], 2 * p + 1 < r ? Z[m * ldz + 2 * p + 1] : 0.0f);
}
inline int64_t pairs_blocked_size(int64_t r, int64_t L) {
  return (L + kBf16PairBlock - 1) / kBf16PairBlock * kBf16PairBlock * ((r + 1) / 2);
}
// Qp[(c rp + p) 48 + u] = pair(Q[2p, 48c + u], Q[2p + 1, 48c + u]) (0 past r and past L).
inline void pack_pairs_blocked(const float* Q, int64_t ldq, int64_t r, int64_t L, uint32_t* Qp) {
  const int64_t rp = (r + 1) / 2, nblk = (L + kBf16PairBlock - 1) / kBf16PairBlock;
  for (int64_t c = 0; c < nblk; ++c)
    for (int64_t p = 0; p < rp; ++p)
      for (int64_t u = 0; u < kBf16PairBlock; ++u) {
        const int64_t l = c * kBf16PairBlock + u;
        const float a = l < L ? Q[2 * p * ldq + l] : 0.0f;
        const float b = l < L && 2 * p + 1 < r ? Q[(2 * p + 1) * ldq + l] : 0.0f;
        Qp[(c * rp + p) * kBf16PairBlock + u] = bf16_pair(a, b);
      }
}

inline int64_t merge_packed_size(const Kernels& k, int64_t r, int64_t L) {
  const int64_t bw = 3 * int64_t(k.lanes);
  return (L + bw - 1) / bw * bw * r;
}

const Kernels& kernels_default();
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();

// Largest rank the fused kernels take; larger ranks use the ATen path.
constexpr int64_t kMaxFusedRank = 128;

// Variant selection (dispatch.cpp). Names: "default", "avx2", "avx512", and "aten" (the fused
// kernels off: the ops use the ATen-GEMM implementation). The initial choice is
// LORA_EXT_CPU_KERNEL if set (also "auto"), else "auto": the best variant the CPU runs, capped
// by ATen's own capability (ATEN_CPU_CAPABILITY=default|avx2|avx512 as ATen reads it).
//
// The fused kernels in use, or nullptr when the ATen path is selected.
const Kernels* active_kernels();
// Name of the active variant ("default", "avx2", "avx512" or "aten").
std::string active_kernel_name();
// Force a variant ("auto" re-resolves the automatic choice). Throws for an unknown name or a
// variant this CPU cannot run.
void set_kernel(const std::string& name);
// Whether this CPU can run the named variant ("aten" and "default" always can).
bool cpu_can_run(const std::string& name);

// AMX for the bf16 merge (Kernels::merge_bf16_amx): whether this CPU and OS allow it, and whether
// it is in use (initially: allowed and LORA_EXT_CPU_AMX is not "0"; set_amx(false) turns it off,
// set_amx(true) throws where it is not allowed).
bool cpu_has_amx();
bool amx_enabled();
void set_amx(bool on);

// Where the bf16 base GEMMs (x W^T, g W, g^T x) of the fused CPU path run. "fp32": on fp32 chunks
// widened from bf16 (MKL's fp32 GEMM), the low-rank term added to the fp32 chunk, each output
// rounded once. "native": torch's bf16 GEMM (oneDNN, AMX tiles where the CPU has AMX-BF16, about
// 4x the fp32 GEMM there), its bf16 result widened and the low-rank term added in fp32, rounded
// again: y and grad_x are rounded twice (grad_W once), and the auto strategy never merges (a
// merged W_eff would be fp32 or a rounded bf16). "auto" (the initial mode, or LORA_EXT_CPU_BF16_GEMM
// = auto | native | fp32): native where it is fast, that is AMX enabled (see above), the avx512
// variant active (a forced avx2 or default variant behaves as on a CPU without AMX), torch's
// oneDNN enabled (torch.backends.mkldnn.enabled) and ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA, if set,
// naming an AMX ISA (or ALL). Without AMX (AVX512-BF16 alone, AVX-512, AVX2) torch's bf16 GEMM was
// measured 1.5x to 340x slower than the fp32 one (docs/design.md). fp16 always takes the fp32 way.
bool bf16_gemm_native();
// The mode set ("auto", "native" or "fp32").
std::string bf16_gemm_mode();
// Set the mode; throws ValueError for another name.
void set_bf16_gemm(const std::string& mode);

}  // namespace cpu
}  // namespace lora_ext
