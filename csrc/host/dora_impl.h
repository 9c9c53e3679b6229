// The DoRA ops on ATen calls, shared by the CPU (csrc/cpu/dora_cpu.cpp) and CUDA
// (csrc/cuda/dora_cuda.cpp) registrations; each backend passes its dropout routine.
// Math and rounding (docs/design.md, "DoRA"):
//
//   n_n^2 = ||w_n||^2 + 2 s b_n . (A w_n) + s^2 b_n^T (A A^T) b_n     from W A^T [N, r] and A A^T [r, r]
//   g     = magnitude / n   (n detached: no gradient flows into it)
//   y     = g ⊙ (x W^T + s (x A^T) B^T) + bias                                   without dropout
//   y     = x W^T + bias + (g - 1) ⊙ (x~ W^T) + g ⊙ s (x~ A^T) B^T, x~ = drop(x)  with dropout (PEFT's formula)
//
// Rows where the expansion cancels (n^2 < T / kCancellationRatio with T the sum of the
// terms' magnitudes) take the direct ||w_n + s b_n A|| for those rows only.
// No [N, K] temporary exists in either pass: W is read in row blocks (converted to the
// accumulation dtype block by block for fp16/bf16; fp32/fp64 weights are used in place), and
// x / grad_out in row chunks; every output is rounded to its dtype once.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>

#include "checks.h"
#include "common.h"
#include "dropout.h"

namespace lora_ext {
namespace dora {

using at::Tensor;
using DoraGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// keep ⊙ x_c for the row chunk of x_c (acc dtype) starting at logical row `row0`, without
// the 1/(1-p) factor: a fresh tensor (the backend's dropout kernel).
using Dropper = std::function<Tensor(const Tensor& x_c, int64_t row0)>;

// T / n^2 above this: the expansion has lost more than ~2 bits, use the direct formula.
constexpr double kCancellationRatio = 4.0;

// --------------------------------------------------------------------------- checks

// A [N] vector argument (lora_ext/ops/dora.py _check_vector): ValueError for the shape,
// TypeError for dtype and device.
inline void check_vector(const Tensor& t, const char* name, int64_t N, at::ScalarType dtype, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, "lora_ext: ", name, " must be [N] = [", N, "], got shape ",
                    shape_str(t));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "lora_ext: ", name, " must have dtype ", dtype_str(dtype), ", got ",
                   dtype_str(t.scalar_type()));
  TORCH_CHECK_TYPE(t.device() == ref.device(), "lora_ext: ", name, " is on ", t.device(), " but weight is on ",
                   ref.device());
}

inline void check_weight_norm(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale,
                              const std::optional<Tensor>& weight_sq_norm) {
  check_adapter(weight, lora_A, lora_B);
  check_scale(scale);
  if (has_tensor(weight_sq_norm)) {
    check_vector(*weight_sq_norm, "weight_sq_norm", weight.size(0), acc_dtype(weight), weight);
  }
}

inline void check_dora_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                              const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
                              const Tensor& weight_norm, double scale, double dropout_p,
                              const std::optional<Tensor>& dropout_seed) {
  check_lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, 0);
  check_vector(magnitude, "magnitude", weight.size(0), weight.scalar_type(), weight);
  check_vector(weight_norm, "weight_norm", weight.size(0), acc_dtype(weight), weight);
}

// --------------------------------------------------------------------------- helpers

// Rows of W per block: the whole weight (a view, no copy) when it is already in the
// accumulation dtype, else ~256K elements converted at a time.
inline int64_t weight_block_rows(const Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1);
  if (weight.scalar_type() == acc_dtype(weight)) return std::max<int64_t>(N, 1);
  return chunk_rows(N, K, int64_t(1) << 18, 16);
}

inline int64_t input_chunk_rows(int64_t M, int64_t width) { return chunk_rows(M, width, int64_t(1) << 19, 64); }

// --------------------------------------------------------------------------- weight norm

inline Tensor weight_norm_impl(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale,
                               const std::optional<Tensor>& weight_sq_norm) {
  const int64_t N = weight.size(0);
  const at::ScalarType acc = acc_dtype(weight);
  Tensor out = at::empty({N}, weight.options().dtype(acc));
  if (N == 0) return out;
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);
  const Tensor gram = at::mm(A, A.t());  // [r, r]
  const int64_t rows = weight_block_rows(weight);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nb = std::min(rows, N - n0);
    const Tensor W_b = weight.narrow(0, n0, nb).to(acc);
    const Tensor B_b = B.narrow(0, n0, nb);
    const Tensor a =
        has_tensor(weight_sq_norm) ? weight_sq_norm->narrow(0, n0, nb) : at::linalg_vector_norm(W_b, 2, {1}).square();
    const Tensor c = (B_b * at::mm(W_b, A.t())).sum(1).mul_(scale);  // s b_n . (A w_n)
    const Tensor q = (at::mm(B_b, gram) * B_b).sum(1).mul_(scale * scale);
    const Tensor n2 = a + 2.0 * c + q;
    const Tensor terms = a + 2.0 * c.abs() + q;
    Tensor n = n2.clamp_min(0.0).sqrt_();
    const Tensor bad = at::logical_not(at::ge(n2 * kCancellationRatio, terms));  // NaN rows too
    if (bad.any().item<bool>()) {
      const Tensor idx = bad.nonzero().squeeze(1);
      const Tensor direct = at::addmm(W_b.index_select(0, idx), B_b.index_select(0, idx), A, 1.0, scale);
      n.index_copy_(0, idx, at::linalg_vector_norm(direct, 2, {1}));
    }
    out.narrow(0, n0, nb).copy_(n);
  }
  return out;
}

// --------------------------------------------------------------------------- forward

inline Tensor forward_impl(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                           const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
                           const Tensor& weight_norm, double scale, const DropoutParams& drop, const Dropper& dropper) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::ScalarType acc = acc_dtype(x);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);
  const Tensor g = magnitude.to(acc) / weight_norm;  // [N]
  const Tensor gm1 = g - 1.0;
  const Tensor bias_acc = has_tensor(bias) ? bias->to(acc) : Tensor();
  const int64_t wrows = weight_block_rows(weight);
  const int64_t mrows = input_chunk_rows(M, std::max(K, N));
  for (int64_t m0 = 0; m0 < M; m0 += mrows) {
    const int64_t mc = std::min(mrows, M - m0);
    const Tensor x_c = x.narrow(0, m0, mc).to(acc);
    const Tensor xd_c = drop.on() ? dropper(x_c, m0) : x_c;           // keep ⊙ x, factor apart
    const Tensor xa = at::mm(xd_c, A.t()).mul_(scale * drop.factor);  // s x~ A^T [mc, r]
    for (int64_t n0 = 0; n0 < N; n0 += wrows) {
      const int64_t nb = std::min(wrows, N - n0);
      const Tensor W_b = weight.narrow(0, n0, nb).to(acc);
      const Tensor B_b = B.narrow(0, n0, nb);
      Tensor out;
      if (!drop.on()) {
        out = at::mm(x_c, W_b.t());
        out.addmm_(xa, B_b.t());
        out.mul_(g.narrow(0, n0, nb));
      } else {
        out = at::mm(x_c, W_b.t());
        const Tensor lin = at::mm(xd_c, W_b.t()).mul_(drop.factor);
        out.addcmul_(lin, gm1.narrow(0, n0, nb));
        out.addcmul_(at::mm(xa, B_b.t()), g.narrow(0, n0, nb));
      }
      if (bias_acc.defined()) out.add_(bias_acc.narrow(0, n0, nb));
      y.narrow(0, m0, mc).narrow(1, n0, nb).copy_(out);
    }
  }
  return y;
}

// --------------------------------------------------------------------------- backward

inline DoraGrads backward_impl(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                               const Tensor& lora_B, const Tensor& magnitude, const Tensor& weight_norm, double scale,
                               const DropoutParams& drop, const Dropper& dropper, std::array<bool, 6> mask) {
  const auto [need_x, need_w, need_bias, need_a, need_b, need_m] = mask;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const at::ScalarType acc = acc_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);
  const Tensor g = magnitude.to(acc) / weight_norm;
  const Tensor gm1 = g - 1.0;
  auto empty = [&] { return at::empty({0}, x.options()); };
  Tensor grad_x = need_x ? at::empty({M, K}, x.options()) : empty();
  Tensor gw_acc = need_w ? at::zeros({N, K}, acc_opts) : Tensor();
  Tensor gbias_acc = need_bias ? at::zeros({N}, acc_opts) : Tensor();
  Tensor ga_acc = need_a ? at::zeros({r, K}, acc_opts) : Tensor();
  Tensor gb_acc = need_b ? at::zeros({N, r}, acc_opts) : Tensor();
  Tensor gm_acc = need_m ? at::zeros({N}, acc_opts) : Tensor();
  const int64_t wrows = weight_block_rows(weight);
  const int64_t mrows = input_chunk_rows(M, std::max(K, N));
  for (int64_t m0 = 0; m0 < M && N > 0; m0 += mrows) {
    const int64_t mc = std::min(mrows, M - m0);
    const Tensor x_c = x.narrow(0, m0, mc).to(acc);
    const Tensor xd_c = drop.on() ? dropper(x_c, m0) : x_c;
    const Tensor xa = at::mm(xd_c, A.t()).mul_(drop.factor);  // x~ A^T [mc, r] (no scale)
    Tensor dx_c = need_x ? at::zeros({mc, K}, acc_opts) : Tensor();
    Tensor dxd_c = need_x && drop.on() ? at::zeros({mc, K}, acc_opts) : Tensor();  // before the mask
    Tensor ggB = need_x || need_a ? at::zeros({mc, r}, acc_opts) : Tensor();       // (G ⊙ g) B
    for (int64_t n0 = 0; n0 < N; n0 += wrows) {
      const int64_t nb = std::min(wrows, N - n0);
      const Tensor W_b = weight.narrow(0, n0, nb).to(acc);
      const Tensor B_b = B.narrow(0, n0, nb);
      const Tensor G_b = grad_out.narrow(0, m0, mc).narrow(1, n0, nb).to(acc);
      const Tensor Gg = G_b * g.narrow(0, n0, nb);
      if (need_x) {
        if (!drop.on()) {
          dx_c.addmm_(Gg, W_b);
        } else {
          dx_c.addmm_(G_b, W_b);
          dxd_c.addmm_(G_b * gm1.narrow(0, n0, nb), W_b);
        }
      }
      if (need_w) {
        Tensor gw_b = gw_acc.narrow(0, n0, nb);
        if (!drop.on()) {
          gw_b.addmm_(Gg.t(), x_c);
        } else {
          gw_b.addmm_(G_b.t(), x_c);
          gw_b.addmm_((G_b * gm1.narrow(0, n0, nb)).t(), xd_c, 1.0, drop.factor);
        }
      }
      if (ggB.defined()) ggB.addmm_(Gg, B_b);
      if (need_b) gb_acc.narrow(0, n0, nb).addmm_(Gg.t(), xa, 1.0, scale);
      if (need_m) {
        Tensor lin = at::mm(xd_c, W_b.t());
        if (drop.on()) lin.mul_(drop.factor);
        lin.addmm_(xa, B_b.t(), 1.0, scale);
        gm_acc.narrow(0, n0, nb).add_((G_b * lin).sum(0));
      }
      if (need_bias) gbias_acc.narrow(0, n0, nb).add_(G_b.sum(0));
    }
    if (need_a) ga_acc.addmm_(ggB.t(), xd_c, 1.0, scale * drop.factor);
    if (need_x) {
      if (!drop.on()) {
        dx_c.addmm_(ggB, A, 1.0, scale);
      } else {
        dxd_c.addmm_(ggB, A, 1.0, scale);
        dx_c.add_(dropper(dxd_c, m0), drop.factor);
      }
      grad_x.narrow(0, m0, mc).copy_(dx_c);
    }
  }
  if (need_x && N == 0) grad_x.zero_();
  const Tensor grad_w = need_w ? gw_acc.to(weight.scalar_type()) : empty();
  const Tensor grad_bias = need_bias ? gbias_acc.to(x.scalar_type()) : empty();
  const Tensor grad_a = need_a ? ga_acc.to(lora_A.scalar_type()) : empty();
  const Tensor grad_b = need_b ? gb_acc.to(lora_B.scalar_type()) : empty();
  const Tensor grad_m = need_m ? gm_acc.div_(weight_norm).to(magnitude.scalar_type()) : empty();
  return {grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m};
}

}  // namespace dora
}  // namespace lora_ext
