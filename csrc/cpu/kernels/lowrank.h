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
};

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

}  // namespace cpu
}  // namespace lora_ext
