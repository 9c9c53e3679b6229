// The CPU ops on the fused low-rank kernels (see lora_cpu_fused.h, kernels/lowrank.h).
//
// Forward, shrink/expand: the base GEMM (ATen) writes y; then one pass over row steps
// of x computes xa = drop(x) A^T from the step while it is in cache (the dropout mask is
// generated in the same pass from the hash) and adds s * xa B^T into y (fp32), or into
// the fp32 GEMM chunk before the single rounding to bf16/fp16; with the native bf16 GEMM
// (cpu::bf16_gemm_native()) the base GEMM writes bf16 y and the term is added to it in place
// (read, added in fp32, rounded again), and the backward's g W likewise.
// Backward: one pass over row steps of g and x: gb = g B, dB^T += xa^T g, dA += gb^T
// drop(x), grad_bias += column sums of g, and (shrink/expand) dx += s mask (gb A) into
// the base GEMM's dx. Each thread owns one block of consecutive steps and its own fp32
// partial dA / dB / dbias, summed in block order at the end (deterministic for a given
// thread count).
// Merge (and the merge-on-the-fly W_eff): W + s B A tile by tile in registers, reading and
// writing W once, rounded once.
//
// Memory: no [M, N] temporary besides the outputs; per-thread scratch is a few row steps
// plus the [r, K] / [r, N] partials.
#include "lora_cpu_fused.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../dropout_hash.h"
#include "../host/common.h"
#include "../host/strategy.h"
#include "kernels/lowrank.h"

namespace lora_ext {
namespace {

using at::Tensor;
using cpu::Drop;
using cpu::DT;
using cpu::Kernels;

DT dt_of(at::ScalarType s) {
  const DT d = kernel_dtype(s);
  TORCH_INTERNAL_ASSERT(d != DT::kFloat64, "lora_ext: the fused CPU kernels take fp32, bf16 and fp16");
  return d;
}

// A 2-D view: element (i, k) at p + (i * rs + k * cs) * element size.
struct View {
  const char* p;
  DT dt;
  int64_t rs, cs;
  const char* row(int64_t i) const { return p + i * rs * cpu::dt_size(dt); }
};

View view_of(const Tensor& t) {
  return {static_cast<const char*>(t.data_ptr()), dt_of(t.scalar_type()), t.stride(0), t.stride(1)};
}

// Rows of one step of the fused passes: about 32K fp32 elements (128 KiB) per matrix, so a
// step of x and one of g, the per-thread partials and the factors share the L2 cache; a
// multiple of 8, the kernels' row block (K = 1376 gave 23 rows: 2 blocks and 7 tail rows).
int64_t step_rows(int64_t width) {
  const int64_t rows = (int64_t(1) << 15) / std::max<int64_t>(width, 1);
  return std::clamp<int64_t>((rows + 4) / 8 * 8, 8, 256);
}

// Rows per chunk of the bf16/fp16 base GEMM (as lora_cpu.cpp's chunk_rows).
int64_t gemm_chunk_rows(int64_t M, int64_t width) {
  const int64_t rows = (int64_t(1) << 19) / std::max<int64_t>(width, 1);
  return std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(rows, 64)));
}

struct DropoutArgs {
  bool on = false;
  bool branch_zero = false;
  double factor = 1.0;
  Drop d;
  const Drop* ptr() const { return on ? &d : nullptr; }
};

DropoutArgs make_dropout(double p, const std::optional<Tensor>& seed) {
  DropoutArgs a;
  if (p <= 0.0) return a;
  a.on = p < 1.0;
  a.branch_zero = p >= 1.0;
  a.factor = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  a.d.seed = static_cast<uint64_t>(seed->reshape({}).item<int64_t>());
  a.d.threshold = dropout_threshold(p);
  return a;
}

// out[N, K] = weight + scale * B32 A32 (fp32 factors, contiguous), rounded once into out's dtype.
// factors_bf16: every element of A32 and B32 is a bf16 value (the factors came in bf16).
void merge_into(const Kernels& kr, const Tensor& weight, const Tensor& A32, const Tensor& B32, float scale, Tensor& out,
                bool factors_bf16 = false) {
  const int64_t N = weight.size(0), K = weight.size(1), r = A32.size(0);
  if (N == 0 || K == 0) return;
  Tensor Z, Q;
  int64_t rows, L, ldb, ldo;
  if (weight.stride(1) == 1 && out.stride(1) == 1) {  // row-major: rows of W
    Z = B32, Q = A32, rows = N, L = K, ldb = weight.stride(0), ldo = out.stride(0);
  } else if (weight.stride(0) == 1 && out.stride(0) == 1) {  // column-major: rows of W^T = W^T + s A^T B^T
    Z = A32.t().contiguous(), Q = B32.t().contiguous(), rows = K, L = N, ldb = weight.stride(1), ldo = out.stride(1);
  } else {
    Tensor tmp = at::empty({N, K}, out.options());
    merge_into(kr, weight.contiguous(), A32, B32, scale, tmp, factors_bf16);
    out.copy_(tmp);
    return;
  }
  const float* zp = Z.data_ptr<float>();
  const DT bdt = dt_of(weight.scalar_type()), odt = dt_of(out.scalar_type());
  const char* bp = static_cast<const char*>(weight.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t bsz = cpu::dt_size(bdt), osz = cpu::dt_size(odt);
  // Row blocks of 64 (8 of the kernel's row blocks) handed out dynamically: on a shared machine a static
  // half per thread waits for whichever thread the OS parks (measured: 2 threads 2.6x slower than
  // 1 for bf16 at load 4); with a counter the running threads take the blocks a parked one leaves.
  constexpr int64_t kBlock = 64;
  const int64_t nblocks = (rows + kBlock - 1) / kBlock;
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), nblocks);
  const auto bf16_kernel = kr.merge_bf16_amx != nullptr && cpu::amx_enabled() ? kr.merge_bf16_amx : kr.merge_bf16;
  if (factors_bf16 && bf16_kernel != nullptr && bdt == DT::kBFloat16 && odt == DT::kBFloat16) {
    // bf16 W and bf16 factors: the AMX or AVX512-BF16 dot-product kernel (kernels/lowrank.h: merge_bf16).
    const int64_t rp = (r + 1) / 2;
    std::vector<uint32_t> zpairs(static_cast<size_t>(rows * rp)),
        qpairs(static_cast<size_t>(cpu::pairs_blocked_size(r, L)));
    cpu::pack_pairs(zp, r, rows, r, zpairs.data());
    cpu::pack_pairs_blocked(Q.data_ptr<float>(), L, r, L, qpairs.data());
    const auto* b16 = reinterpret_cast<const uint16_t*>(bp);
    auto* o16 = reinterpret_cast<uint16_t*>(op);
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      for (int64_t blk = next.fetch_add(1); blk < nblocks; blk = next.fetch_add(1)) {
        const int64_t m0 = blk * kBlock, mc = std::min(kBlock, rows - m0);
        bf16_kernel(zpairs.data() + m0 * rp, mc, rp, qpairs.data(), L, scale, b16 + m0 * ldb, ldb, o16 + m0 * ldo, ldo);
      }
    });
    return;
  }
  // Q packed once by column blocks (kernels/lowrank.h: merge_pack), shared by the threads.
  std::vector<float> packed(static_cast<size_t>(cpu::merge_packed_size(kr, r, L)));
  kr.merge_pack(Q.data_ptr<float>(), L, r, L, packed.data());
  const float* qp = packed.data();
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t blk = next.fetch_add(1); blk < nblocks; blk = next.fetch_add(1)) {
      const int64_t m0 = blk * kBlock, mc = std::min(kBlock, rows - m0);
      kr.merge(zp + m0 * r, r, mc, r, qp, L, scale, bp + m0 * ldb * bsz, bdt, ldb, op + m0 * ldo * osz, odt, ldo);
    }
  });
}

Tensor merged_fp32(const Kernels& kr, const Tensor& weight, const Tensor& A32, const Tensor& B32, double scale) {
  Tensor out = at::empty(weight.sizes(), weight.options().dtype(at::kFloat));
  merge_into(kr, weight, A32, B32, static_cast<float>(scale), out);
  return out;
}

// Z [rows, r] = X P^T (P [r, K]) through shrink_t on PT = P^T [K, r] when given and r suits it
// (r a multiple of the vector width, or 8 with AVX-512: no horizontal sums), else through shrink on P.
inline void shrink_any(const Kernels& kr, const float* X, int64_t ldx, int64_t rows, int64_t K, const float* P,
                       const float* PT, int64_t r, float* Z) {
  if (PT != nullptr && kr.shrink_t(X, ldx, rows, K, PT, r, Z, r)) return;
  kr.shrink(X, ldx, rows, K, P, K, r, Z, r);
}

// Whether shrink_t takes rank r (then the callers build P^T): asked of the kernel itself, with no rows.
inline bool wants_shrink_t(const Kernels& kr, int64_t r) {
  return kr.shrink_t(nullptr, 0, 0, 0, nullptr, r, nullptr, 0);
}

// Q [r, L] packed for kr.merge when `rows` rows will be expanded against it (empty: expand from Q).
std::vector<float> pack_for_expand(const Kernels& kr, const float* Q, int64_t r, int64_t L, int64_t rows) {
  constexpr int64_t kPackMinRows = 16;  // below this, packing costs more than the aliasing
  if (rows < kPackMinRows) return {};
  std::vector<float> packed(static_cast<size_t>(cpu::merge_packed_size(kr, r, L)));
  kr.merge_pack(Q, L, r, L, packed.data());
  return packed;
}

// y[m, :] = base[m, :] + scale * (drop(x[m, :]) A^T) B^T for m < M (x rows row0 + m of the
// logical input, for the dropout mask); BT = B^T [r, N] fp32 contiguous, A [r, K].
// xa_out (or nullptr): also keep xa = drop(x) A^T (the 0/1 mask, no 1/(1-p)) there, [M, r]
// contiguous, for the backward. out == nullptr: only that (no expand).
void lowrank_forward(const Kernels& kr, const View& x, int64_t M, int64_t K, int64_t row0, const float* A,
                     const float* AT, int64_t r, const float* BT, int64_t N, float scale, const Drop* drop,
                     const void* base, DT bdt, int64_t ldb, void* out, DT odt, int64_t ldo, float* xa_out = nullptr) {
  const bool direct = x.dt == DT::kFloat32 && x.cs == 1 && drop == nullptr;
  const int64_t step = step_rows(K);
  const int64_t nsteps = (M + step - 1) / step;
  const int64_t osz = cpu::dt_size(odt), bsz = cpu::dt_size(bdt);
  // B^T packed once by column blocks for the merge kernel (the expand's arithmetic and bits on a
  // factor whose r x tile slice is contiguous: unpacked, its rows sit N floats apart, at N = 1024
  // all in one L1 set); a call of a few rows expands from B^T directly.
  const std::vector<float> packed = out != nullptr ? pack_for_expand(kr, BT, r, N, M) : std::vector<float>();
  at::parallel_for(0, nsteps, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> xbuf(direct ? 0 : step * K), xa_buf(xa_out != nullptr ? 0 : step * r);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t m0 = s * step, mc = std::min(step, M - m0);
      const float* X = reinterpret_cast<const float*>(x.row(m0));
      int64_t ldx = x.rs;
      if (!direct) {
        kr.stage(x.row(m0), x.dt, x.rs, x.cs, mc, K, xbuf.data(), K, row0 + m0, drop);
        X = xbuf.data(), ldx = K;
      }
      float* xa = xa_out != nullptr ? xa_out + m0 * r : xa_buf.data();
      shrink_any(kr, X, ldx, mc, K, A, AT, r, xa);
      if (out == nullptr) continue;
      if (!packed.empty()) {
        kr.merge(xa, r, mc, r, packed.data(), N, scale, static_cast<const char*>(base) + m0 * ldb * bsz, bdt, ldb,
                 static_cast<char*>(out) + m0 * ldo * osz, odt, ldo);
      } else {
        kr.expand(xa, r, mc, r, BT, N, N, scale, static_cast<const char*>(base) + m0 * ldb * bsz, bdt, ldb,
                  static_cast<char*>(out) + m0 * ldo * osz, odt, ldo, 0, nullptr);
      }
    }
  });
}

struct BackwardPass {
  View g, x;
  int64_t M = 0, K = 0, N = 0, r = 0, row0 = 0;
  const float* A = nullptr;   // [r, K]
  const float* AT = nullptr;  // A^T [K, r] or nullptr (shrink_t)
  const float* B = nullptr;   // [N, r] = (B^T)^T, used with AT (shrink_t)
  const float* BT = nullptr;  // [r, N]
  const Drop* drop = nullptr;
  // xa = drop(x) A^T [M, r] contiguous as the forward kept it (lora_linear_xa), or nullptr: computed here
  const float* xa_saved = nullptr;
  bool need_a = false, need_b = false, need_bias = false;
  // low-rank dx term (dx_out == nullptr: none): dx_out = dx_base + mask * dx_scale * (gb A)
  // (dx_base of dtype dx_bdt; it may be dx_out itself)
  const void* dx_base = nullptr;
  DT dx_bdt = DT::kFloat32;
  int64_t dx_ldb = 0;
  void* dx_out = nullptr;
  DT dx_dt = DT::kFloat32;
  int64_t dx_ldo = 0;
  float dx_scale = 0.0f;
  // accumulators, added to: dA [r, K], dB^T [r, N], dbias [N]
  float* acc_a = nullptr;
  float* acc_bt = nullptr;
  float* acc_bias = nullptr;

  bool any() const { return need_a || need_b || need_bias || dx_out != nullptr; }
};

void lowrank_backward(const Kernels& kr, const BackwardPass& a) {
  const int64_t M = a.M, K = a.K, N = a.N, r = a.r;
  if (M == 0 || !a.any()) return;
  const bool shrink_x = a.need_b && a.xa_saved == nullptr;
  const bool want_x = a.need_a || shrink_x;
  const bool want_gb = a.need_a || a.dx_out != nullptr;
  const bool x_direct = a.x.dt == DT::kFloat32 && a.x.cs == 1 && a.drop == nullptr;
  const bool g_direct = a.g.dt == DT::kFloat32 && a.g.cs == 1;
  const int64_t step = step_rows(std::max(K, N));
  const int64_t nsteps = (M + step - 1) / step;
  const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nsteps));
  // per-block partial sums, reduced below in block order; one block adds to the accumulators directly
  const bool direct = nblk == 1;
  std::vector<float> pa(a.need_a && !direct ? nblk * r * K : 0, 0.0f), pb(a.need_b && !direct ? nblk * r * N : 0, 0.0f);
  std::vector<float> pbias(a.need_bias && !direct ? nblk * N : 0, 0.0f);
  float* const part_a = direct ? a.acc_a : pa.data();
  float* const part_b = direct ? a.acc_bt : pb.data();
  float* const part_bias = direct ? a.acc_bias : pbias.data();
  const int64_t dx_osz = cpu::dt_size(a.dx_dt), dx_bsz = cpu::dt_size(a.dx_bdt);
  // the dx term without a mask through the merge kernel on A packed once (see lowrank_forward)
  const std::vector<float> packed_a =
      a.dx_out != nullptr && a.drop == nullptr ? pack_for_expand(kr, a.A, r, K, M) : std::vector<float>();
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xbuf(want_x && !x_direct ? step * K : 0), gbuf(g_direct ? 0 : step * N);
    std::vector<float> xa_buf(shrink_x ? step * r : 0), gb(want_gb ? step * r : 0);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t s = nsteps * b / nblk; s < nsteps * (b + 1) / nblk; ++s) {
        const int64_t m0 = s * step, mc = std::min(step, M - m0);
        const float* G = reinterpret_cast<const float*>(a.g.row(m0));
        int64_t ldg = a.g.rs;
        if (!g_direct) {
          kr.stage(a.g.row(m0), a.g.dt, a.g.rs, a.g.cs, mc, N, gbuf.data(), N, 0, nullptr);
          G = gbuf.data(), ldg = N;
        }
        const float* X = reinterpret_cast<const float*>(a.x.row(m0));
        int64_t ldx = a.x.rs;
        if (want_x && !x_direct) {
          kr.stage(a.x.row(m0), a.x.dt, a.x.rs, a.x.cs, mc, K, xbuf.data(), K, a.row0 + m0, a.drop);
          X = xbuf.data(), ldx = K;
        }
        // Both shrinks first: each reads its chunk row by row (sequential streams the hardware
        // prefetches) the first time it is touched; the outer products, which walk the chunk in
        // column strips (rows 4 KiB apart at K = 1024), then find it in L2.
        const float* xa = a.xa_saved != nullptr ? a.xa_saved + m0 * r : xa_buf.data();
        if (shrink_x) shrink_any(kr, X, ldx, mc, K, a.A, a.AT, r, xa_buf.data());
        if (want_gb) shrink_any(kr, G, ldg, mc, N, a.BT, a.AT != nullptr ? a.B : nullptr, r, gb.data());
        if (a.need_b) kr.outer(xa, r, G, ldg, mc, r, N, part_b + b * r * N, N);
        if (a.need_a) kr.outer(gb.data(), r, X, ldx, mc, r, K, part_a + b * r * K, K);
        if (a.need_bias) kr.colsum(G, ldg, mc, N, part_bias + b * N);
        if (a.dx_out && !packed_a.empty()) {
          kr.merge(gb.data(), r, mc, r, packed_a.data(), K, a.dx_scale,
                   static_cast<const char*>(a.dx_base) + m0 * a.dx_ldb * dx_bsz, a.dx_bdt, a.dx_ldb,
                   static_cast<char*>(a.dx_out) + m0 * a.dx_ldo * dx_osz, a.dx_dt, a.dx_ldo);
        } else if (a.dx_out) {
          kr.expand(gb.data(), r, mc, r, a.A, K, K, a.dx_scale,
                    static_cast<const char*>(a.dx_base) + m0 * a.dx_ldb * dx_bsz, a.dx_bdt, a.dx_ldb,
                    static_cast<char*>(a.dx_out) + m0 * a.dx_ldo * dx_osz, a.dx_dt, a.dx_ldo, a.row0 + m0, a.drop);
        }
      }
    }
  });
  auto reduce = [nblk](float* acc, const std::vector<float>& parts, int64_t n) {
    for (int64_t b = 0; b < nblk; ++b) {
      const float* p = parts.data() + b * n;
      for (int64_t i = 0; i < n; ++i) acc[i] += p[i];
    }
  };
  if (direct) return;
  if (a.need_a) reduce(a.acc_a, pa, r * K);
  if (a.need_b) reduce(a.acc_bt, pb, r * N);
  if (a.need_bias) reduce(a.acc_bias, pbias, N);
}

// dst[c, i] = scale * src[i, c] for a row-major src [rows, cols] (dst [cols, rows]), in 16 x 16
// tiles so that the reads and the writes of a tile stay in L1 (row by row, the writes of an
// A [16, 4096] -> [4096, 16] transpose went 64 bytes apart and took most of a call at M = 8).
void transpose_into(const float* src, int64_t rows, int64_t cols, float* dst, float scale = 1.0f) {
  constexpr int64_t kT = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kT) {
    const int64_t i1 = std::min(rows, i0 + kT);
    for (int64_t c0 = 0; c0 < cols; c0 += kT) {
      const int64_t c1 = std::min(cols, c0 + kT);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = i0; i < i1; ++i) dst[c * rows + i] = src[i * cols + c] * scale;
    }
  }
}

// The transpose [cols, rows] of a contiguous fp32 [rows, cols] (B^T of B [N, r], A^T of A [r, K])
// into a plain buffer (no ATen op: at M = 1 the dispatcher work of t().contiguous() costs more
// than the copy).
std::vector<float> transposed(const Tensor& t32) {
  const int64_t rows = t32.size(0), cols = t32.size(1);
  std::vector<float> out(static_cast<size_t>(rows * cols));
  transpose_into(t32.data_ptr<float>(), rows, cols, out.data());
  return out;
}

View offset_rows(View v, int64_t m0) {
  v.p = v.row(m0);
  return v;
}

}  // namespace

bool fused_cpu_kernels_apply(at::ScalarType dtype, int64_t rank) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (rank > cpu::kMaxFusedRank) return false;
  return cpu::active_kernels() != nullptr;
}

bool native_bf16_gemm(const Tensor& x, const Tensor& weight, int64_t rank) {
  return x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
         fused_cpu_kernels_apply(at::kBFloat16, rank) && cpu::bf16_gemm_native();
}

Tensor lora_linear_cpu_fused(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                             const std::optional<Tensor>& dropout_seed, int64_t strategy, Tensor* xa_out) {
  const Kernels& kr = *cpu::active_kernels();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  Tensor y = at::empty({M, N}, x.options());
  if (xa_out != nullptr) *xa_out = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (M == 0) return y;
  const bool lowp = x.scalar_type() != at::kFloat;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool native_gemm = native_bf16_gemm(x, weight, r);
  const bool merge =
      resolve_strategy(c10::DeviceType::CPU, M, N, K, x.element_size(), dropout_p, strategy, native_gemm).merge_forward;
  const DropoutArgs drop = make_dropout(dropout_p, dropout_seed);
  const float branch_scale = static_cast<float>(scale * drop.factor);
  const Tensor A32 = lora_A.to(at::kFloat).contiguous(), B32 = lora_B.to(at::kFloat).contiguous();
  const bool branch = !merge && !drop.branch_zero;
  const bool want_xa = xa_out != nullptr && !drop.branch_zero;  // p = 1: xa is 0
  float* const xa_ptr = want_xa ? xa_out->data_ptr<float>() : nullptr;
  if (xa_out != nullptr && !want_xa) xa_out->zero_();
  const std::vector<float> BT32 = branch ? transposed(B32) : std::vector<float>();
  const std::vector<float> AT32 = (branch || want_xa) && wants_shrink_t(kr, r) ? transposed(A32) : std::vector<float>();
  const float* at_ptr = AT32.empty() ? nullptr : AT32.data();
  // the merged forward keeps xa with a shrink-only pass over x
  if (want_xa && !branch) {
    lowrank_forward(kr, view_of(x), M, K, 0, A32.data_ptr<float>(), at_ptr, r, nullptr, N, 0.0f, drop.ptr(), nullptr,
                    DT::kFloat32, 0, nullptr, DT::kFloat32, 0, xa_ptr);
  }

  if (!lowp) {
    const Tensor W = merge ? merged_fp32(kr, weight, A32, B32, scale) : weight;
    if (has_bias) {
      at::addmm_out(y, *bias, x, W.t());
    } else {
      at::mm_out(y, x, W.t());
    }
    if (!branch) return y;
    lowrank_forward(kr, view_of(x), M, K, 0, A32.data_ptr<float>(), at_ptr, r, BT32.data(), N, branch_scale, drop.ptr(),
                    y.data_ptr(), DT::kFloat32, N, y.data_ptr(), DT::kFloat32, N, xa_ptr);
    return y;
  }

  const View xv = view_of(x);
  const DT odt = dt_of(x.scalar_type());
  const int64_t rows = gemm_chunk_rows(M, std::max(K, N));
  if (native_gemm && !merge) {
    // bf16 base GEMM natively (oneDNN, AMX) into y; then the branch added in fp32 to each rounded
    // element of y, in place, and the sum rounded into y again.
    if (has_bias) {
      at::addmm_out(y, *bias, x, weight.t());
    } else {
      at::mm_out(y, x, weight.t());
    }
    if (!branch) return y;
    lowrank_forward(kr, xv, M, K, 0, A32.data_ptr<float>(), at_ptr, r, BT32.data(), N, branch_scale, drop.ptr(),
                    y.data_ptr(), odt, N, y.data_ptr(), odt, N, xa_ptr);
    return y;
  }

  // bf16 / fp16: the base GEMM in fp32 chunk by chunk; the branch is added to the fp32 chunk
  // and the sum rounded once into y.
  const Tensor W = merge ? merged_fp32(kr, weight, A32, B32, scale) : weight.to(at::kFloat);
  const Tensor bias_acc = has_bias ? bias->to(at::kFloat) : Tensor();
  for (int64_t m0 = 0; m0 < M; m0 += rows) {
    const int64_t mc = std::min(rows, M - m0);
    const Tensor x_c = x.narrow(0, m0, mc).to(at::kFloat);
    Tensor out = has_bias ? at::addmm(bias_acc, x_c, W.t()) : at::mm(x_c, W.t());
    Tensor y_c = y.narrow(0, m0, mc);
    if (!branch) {
      y_c.copy_(out);
      continue;
    }
    out = out.contiguous();
    lowrank_forward(kr, offset_rows(xv, m0), mc, K, m0, A32.data_ptr<float>(), at_ptr, r, BT32.data(), N, branch_scale,
                    drop.ptr(), out.data_ptr(), DT::kFloat32, N, y_c.data_ptr(), odt, N,
                    xa_ptr != nullptr ? xa_ptr + m0 * r : nullptr);
  }
  return y;
}

GradTuple lora_linear_backward_cpu_fused(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                         const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                                         const std::optional<Tensor>& dropout_seed, int64_t strategy,
                                         std::array<bool, 5> output_mask, const Tensor* xa) {
  const Kernels& kr = *cpu::active_kernels();
  const auto [need_x, need_w, need_bias, need_a, need_b] = output_mask;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const bool lowp = x.scalar_type() != at::kFloat;
  const DropoutArgs drop = make_dropout(dropout_p, dropout_seed);
  const bool branch = !drop.branch_zero;
  const float branch_scale = static_cast<float>(scale * drop.factor);
  const bool native_gemm = native_bf16_gemm(x, weight, r);
  const bool merge_dx =
      need_x && branch &&
      resolve_strategy(c10::DeviceType::CPU, M, N, K, x.element_size(), dropout_p, strategy, native_gemm)
          .merge_backward;
  const bool lora_x_term = need_x && branch && !merge_dx;
  const Tensor A32 = lora_A.to(at::kFloat).contiguous(), B32 = lora_B.to(at::kFloat).contiguous();
  // g B from B itself through shrink_t (with x A^T on A^T), else from B^T through shrink: one of the two
  const bool use_t = wants_shrink_t(kr, r);
  const std::vector<float> AT32 = use_t ? transposed(A32) : std::vector<float>();
  const std::vector<float> BT32 = use_t ? std::vector<float>() : transposed(B32);
  const auto f32 = x.options().dtype(at::kFloat);

  auto empty = [&] { return at::empty({0}, x.options()); };
  Tensor grad_x = need_x ? at::empty({M, K}, x.options()) : empty();
  Tensor grad_w = empty(), grad_bias = empty();
  // fp32 accumulators of dA [r, K] and dB^T [r, N] (plain buffers), of dbias [N]
  std::vector<float> acc_a(need_a ? static_cast<size_t>(r * K) : 0, 0.0f);
  std::vector<float> acc_bt(need_b ? static_cast<size_t>(r * N) : 0, 0.0f);
  Tensor acc_bias = need_bias ? at::zeros({N}, f32) : Tensor();

  // bf16 base GEMMs natively (oneDNN, AMX) unless a forced merge needs the fp32 W_eff
  const bool native = native_gemm && !merge_dx;
  Tensor W_dx;
  if (need_x && M > 0 && !native) {
    W_dx = merge_dx ? merged_fp32(kr, weight, A32, B32, scale) : (lowp ? weight.to(at::kFloat) : weight);
  }

  BackwardPass pass;
  pass.K = K, pass.N = N, pass.r = r;
  pass.A = A32.data_ptr<float>(), pass.BT = use_t ? nullptr : BT32.data();
  pass.AT = AT32.empty() ? nullptr : AT32.data(), pass.B = B32.data_ptr<float>();
  pass.drop = drop.ptr();
  const Tensor xa32 = xa != nullptr && need_b && branch ? xa->contiguous() : Tensor();
  pass.xa_saved = xa32.defined() ? xa32.data_ptr<float>() : nullptr;
  pass.need_a = need_a && branch, pass.need_b = need_b && branch, pass.need_bias = need_bias;
  pass.acc_a = need_a ? acc_a.data() : nullptr;
  pass.acc_bt = need_b ? acc_bt.data() : nullptr;
  pass.acc_bias = need_bias ? acc_bias.data_ptr<float>() : nullptr;
  pass.dx_scale = branch_scale;

  if (!lowp) {
    if (need_x && M > 0) at::mm_out(grad_x, grad_out, W_dx);
    if (need_w) grad_w = at::mm(grad_out.t(), x);
    pass.g = view_of(grad_out), pass.x = view_of(x), pass.M = M, pass.row0 = 0;
    if (lora_x_term && M > 0) {
      pass.dx_base = grad_x.data_ptr<float>(), pass.dx_ldb = K;
      pass.dx_out = grad_x.data_ptr(), pass.dx_dt = DT::kFloat32, pass.dx_ldo = K;
    }
    lowrank_backward(kr, pass);
  } else if (native && (need_x || need_w)) {
    // grad_x = g W and grad_W = g^T x on torch's bf16 GEMM, rounded; the low-rank term of grad_x
    // is added to the widened chunk of g W in fp32 and the sum rounded again.
    if (need_x && M > 0) at::mm_out(grad_x, grad_out, weight);
    if (need_w) grad_w = at::mm(grad_out.t(), x);
    pass.g = view_of(grad_out), pass.x = view_of(x), pass.M = M, pass.row0 = 0;
    if (lora_x_term && M > 0) {  // in place: each rounded element of g W read, the term added, rounded
      const DT xdt = dt_of(x.scalar_type());
      pass.dx_base = grad_x.data_ptr(), pass.dx_bdt = xdt, pass.dx_ldb = K;
      pass.dx_out = grad_x.data_ptr(), pass.dx_dt = xdt, pass.dx_ldo = K;
    }
    lowrank_backward(kr, pass);
  } else if (need_x || need_w) {
    // bf16 / fp16 with base gradients: the ATen GEMMs need fp32 chunks of g (and x); the fused
    // pass reads the widened g chunk and the original x, and rounds dx once.
    Tensor grad_w_acc = need_w ? at::zeros({N, K}, f32) : Tensor();
    const View xv = view_of(x);
    const DT xdt = dt_of(x.scalar_type());
    const int64_t rows = gemm_chunk_rows(M, std::max(K, N));
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t mc = std::min(rows, M - m0);
      const Tensor g_c = grad_out.narrow(0, m0, mc).to(at::kFloat);
      Tensor dx_c = need_x ? at::mm(g_c, W_dx) : Tensor();
      BackwardPass p = pass;
      p.g = view_of(g_c), p.x = offset_rows(xv, m0), p.M = mc, p.row0 = m0;
      if (p.xa_saved != nullptr) p.xa_saved += m0 * r;
      if (lora_x_term) {
        dx_c = dx_c.contiguous();
        p.dx_base = dx_c.data_ptr<float>(), p.dx_ldb = K;
        p.dx_out = grad_x.narrow(0, m0, mc).data_ptr(), p.dx_dt = xdt, p.dx_ldo = K;
      }
      lowrank_backward(kr, p);
      if (need_x && !lora_x_term) grad_x.narrow(0, m0, mc).copy_(dx_c);
      if (need_w) grad_w_acc.addmm_(g_c.t(), x.narrow(0, m0, mc).to(at::kFloat));
    }
    if (need_w) grad_w = grad_w_acc.to(weight.scalar_type());
  } else {
    // bf16 / fp16, adapter (and bias) gradients only: one pass over the original g and x.
    pass.g = view_of(grad_out), pass.x = view_of(x), pass.M = M, pass.row0 = 0;
    lowrank_backward(kr, pass);
  }

  // dA = s acc_a, dB = s acc_bt^T: scaled (and transposed) in fp32 here, rounded once by .to()
  Tensor grad_a = empty(), grad_b = empty();
  if (need_a) {
    grad_a = at::empty({r, K}, f32);
    float* ga = grad_a.data_ptr<float>();
    for (int64_t i = 0; i < r * K; ++i) ga[i] = acc_a[i] * branch_scale;
    grad_a = grad_a.to(lora_A.scalar_type());
  }
  if (need_b) {
    grad_b = at::empty({N, r}, f32);
    transpose_into(acc_bt.data(), r, N, grad_b.data_ptr<float>(), branch_scale);
    grad_b = grad_b.to(lora_B.scalar_type());
  }
  if (need_bias) grad_bias = acc_bias.to(x.scalar_type());
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

void merged_rows_into_fused(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale,
                            Tensor& out) {
  const Kernels& kr = *cpu::active_kernels();
  const Tensor A32 = lora_A.to(at::kFloat).contiguous(), B32 = lora_B.to(at::kFloat).contiguous();
  const bool factors_bf16 = lora_A.scalar_type() == at::kBFloat16 && lora_B.scalar_type() == at::kBFloat16;
  merge_into(kr, weight, A32, B32, static_cast<float>(scale), out, factors_bf16);
}

}  // namespace lora_ext
