// CUDA launchers of the lora_ext ops: validate (../host/checks.h), guard the
// device, pick the strategy (../host/strategy.h, the same cost model as the CPU
// path), then run cuBLAS GEMMs (blas.h) plus the small kernels of this folder,
// all on PyTorch's current stream and cuBLAS handle (so CUDA graphs and
// torch.compile(mode="reduce-overhead") capture them). The *_impl functions
// are the ops without their checks (declared in ../ops.h).
//
// Shapes (op level): x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r],
// bias [N], grad_out [M, N]; s = scale, q = 1/(1-p) (0 when p == 1).
//
// Forward, shrink/expand (default; the only choice with dropout):
//   xa  = drop01(x) A^T                     [M, r] fp32, cuBLAS (fp32 output)
//   y   = [hi|lo](s q xa) [B;B]^T + bias    one GEMM over the inner dim 2r+1 (the
//                                           bias rides in as a column of ones), beta = 0
//   y  += x W^T                             cuBLAS, beta = 1
// Both GEMMs accumulate into an fp32 scratch rounded once into y when y is
// small, else into y itself (one extra rounding; see accumulation_target).
// Adding the LoRA term first and the large base GEMM last keeps that extra
// rounding relative to |bias + LoRA term| rather than to |y|.
//
// Forward, merge on the fly (no dropout; large M): W_eff = W + s B A from the
// merge tile kernel (one read of W, one write of W_eff, rounded once to the
// weight dtype), then y = x W_eff^T + bias through at::addmm_out / at::mm_out:
// the very GEMM path F.linear takes (cuBLASLt with the bias epilogue), so the
// ratio to the frozen base layer measures only the merge. W_eff is transient.
//
// Backward (W frozen unless grad_weight is asked for), in row chunks of x and
// g small enough (~16 MiB) that the second GEMM reading a chunk finds it in L2:
//   xa_c = drop01(x_c) A^T, gb_c = g_c B    fp32 [rows, r]
//   P   += g_c^T [hi|lo](s q xa_c)          fp32 [N, 2r]  -> grad_B = hi + lo, rounded once
//   Q   += [hi|lo](s q gb_c)^T drop01(x_c)  fp32 [2r, K]  -> grad_A = hi + lo, rounded once
//   grad_x_c = mask ⊙ ([hi|lo](s q gb_c) [A;A])   (shrink/expand), then grad_x += g W (beta = 1),
//                                                  accumulated like y (see accumulation_target)
//   or grad_x = g (W + s B A)                      (merge, transient W_eff, no dropout)
// The merge strategy rounds W_eff to the weight dtype before its GEMM (as a
// merged PEFT layer does); the cost model picks it only for large M.
//   grad_bias = sum_rows g, grad_weight = g^T x.
// Saved for backward: only x (and the parameters); nothing of size M x r
// crosses from forward to backward, xa is recomputed.
//
// Dropout: drop01(x) = x * keep (exact multiply by 0/1) with keep from the
// counter-based hash of ../dropout_hash.h, regenerated from the device-side
// seed in every pass; the 1/(1-p) factor is folded into the fp32 scalar s q.
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "../host/checks.h"
#include "../host/common.h"
#include "../host/dropout.h"
#include "../host/strategy.h"
#include "../ops.h"
#include "blas.h"
#include "cuda_check.h"
#include "kernels.h"

namespace lora_ext {
namespace {

using cuda::blas_friendly;
using cuda::ConstMatrix;
using cuda::gemm_into;
using cuda::Matrix;
using cuda::Operand;
using cuda::operand;

// Rows of x and g processed together in the backward: both chunks (x_c, g_c)
// fit in ~16 MiB, well inside the L2 of an A100 (40 MB) or H100/H200 (50 MB),
// so the second GEMM over a chunk reads it from L2 instead of HBM.
constexpr int64_t kChunkBytes = int64_t(16) << 20;
constexpr int64_t kMinChunkRows = 256;

// Number of hi/lo parts an fp32 intermediate is split into to enter a GEMM in
// dtype t without losing precision (see lowrank.cu).
int num_splits(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? 2 : 1; }

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

ConstMatrix cmat(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
Matrix mmat(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

// [hi|lo](scale * v) (or scale * v for fp32/fp64), plus a ones column, into
// `out` ([rows, cols >= nsplit*r + ones], row stride out.stride(0)).
void split_pack(const at::Tensor& v, double scale, bool ones_column, at::Tensor& out, cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(v.stride(1) == 1 && out.stride(1) == 1);
  LORA_CUDA_CHECK(cuda::launch_split_pack(kernel_dtype(out.scalar_type()), v.data_ptr(), v.stride(0), v.size(0),
                                          v.size(1), scale, num_splits(out.scalar_type()), ones_column, out.data_ptr(),
                                          out.stride(0), out.size(1), stream));
}

void apply_dropout(const at::Tensor& in, at::Tensor& out, int64_t row_offset, int64_t index_cols,
                   const DropoutParams& drop, cudaStream_t stream) {
  LORA_CUDA_CHECK(cuda::launch_apply_dropout(kernel_dtype(in.scalar_type()), cmat(in), mmat(out), in.size(0),
                                             in.size(1), row_offset, index_cols, drop.seed_ptr(), drop.threshold,
                                             stream));
}

void run_merge(const at::Tensor& in, at::Tensor& out, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
               cudaStream_t stream) {
  LORA_CUDA_CHECK(cuda::launch_merge_lowrank(kernel_dtype(in.scalar_type()), cmat(in), mmat(out), cmat(lora_A),
                                             cmat(lora_B), in.size(0), in.size(1), lora_A.size(0), scale, stream));
}

at::Tensor merged_impl(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                       cudaStream_t stream) {
  at::Tensor out = at::empty_like(weight);  // same layout as the fake kernel (torch.empty_like)
  if (out.numel() > 0) run_merge(weight, out, lora_A, lora_B, scale, stream);
  return out;
}

// The [N, cols] right-hand operand [B | B | bias | 0...] of the forward expand GEMM.
at::Tensor stacked_lora_B(const at::Tensor& lora_B, const std::optional<at::Tensor>& bias, int nsplit, int64_t cols) {
  const int64_t r = lora_B.size(1);
  at::Tensor out = at::zeros({lora_B.size(0), cols}, lora_B.options());
  for (int t = 0; t < nsplit; ++t) out.narrow(1, t * r, r).copy_(lora_B);
  if (bias.has_value() && bias->defined()) out.select(1, nsplit * r).copy_(*bias);
  return out;
}

// Where the two GEMMs of an output (LoRA term with beta = 0, base with beta = 1)
// accumulate. fp32/fp64 outputs: the output itself (no rounding in between).
// fp16/bf16 outputs whose fp32 copy fits in kChunkBytes (decode and other small
// problems): an fp32 scratch, rounded into the output once at the end, which
// matches the CPU path's single rounding and costs nothing at that size.
// Larger fp16/bf16 outputs: the output itself. cuBLAS then rounds the LoRA term
// (plus bias) once into the output and the sum once more when the base GEMM adds
// into it: an extra half-ulp of |LoRA term + bias| at worst, within the error rule of
// docs/design.md, "Numerics" (plain PyTorch rounds base, intermediate, LoRA output and sum separately),
// in exchange for never moving an M x N fp32 scratch through HBM.
at::Tensor accumulation_target(const at::Tensor& out) {
  const auto t = out.scalar_type();
  if ((t == at::kHalf || t == at::kBFloat16) && out.numel() * 4 <= kChunkBytes) {
    return at::empty(out.sizes(), out.options().dtype(at::kFloat));
  }
  return out;
}

// Rows per chunk of the row-chunked passes. LORA_EXT_CUDA_CHUNK_ROWS (a
// positive integer) overrides the L2-sized default: a tuning and testing knob
// (benchmarks/bench_gpu.py sweeps it; tests/test_cuda.py forces many small chunks), read
// on every call so it can be changed between calls.
int64_t chunk_rows(int64_t M, int64_t row_bytes) {
  if (const char* env = std::getenv("LORA_EXT_CUDA_CHUNK_ROWS")) {
    const long long forced = std::atoll(env);
    TORCH_CHECK_VALUE(forced > 0, "lora_ext: LORA_EXT_CUDA_CHUNK_ROWS must be a positive integer, got '", env, "'");
    return std::max<int64_t>(1, std::min<int64_t>(forced, M));
  }
  return lora_ext::chunk_rows(M, row_bytes, kChunkBytes, kMinChunkRows);
}

}  // namespace

at::Tensor lora_linear_cuda_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                 const std::optional<at::Tensor>& dropout_seed, int64_t strategy) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = cuda::current_stream();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const bool has_bias = has_tensor(bias);
  const auto dtype = x.scalar_type();
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {  // x W^T and the LoRA term are empty sums
    if (has_bias) {
      y.copy_(bias->unsqueeze(0).expand({M, N}));
    } else {
      y.zero_();
    }
    return y;
  }

  if (resolve_strategy(c10::DeviceType::CUDA, M, N, K, x.element_size(), dropout_p, strategy).merge_forward) {
    const at::Tensor w_eff = merged_impl(weight, lora_A, lora_B, scale, stream);
    if (has_bias) {
      at::addmm_out(y, *bias, x, w_eff.t());
    } else {
      at::mm_out(y, x, w_eff.t());
    }
    return y;
  }

  const at::Tensor xb = blas_friendly(x);
  const Operand a_t = operand(lora_A).t();  // A^T [K, r]
  at::Tensor xa = at::empty({M, r}, x.options().dtype(acc_dtype(dtype)));
  if (!drop.on()) {
    gemm_into(M, r, K, operand(xb), a_t, 0.0, xa, stream);
  } else {
    // drop01(x) materialised one L2-sized row chunk at a time, never as [M, K].
    const int64_t rows = chunk_rows(M, K * x.element_size());
    at::Tensor xbuf = at::empty({rows, K}, x.options());
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t rc = std::min(rows, M - m0);
      at::Tensor xd = xbuf.narrow(0, 0, rc);
      apply_dropout(xb.narrow(0, m0, rc), xd, m0, K, drop, stream);
      at::Tensor xa_c = xa.narrow(0, m0, rc);
      gemm_into(rc, r, K, operand(xd), a_t, 0.0, xa_c, stream);
    }
  }

  // target = bias + s q xa B^T, then target += x W^T (target: y or its fp32 scratch).
  const int nsplit = num_splits(dtype);
  const int64_t inner = nsplit * r + (has_bias ? 1 : 0);
  const int64_t cols = round_up(inner, 8);  // 16-byte aligned rows for the tensor-core kernels
  at::Tensor lhs = at::empty({M, cols}, x.options());
  split_pack(xa, scale * drop.factor, has_bias, lhs, stream);
  const at::Tensor rhs = stacked_lora_B(lora_B, bias, nsplit, cols);  // [N, cols]
  at::Tensor target = accumulation_target(y);
  gemm_into(M, N, inner, operand(lhs.narrow(1, 0, inner)), operand(rhs.narrow(1, 0, inner)).t(), 0.0, target, stream);
  gemm_into(M, N, K, operand(xb), operand(weight).t(), 1.0, target, stream);
  if (!target.is_same(y)) y.copy_(target);  // the one rounding to fp16/bf16
  return y;
}

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                            const std::optional<at::Tensor>& dropout_seed, int64_t strategy) {
  check_lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  check_cuda(x, "x");
  return lora_linear_cuda_impl(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
}

GradTuple lora_linear_backward_cuda_impl(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                         double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                                         int64_t strategy, std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = cuda::current_stream();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const auto dtype = x.scalar_type();
  const auto acc_opts = x.options().dtype(acc_dtype(dtype));
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  const bool dropout = drop.on();
  const double lora_scale = scale * drop.factor;
  const int nsplit = num_splits(dtype);
  const int64_t split_cols = nsplit * r;

  // Unrequested outputs: a fresh [0] tensor each, so no two outputs alias.
  const auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = output_mask[0] ? at::empty({M, K}, x.options()) : none();
  at::Tensor grad_w = output_mask[1] ? at::empty({N, K}, weight.options()) : none();
  at::Tensor grad_bias = none();
  at::Tensor grad_A = output_mask[3] ? at::empty({r, K}, lora_A.options()) : none();
  at::Tensor grad_B = output_mask[4] ? at::empty({N, r}, lora_B.options()) : none();

  const at::Tensor g = blas_friendly(grad_out);
  const at::Tensor xb = blas_friendly(x);

  if (output_mask[2]) grad_bias = g.sum(0);  // fp32 accumulation inside ATen, one rounding
  if (output_mask[1]) gemm_into(N, K, M, operand(g).t(), operand(xb), 0.0, grad_w, stream);

  const bool merge =
      resolve_strategy(c10::DeviceType::CUDA, M, N, K, x.element_size(), dropout_p, strategy).merge_backward;
  const bool lora_grad_x = output_mask[0] && !merge;
  const bool need_gb = lora_grad_x || output_mask[3];
  const bool need_xa = output_mask[4];

  at::Tensor P = need_xa ? at::zeros({N, split_cols}, acc_opts) : at::Tensor();         // g^T [hi|lo](s q xa)
  at::Tensor Q = output_mask[3] ? at::zeros({split_cols, K}, acc_opts) : at::Tensor();  // [hi|lo](s q gb)^T x~
  bool grad_x_started = false;  // whether gx_target holds the LoRA term already
  at::Tensor gx_target = lora_grad_x ? accumulation_target(grad_x) : grad_x;

  if (M > 0 && K > 0 && (need_gb || need_xa)) {
    const int64_t rows = chunk_rows(M, (K + N) * x.element_size());
    const int64_t cols = round_up(split_cols, 8);
    const bool mask_x = dropout && (need_xa || output_mask[3]);
    at::Tensor xbuf = mask_x ? at::empty({rows, K}, x.options()) : at::Tensor();
    at::Tensor xa_c = need_xa ? at::empty({rows, r}, acc_opts) : at::Tensor();
    at::Tensor gb_c = need_gb ? at::empty({rows, r}, acc_opts) : at::Tensor();
    at::Tensor lx = need_xa ? at::empty({rows, cols}, x.options()) : at::Tensor();
    at::Tensor lg = need_gb ? at::empty({rows, cols}, x.options()) : at::Tensor();
    const at::Tensor lora_AA = lora_grad_x ? (nsplit == 1 ? lora_A : at::cat({lora_A, lora_A}, 0)) : at::Tensor();
    const Operand a_t = operand(lora_A).t();  // A^T [K, r]
    const Operand b_op = operand(lora_B);     // B [N, r]

    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t rc = std::min(rows, M - m0);
      at::Tensor x_c = xb.narrow(0, m0, rc);
      if (mask_x) {
        at::Tensor xd = xbuf.narrow(0, 0, rc);
        apply_dropout(x_c, xd, m0, K, drop, stream);
        x_c = xd;
      }
      const Operand x_op = operand(x_c);
      const Operand g_op = operand(g.narrow(0, m0, rc));
      if (need_xa) {
        at::Tensor xa = xa_c.narrow(0, 0, rc);
        gemm_into(rc, r, K, x_op, a_t, 0.0, xa, stream);
        at::Tensor l = lx.narrow(0, 0, rc);
        split_pack(xa, lora_scale, false, l, stream);
        gemm_into(N, split_cols, rc, g_op.t(), operand(l.narrow(1, 0, split_cols)), 1.0, P, stream);
      }
      if (need_gb) {
        at::Tensor gb = gb_c.narrow(0, 0, rc);
        gemm_into(rc, r, N, g_op, b_op, 0.0, gb, stream);
        at::Tensor l = lg.narrow(0, 0, rc);
        split_pack(gb, lora_scale, false, l, stream);
        const Operand lg_op = operand(l.narrow(1, 0, split_cols));
        if (output_mask[3]) gemm_into(split_cols, K, rc, lg_op.t(), x_op, 1.0, Q, stream);
        if (lora_grad_x) {
          at::Tensor gx_c = gx_target.narrow(0, m0, rc);
          gemm_into(rc, K, split_cols, lg_op, operand(lora_AA), 0.0, gx_c, stream);
          if (dropout) apply_dropout(gx_c, gx_c, m0, K, drop, stream);
        }
      }
    }
    grad_x_started = lora_grad_x;
  }

  if (output_mask[0]) {
    if (merge) {
      const at::Tensor w_eff = merged_impl(weight, lora_A, lora_B, scale, stream);
      gemm_into(M, K, N, operand(g), operand(w_eff), 0.0, grad_x, stream);
    } else {
      gemm_into(M, K, N, operand(g), operand(weight), grad_x_started ? 1.0 : 0.0, gx_target, stream);
      if (!gx_target.is_same(grad_x)) grad_x.copy_(gx_target);
    }
  }
  if (output_mask[3] && grad_A.numel() > 0) {
    LORA_CUDA_CHECK(cuda::launch_combine_splits(kernel_dtype(dtype), Q.data_ptr(), K, 1, r * K, nsplit, r, K, 1.0,
                                                grad_A.data_ptr(), stream));
  }
  if (output_mask[4] && grad_B.numel() > 0) {
    LORA_CUDA_CHECK(cuda::launch_combine_splits(kernel_dtype(dtype), P.data_ptr(), split_cols, 1, r, nsplit, N, r, 1.0,
                                                grad_B.data_ptr(), stream));
  }
  return {grad_x, grad_w, grad_bias, grad_A, grad_B};
}

GradTuple lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                                    const std::optional<at::Tensor>& dropout_seed, int64_t strategy,
                                    std::array<bool, 5> output_mask) {
  check_lora_linear(x, weight, std::nullopt, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  check_grad_out(grad_out, x, weight.size(0));
  check_cuda(x, "x");
  return lora_linear_backward_cuda_impl(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy,
                                        output_mask);
}

void merge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  check_adapter(weight, lora_A, lora_B);
  check_scale(scale);
  check_cuda(weight, "weight");
  // RuntimeError, as torch's own in-place ops (and the fallback's copy_) raise for an overlapping output.
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes,
              "lora_ext: merge_ cannot update weight in place: its elements overlap in memory (an expanded view?), "
              "shape ",
              shape_str(weight), ", strides ", weight.strides());
  at::assert_no_overlap(weight, lora_A);
  at::assert_no_overlap(weight, lora_B);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (weight.numel() == 0) return;
  run_merge(weight, weight, lora_A, lora_B, scale, cuda::current_stream());
}

at::Tensor merged_weight_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              double scale) {
  check_adapter(weight, lora_A, lora_B);
  check_scale(scale);
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  return merged_impl(weight, lora_A, lora_B, scale, cuda::current_stream());
}

at::Tensor dropout_mask_cuda(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  check_dropout_mask(seed, rows, cols, p);
  check_cuda(seed, "seed");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  LORA_CUDA_CHECK(cuda::launch_dropout_mask(seed.data_ptr<int64_t>(), out.data_ptr<bool>(), out.numel(),
                                            dropout_threshold(p), cuda::current_stream()));
  return out;
}

namespace {

// The dispatcher requires every backend's kernel of an op to have the same C++
// signature (a mismatch aborts at library load), and the CPU kernel of merge_
// takes the weight by value (csrc/cpu/lora_cpu.cpp::merge_entry): match it.
void merge_entry(at::Tensor weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  merge_cuda(weight, lora_A, lora_B, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
  m.impl("merge_", &merge_entry);
  m.impl("merged_weight", &merged_weight_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace lora_ext
