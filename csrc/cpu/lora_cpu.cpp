// CPU implementations of the LoRA ops on top of ATen's BLAS-backed GEMMs.
//
// Memory contract: no [M, N] temporary besides the output; lora_linear saves
// nothing (autograd keeps x and the parameters), lora_linear_xa also returns
// xa = drop(x) A^T [M, r] for lora_linear_backward_xa. The backward recomputes
// the [M, r] intermediates it is not given in row chunks that stay in cache while
// they are used twice (gb = g B feeds grad_A and, with shrink/expand, grad_x;
// xa feeds grad_B), so g and x are each read once for the low-rank gradients.
//
// Numerics: fp32 accumulation (fp64 for float64). Half and bfloat16 inputs
// are widened chunk by chunk, multiplied in fp32 and rounded once into the
// output, so no output is rounded twice (this ATen path; the fused path's native
// bf16 GEMM, cpu::bf16_gemm_native(), rounds y and grad_x twice).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../host/checks.h"
#include "../host/common.h"
#include "../host/dropout.h"
#include "../host/strategy.h"
#include "../ops.h"
#include "lora_cpu_fused.h"
#include "lowrank_aten.h"

namespace lora_ext {
namespace {

using at::Tensor;
using cpu::chunk_rows;

// xa = drop(x) A^T in acc (the 0/1 mask without 1/(1-p)), for x rows row0.. of the op's input, in
// row chunks of `rows`: the backward's chunks (chunk_rows(M, max(K, N))), so that each chunk is the
// very GEMM the plain backward runs and lora_linear_backward_xa gives its bits.
Tensor lowrank_xa(const Tensor& x, const Tensor& A, const DropoutParams& d, int64_t row0, int64_t rows) {
  const at::ScalarType acc = A.scalar_type();
  if (d.branch_zero()) return at::zeros({x.size(0), A.size(0)}, x.options().dtype(acc));
  const int64_t M = x.size(0);
  Tensor xa = at::empty({M, A.size(0)}, x.options().dtype(acc));
  for (int64_t m0 = 0; m0 < M; m0 += rows) {
    const int64_t mc = std::min(rows, M - m0);
    Tensor xa_c = xa.narrow(0, m0, mc);
    const Tensor x_c = x.narrow(0, m0, mc);
    at::mm_out(xa_c, d.on() ? cpu::dropped(x_c, acc, row0 + m0, d) : x_c.to(acc), A.t());
  }
  return xa;
}

// out += scale/(1-p) * xa B^T (the low-rank forward term from a kept xa).
void add_lowrank_from_xa(Tensor& out, const Tensor& xa, const Tensor& B, double scale, const DropoutParams& d) {
  if (!d.branch_zero()) out.addmm_(xa, B.t(), 1.0, scale * d.factor);
}

// lora_linear (inputs checked); xa_out: also return xa = drop(x) A^T [M, r] in acc there.
Tensor linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                  const Tensor& lora_B, double scale, double dropout_p, const std::optional<Tensor>& dropout_seed,
                  int64_t strategy, Tensor* xa_out) {
  check_cpu(x, "x");
  if (fused_cpu_kernels_apply(x.scalar_type(), lora_A.size(0))) {
    return lora_linear_cpu_fused(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, xa_out);
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::ScalarType acc = acc_dtype(x);
  Tensor y = at::empty({M, N}, x.options());
  if (xa_out != nullptr) *xa_out = at::empty({M, lora_A.size(0)}, x.options().dtype(acc));
  if (M == 0) return y;

  const bool lowp = is_low_precision(x);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool merge =
      resolve_strategy(c10::DeviceType::CPU, M, N, K, x.element_size(), dropout_p, strategy).merge_forward;
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);  // [r, K], [N, r]: tiny

  if (!lowp) {
    // fp32 / fp64: one GEMM into y, plus (shrink/expand) a rank-r update of y in place.
    const Tensor W = merge ? at::addmm(weight, B, A, 1.0, scale) : weight;  // W_eff is [N, K], never [M, N]
    if (has_bias) {
      at::addmm_out(y, *bias, x, W.t());
    } else {
      at::mm_out(y, x, W.t());
    }
    if (!merge) cpu::add_lowrank_forward(y, x, A, B, scale, drop, 0);
    // xa in the backward's row chunks (its GEMMs, its bits), separately from the forward's own
    // x A^T above (one GEMM over all rows, whose bits MKL may give differently): on this path the
    // kept xa costs the product it saves, but both ops keep the plain pair's bits.
    if (xa_out != nullptr) *xa_out = lowrank_xa(x, A, drop, 0, chunk_rows(M, std::max(K, N)));
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
    if (xa_out != nullptr) {
      const Tensor xa_c = lowrank_xa(x_c, A, drop, m0, mc);
      xa_out->narrow(0, m0, mc).copy_(xa_c);
      if (!merge) add_lowrank_from_xa(out, xa_c, B, scale, drop);
    } else if (!merge) {
      cpu::add_lowrank_forward(out, x_c, A, B, scale, drop, m0);
    }
    y.narrow(0, m0, mc).copy_(out);
  }
  return y;
}

// lora_linear_backward (inputs checked); xa: the forward's drop(x) A^T (acc, [M, r]), used
// for grad_B instead of recomputing it.
GradTuple backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                       const Tensor& lora_B, double scale, double dropout_p, const std::optional<Tensor>& dropout_seed,
                       int64_t strategy, std::array<bool, 5> output_mask, const Tensor* xa) {
  check_cpu(x, "x");
  if (fused_cpu_kernels_apply(x.scalar_type(), lora_A.size(0))) {
    return lora_linear_backward_cpu_fused(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy,
                                          output_mask, xa);
  }
  const auto [need_x, need_w, need_bias, need_a, need_b] = output_mask;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::ScalarType acc = acc_dtype(x);
  const bool lowp = is_low_precision(x);
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  const bool branch = !drop.branch_zero();
  const double branch_scale = scale * drop.factor;
  const bool merge_dx =
      need_x && branch &&
      resolve_strategy(c10::DeviceType::CPU, M, N, K, x.element_size(), dropout_p, strategy).merge_backward;
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
  const bool b_from_xa = xa != nullptr && need_b && branch;  // grad_B = g^T xa, no pass over x for it
  const bool need_xd = branch && (need_a || (need_b && !b_from_xa));
  Tensor no_grad_b;  // add_lowrank_backward's grad_B when it comes from xa
  const bool chunk_loop = need_gb || need_xd || b_from_xa || need_bias || (lowp && (need_x || need_w));
  const int64_t rows = chunk_rows(M, std::max(K, N));
  for (int64_t m0 = 0; chunk_loop && m0 < M; m0 += rows) {
    const int64_t mc = std::min(rows, M - m0);
    const Tensor g_c = grad_out.narrow(0, m0, mc).to(acc);
    const Tensor x_c = x.narrow(0, m0, mc).to(acc);
    Tensor dx_c;  // grad_x base term of the chunk: the low-rank term adds into it
    if (need_x) dx_c = lowp ? at::mm(g_c, W_dx) : grad_x.narrow(0, m0, mc);
    if (need_gb || need_xd) {
      cpu::add_lowrank_backward(g_c, x_c, A, B, scale, drop, m0, grad_a_acc, b_from_xa ? no_grad_b : grad_b_acc,
                                lora_x_term ? &dx_c : nullptr);
    }
    if (b_from_xa) grad_b_acc.addmm_(g_c.t(), xa->narrow(0, m0, mc));
    if (need_bias) grad_bias_acc.add_(g_c.sum(0));
    if (need_x && lowp) grad_x.narrow(0, m0, mc).copy_(dx_c);
    if (lowp && need_w) grad_w_acc.addmm_(g_c.t(), x_c);
  }

  const Tensor grad_a = need_a ? grad_a_acc.mul_(branch_scale).to(lora_A.scalar_type()) : empty();
  const Tensor grad_b = need_b ? grad_b_acc.mul_(branch_scale).to(lora_B.scalar_type()) : empty();
  if (need_bias) grad_bias = grad_bias_acc.to(x.scalar_type());
  if (need_w && lowp) grad_w = grad_w_acc.to(weight.scalar_type());
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

}  // namespace

Tensor lora_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                       const Tensor& lora_B, double scale, double dropout_p, const std::optional<Tensor>& dropout_seed,
                       int64_t strategy) {
  check_lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  return linear_cpu(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, nullptr);
}

GradTuple lora_linear_backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                   const Tensor& lora_B, double scale, double dropout_p,
                                   const std::optional<Tensor>& dropout_seed, int64_t strategy,
                                   std::array<bool, 5> output_mask) {
  check_lora_linear(x, weight, std::nullopt, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  check_grad_out(grad_out, x, weight.size(0));
  return backward_cpu(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask,
                      nullptr);
}

std::tuple<Tensor, Tensor> lora_linear_xa_cpu(LORA_EXT_LINEAR_PARAMS) {
  check_lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  Tensor xa;
  Tensor y = linear_cpu(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, &xa);
  return {y, xa};
}

GradTuple lora_linear_backward_xa_cpu(LORA_EXT_LINEAR_BACKWARD_XA_PARAMS) {
  check_lora_linear(x, weight, std::nullopt, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy);
  check_grad_out(grad_out, x, weight.size(0));
  check_saved_xa(xa, x, lora_A.size(0));
  return backward_cpu(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask, &xa);
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
  const at::ScalarType acc = acc_dtype(weight);
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
  check_dropout_mask(seed, rows, cols, p);
  check_cpu(seed, "seed");
  Tensor mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  const uint64_t s = static_cast<uint64_t>(seed.reshape({}).item<int64_t>());
  const uint64_t threshold = dropout_threshold(p);
  bool* data = mask.data_ptr<bool>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(cols);
      for (int64_t k = 0; k < cols; ++k)
        data[i * cols + k] = dropout_keep(s, base + static_cast<uint64_t>(k), threshold);
    }
  });
  return mask;
}

namespace {

GradTuple backward_entry(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                         const Tensor& lora_B, double scale, double dropout_p,
                         const std::optional<Tensor>& dropout_seed, int64_t strategy, std::array<bool, 5> output_mask) {
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
  m.impl("lora_linear_xa", &lora_linear_xa_cpu);
  m.impl("lora_linear_backward_xa", &lora_linear_backward_xa_cpu);
  m.impl("merge_", &merge_entry);
  m.impl("merged_weight", &merged_weight_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace lora_ext
