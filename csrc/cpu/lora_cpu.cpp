// CPU implementations of the LoRA ops on top of ATen's BLAS-backed GEMMs.
//
// Memory contract: no [M, N] temporary besides the output; the forward saves
// nothing (autograd keeps x and the parameters), the backward recomputes the
// [M, r] intermediates in row chunks that stay in cache while they are used
// twice (gb = g B feeds grad_A and, with shrink/expand, grad_x; xa = drop(x) A^T
// feeds grad_B), so g and x are each read once for the low-rank gradients.
//
// Numerics: fp32 accumulation (fp64 for float64). Half and bfloat16 inputs
// are widened chunk by chunk, multiplied in fp32 and rounded once into the
// output, so no output is rounded twice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "../dropout_hash.h"
#include "../ops.h"
#include "../strategy.h"
#include "lora_cpu_fused.h"

namespace lora_ext {
namespace {

using at::Tensor;

bool is_low_precision(const Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows per chunk: about 512K elements of the wider of the two row lengths (2 MiB
// in fp32), so a chunk of x (or g) stays in the last-level cache between the two
// GEMMs that read it, while each GEMM call still has enough rows to amortise
// BLAS's per-call threading cost (128-row chunks measured slower on 2 threads).
int64_t chunk_rows(int64_t M, int64_t width) {
  const int64_t rows = (int64_t(1) << 19) / std::max<int64_t>(width, 1);
  return std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(rows, 64)));
}

double dropout_factor(double p) {
  return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
}

uint64_t read_seed(const std::optional<Tensor>& seed) {
  return static_cast<uint64_t>(seed->reshape({}).item<int64_t>());
}

// Zero the dropped elements of t (a contiguous [rows, K] chunk starting at
// logical row `row0`), in place. The kept ones are not rescaled here: the
// 1/(1-p) factor is folded into the fp32 scale of the low-rank products.
template <typename scalar_t>
void zero_dropped_(Tensor& t, int64_t row0, uint64_t seed, uint64_t threshold) {
  const int64_t rows = t.size(0), K = t.size(1);
  scalar_t* data = t.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(K);
      scalar_t* row = data + i * K;
      for (int64_t k = 0; k < K; ++k) {
        if (!dropout_keep(seed, base + static_cast<uint64_t>(k), threshold)) row[k] = scalar_t(0);
      }
    }
  });
}

void zero_dropped(Tensor& t, int64_t row0, uint64_t seed, uint64_t threshold) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  if (t.scalar_type() == at::kDouble) {
    zero_dropped_<double>(t, row0, seed, threshold);
  } else {
    TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat);
    zero_dropped_<float>(t, row0, seed, threshold);
  }
}

struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
  uint64_t threshold = 0;
  double factor = 1.0;
  bool on() const { return p > 0.0; }
  bool branch_zero() const { return p >= 1.0; }

  // drop(x_c) without the 1/(1-p) factor, in acc dtype. Without dropout this is x_c
  // itself (no copy); with it, a fresh contiguous copy whose dropped elements are zero.
  Tensor apply(const Tensor& x_chunk, at::ScalarType acc, int64_t row0) const {
    if (!on()) return x_chunk.to(acc);
    Tensor out = x_chunk.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    zero_dropped(out, row0, seed, threshold);
    return out;
  }
};

Dropout make_dropout(double p, const std::optional<Tensor>& seed) {
  Dropout d;
  d.p = p;
  if (p > 0.0) {
    d.seed = read_seed(seed);
    d.threshold = dropout_threshold(p);
    d.factor = dropout_factor(p);
  }
  return d;
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lora_ext: ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

}  // namespace

Tensor lora_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                       const Tensor& lora_B, double scale, double dropout_p, const std::optional<Tensor>& dropout_seed,
                       int64_t strategy) {
  check_lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  check_cpu(x, "x");
  if (fused_cpu_kernels_apply(x.scalar_type(), lora_A.size(0))) {
    return lora_linear_cpu_fused(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;

  const at::ScalarType acc = acc_type(x);
  const bool lowp = is_low_precision(x);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool merge = use_merge_forward(strategy, M, N, K, x.element_size(), dropout_p);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);  // [r, K], [N, r]: tiny
  const double branch_scale = scale * drop.factor;

  if (!lowp) {
    // fp32 / fp64: one GEMM into y, plus (shrink/expand) a rank-r update of y in place.
    const Tensor W = merge ? at::addmm(weight, B, A, 1.0, scale) : weight;  // W_eff is [N, K], never [M, N]
    if (has_bias) {
      at::addmm_out(y, *bias, x, W.t());
    } else {
      at::mm_out(y, x, W.t());
    }
    if (merge || drop.branch_zero()) return y;
    if (!drop.on()) {
      const Tensor xa = at::mm(x, A.t());  // [M, r]
      y.addmm_(xa, B.t(), 1.0, scale);
      return y;
    }
    const int64_t rows = chunk_rows(M, K);
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t mc = std::min(rows, M - m0);
      const Tensor xd = drop.apply(x.narrow(0, m0, mc), acc, m0);
      const Tensor xa = at::mm(xd, A.t());
      y.narrow(0, m0, mc).addmm_(xa, B.t(), 1.0, branch_scale);
    }
    return y;
  }

  // bf16 / fp16: widen a chunk of x, accumulate base + bias + branch in fp32, round once.
  const Tensor W = merge ? at::addmm(weight.to(acc), B, A, 1.0, scale) : weight.to(acc);
  const Tensor bias_acc = has_bias ? bias->to(acc) : Tensor();
  const int64_t rows = chunk_rows(M, std::max(K, N));
  for (int64_t m0 = 0; m0 < M; m0 += rows) {
    const int64_t mc = std::min(rows, M - m0);
    const Tensor x_c = x.narrow(0, m0, mc).to(acc);
    Tensor out = has_bias ? at::addmm(bias_acc, x_c, W.t()) : at::mm(x_c, W.t());
    if (!merge && !drop.branch_zero()) {
      const Tensor xd = drop.on() ? drop.apply(x_c, acc, m0) : x_c;
      out.addmm_(at::mm(xd, A.t()), B.t(), 1.0, branch_scale);
    }
    y.narrow(0, m0, mc).copy_(out);
  }
  return y;
}

GradTuple lora_linear_backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                   const Tensor& lora_B, double scale, double dropout_p,
                                   const std::optional<Tensor>& dropout_seed, int64_t strategy,
                                   std::array<bool, 5> output_mask) {
  check_lora_linear(x, weight, std::nullopt, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  check_grad_out(grad_out, x, weight);
  check_cpu(x, "x");
  if (fused_cpu_kernels_apply(x.scalar_type(), lora_A.size(0))) {
    return lora_linear_backward_cpu_fused(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed,
                                          strategy, output_mask);
  }
  const auto [need_x, need_w, need_bias, need_a, need_b] = output_mask;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::ScalarType acc = acc_type(x);
  const bool lowp = is_low_precision(x);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  const bool branch = !drop.branch_zero();
  const double branch_scale = scale * drop.factor;
  const bool merge_dx = need_x && branch && use_merge_backward(strategy, M, N, K, x.element_size(), dropout_p);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);

  // Outputs that were not asked for are distinct empty tensors (outputs must not alias).
  auto empty = [&] { return at::empty({0}, x.options()); };
  Tensor grad_x = need_x ? at::empty({M, K}, x.options()) : empty();
  Tensor grad_w = empty(), grad_bias = empty();
  Tensor grad_a_acc = need_a ? at::zeros({lora_A.size(0), K}, x.options().dtype(acc)) : Tensor();
  Tensor grad_b_acc = need_b ? at::zeros({N, lora_A.size(0)}, x.options().dtype(acc)) : Tensor();
  Tensor grad_bias_acc = need_bias ? at::zeros({N}, x.options().dtype(acc)) : Tensor();
  Tensor grad_w_acc;

  // grad_x base term. merge: g (W + s B A) in one GEMM (needs no dropout).
  Tensor W_dx;
  if (need_x && M > 0) {
    if (lowp) {
      W_dx = merge_dx ? at::addmm(weight.to(acc), B, A, 1.0, scale) : weight.to(acc);
    } else {
      W_dx = merge_dx ? at::addmm(weight, B, A, 1.0, scale) : weight;
      at::mm_out(grad_x, grad_out, W_dx);
    }
  }
  if (need_w) {
    if (lowp) {
      grad_w_acc = at::zeros({N, K}, x.options().dtype(acc));
    } else {
      grad_w = at::mm(grad_out.t(), x);
    }
  }

  const bool lora_x_term = need_x && branch && !merge_dx;
  const bool need_gb = branch && (need_a || lora_x_term);
  const bool need_xd = branch && (need_a || need_b);
  const bool chunk_loop = need_gb || need_xd || need_bias || (lowp && (need_x || need_w));
  const int64_t rows = chunk_rows(M, std::max(K, N));
  for (int64_t m0 = 0; chunk_loop && m0 < M; m0 += rows) {
    const int64_t mc = std::min(rows, M - m0);
    const Tensor g_c = grad_out.narrow(0, m0, mc).to(acc);
    const Tensor x_c = x.narrow(0, m0, mc).to(acc);
    const Tensor gb = need_gb ? at::mm(g_c, B) : Tensor();  // [mc, r]
    if (need_xd) {
      const Tensor xd = drop.apply(x_c, acc, m0);
      if (need_a) grad_a_acc.addmm_(gb.t(), xd);
      if (need_b) grad_b_acc.addmm_(g_c.t(), at::mm(xd, A.t()));
    }
    if (need_bias) grad_bias_acc.add_(g_c.sum(0));
    if (need_x) {
      Tensor dx_c;
      if (lowp) {
        dx_c = at::mm(g_c, W_dx);
      } else {
        dx_c = grad_x.narrow(0, m0, mc);
      }
      if (lora_x_term) {
        if (drop.on()) {
          Tensor t = at::mm(gb, A);  // [mc, K]
          t.mul_(drop.apply(at::ones_like(t), acc, m0));
          dx_c.add_(t, branch_scale);
        } else {
          dx_c.addmm_(gb, A, 1.0, branch_scale);
        }
      }
      if (lowp) grad_x.narrow(0, m0, mc).copy_(dx_c);
    }
    if (lowp && need_w) grad_w_acc.addmm_(g_c.t(), x_c);
  }

  const Tensor grad_a = need_a ? grad_a_acc.mul_(branch_scale).to(lora_A.scalar_type()) : empty();
  const Tensor grad_b = need_b ? grad_b_acc.mul_(branch_scale).to(lora_B.scalar_type()) : empty();
  if (need_bias) grad_bias = grad_bias_acc.to(x.scalar_type());
  if (need_w && lowp) grad_w = grad_w_acc.to(weight.scalar_type());
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

namespace {

// out_rows = W_rows + scale * B_rows A, row chunk by row chunk (fp32 accumulation).
void merged_rows_into(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale, Tensor& out) {
  const int64_t N = weight.size(0), K = weight.size(1);
  if (N == 0 || K == 0) return;
  if (fused_cpu_kernels_apply(weight.scalar_type(), lora_A.size(0))) {
    merged_rows_into_fused(weight, lora_A, lora_B, scale, out);
    return;
  }
  const at::ScalarType acc = acc_type(weight);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);
  const int64_t rows = chunk_rows(N, K);
  const bool in_place_acc = out.is_same(weight) && weight.scalar_type() == acc;
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    if (in_place_acc) {  // fp32/fp64 merge_: one read and one write of W
      Tensor w_c = weight.narrow(0, n0, nc);
      w_c.addmm_(B.narrow(0, n0, nc), A, 1.0, scale);
      continue;
    }
    const Tensor w_c = weight.narrow(0, n0, nc).to(acc);
    out.narrow(0, n0, nc).copy_(at::addmm(w_c, B.narrow(0, n0, nc), A, 1.0, scale));
  }
}

}  // namespace

void merge_cpu(Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  check_adapter(weight, lora_A, lora_B);
  check_scale(scale);
  check_cpu(weight, "weight");
  merged_rows_into(weight, lora_A, lora_B, scale, weight);
}

Tensor merged_weight_cpu(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  check_adapter(weight, lora_A, lora_B);
  check_scale(scale);
  check_cpu(weight, "weight");
  Tensor out = at::empty(weight.sizes(), weight.options());
  merged_rows_into(weight, lora_A, lora_B, scale, out);
  return out;
}

Tensor dropout_mask_cpu(const Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "lora_ext: seed must be a one-element int64 tensor, got shape ", seed.sizes(), " and dtype ",
              seed.scalar_type());
  TORCH_CHECK(rows >= 0 && cols >= 0, "lora_ext: dropout_mask rows and cols must be >= 0, got ", rows, " x ", cols);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "lora_ext: dropout p must be in [0, 1], got ", p);
  check_cpu(seed, "seed");
  Tensor mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  const uint64_t s = static_cast<uint64_t>(seed.reshape({}).item<int64_t>());
  const uint64_t threshold = dropout_threshold(p);
  bool* data = mask.data_ptr<bool>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(cols);
      for (int64_t k = 0; k < cols; ++k) data[i * cols + k] = dropout_keep(s, base + static_cast<uint64_t>(k), threshold);
    }
  });
  return mask;
}

namespace {

GradTuple backward_entry(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                         const Tensor& lora_B, double scale, double dropout_p,
                         const std::optional<Tensor>& dropout_seed, int64_t strategy,
                         std::array<bool, 5> output_mask) {
  return lora_linear_backward_cpu(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy,
                                  output_mask);
}

void merge_entry(Tensor weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  merge_cpu(weight, lora_A, lora_B, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &backward_entry);
  m.impl("merge_", &merge_entry);
  m.impl("merged_weight", &merged_weight_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace lora_ext
