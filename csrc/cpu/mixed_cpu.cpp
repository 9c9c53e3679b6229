// CPU kernels of the mixed-adapter LoRA linear (one adapter, or none, per row) on ATen GEMMs.
//
// The rows are grouped by adapter once per call: a stable counting sort of adapter_index
// (O(M) on the host, no per-adapter pass over the index). Each adapter then owns one
// contiguous segment of the permutation, and its LoRA branch is two GEMMs over the
// gathered rows of that segment:
//
//   forward   y      = x W^T + bias                                one GEMM over all rows
//             xa_s   = drop_a(x[seg]) A[a]^T          [c, r]       per segment
//             y[seg] += (s_a q_a xa_s) B[a]^T         [c, N]       index_add into the fp32 y
//   backward  grad_x = g W                                         one GEMM over all rows
//             gb_s   = g[seg] B[a]                    [c, r]
//             grad_x[seg] += s_a q_a mask ⊙ (gb_s A[a])
//             grad_A[a] = s_a q_a gb_s^T drop_a(x[seg]),  grad_B[a] = s_a q_a g[seg]^T xa_s
//
// Segments of empty adapters cost nothing; their gradients are zero. Rows of adapter -1
// take the base only. Numerics as lora_cpu.cpp: fp32 accumulation (fp64 for float64),
// the [c, r] intermediates stay there, each output is rounded once (half/bf16 inputs are
// widened to fp32 for the whole call, which keeps the one rounding).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../host/checks.h"
#include "../host/common.h"
#include "../host/mixed.h"

namespace lora_ext {
namespace {

using at::Tensor;

// Rows grouped by adapter: perm[start[a + 1] .. start[a + 2]) are the rows of adapter a in
// increasing order (bucket 0 holds the -1 rows). start has n + 2 entries, start[n + 1] = M.
struct Groups {
  std::vector<int64_t> start;
  Tensor perm;  // int64 [M]

  int64_t begin(int64_t a) const { return start[a + 1]; }
  int64_t count(int64_t a) const { return start[a + 2] - start[a + 1]; }
  Tensor rows(int64_t a) const { return perm.narrow(0, begin(a), count(a)); }
};

Groups group_rows(const Tensor& adapter_index, int64_t n) {
  const Tensor idx = adapter_index.contiguous();
  const int64_t M = idx.size(0);
  const int64_t* a = idx.data_ptr<int64_t>();
  Groups g;
  g.start.assign(n + 2, 0);
  for (int64_t i = 0; i < M; ++i) ++g.start[a[i] + 1];  // bucket a+1 counts adapter a (bucket 0: -1)
  int64_t run = 0;
  for (int64_t b = 0; b <= n; ++b) {  // exclusive prefix sum: start[b] = first slot of bucket b
    const int64_t c = g.start[b];
    g.start[b] = run;
    run += c;
  }
  g.start[n + 1] = M;
  g.perm = at::empty({M}, idx.options());
  int64_t* perm = g.perm.data_ptr<int64_t>();
  std::vector<int64_t> cursor(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < M; ++i) perm[cursor[a[i] + 1]++] = i;
  return g;
}

// xs [c, K] (contiguous, acc dtype) *= keep(seed, row*K + k) for the gathered rows of one adapter.
template <typename T>
void apply_mask(Tensor& xs, const Tensor& rows, int64_t K, uint64_t seed, uint64_t threshold) {
  T* data = xs.data_ptr<T>();
  const int64_t* r = rows.data_ptr<int64_t>();
  at::parallel_for(0, xs.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t base = static_cast<uint64_t>(r[i]) * static_cast<uint64_t>(K);
      for (int64_t k = 0; k < K; ++k) {
        if (!dropout_keep(seed, base + static_cast<uint64_t>(k), threshold)) data[i * K + k] = T(0);
      }
    }
  });
}

// drop_a(x[rows]) in the accumulation dtype (a fresh contiguous tensor), and its keep mask as 0/1 when asked.
Tensor gathered_input(const Tensor& x_acc, const Tensor& rows, const MixedDropout& drop, int64_t a, uint64_t seed) {
  Tensor xs = x_acc.index_select(0, rows).contiguous();
  if (drop.threshold[a] > 0) {
    if (xs.scalar_type() == at::kDouble) {
      apply_mask<double>(xs, rows, x_acc.size(1), seed, drop.threshold[a]);
    } else {
      apply_mask<float>(xs, rows, x_acc.size(1), seed, drop.threshold[a]);
    }
  }
  return xs;
}

Tensor keep_mask(const Tensor& rows, int64_t K, uint64_t seed, uint64_t threshold, at::ScalarType acc) {
  Tensor ones = at::ones({rows.size(0), K}, rows.options().dtype(acc));
  if (acc == at::kDouble) {
    apply_mask<double>(ones, rows, K, seed, threshold);
  } else {
    apply_mask<float>(ones, rows, K, seed, threshold);
  }
  return ones;
}

uint64_t seed_value(const MixedDropout& drop, const std::optional<Tensor>& dropout_seed) {
  return drop.on ? static_cast<uint64_t>(dropout_seed->reshape({}).item<int64_t>()) : 0;
}

}  // namespace

Tensor lora_linear_mixed_cpu(LORA_EXT_MIXED_PARAMS) {
  check_lora_linear_mixed(x, weight, bias, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed);
  check_cpu(x, "x");
  const int64_t M = x.size(0), N = weight.size(0), n = lora_A.size(0);
  if (M == 0) return at::empty({0, N}, x.options());
  const at::ScalarType acc = acc_dtype(x);
  const Tensor x_acc = x.to(acc), w_acc = weight.to(acc);
  Tensor y = has_tensor(bias) ? at::addmm(bias->to(acc), x_acc, w_acc.t()) : at::mm(x_acc, w_acc.t());
  const MixedDropout drop = make_mixed_dropout(dropout_p);
  const uint64_t seed = seed_value(drop, dropout_seed);
  const Groups groups = group_rows(adapter_index, n);
  for (int64_t a = 0; a < n; ++a) {
    if (groups.count(a) == 0 || drop.factor[a] == 0.0) continue;
    const Tensor rows = groups.rows(a);
    const Tensor xs = gathered_input(x_acc, rows, drop, a, seed);
    const Tensor xa = at::mm(xs, lora_A[a].to(acc).t()).mul_(scale[a] * drop.factor[a]);  // [c, r]
    y.index_add_(0, rows, at::mm(xa, lora_B[a].to(acc).t()));
  }
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

MixedGradTuple lora_linear_mixed_backward_cpu(LORA_EXT_MIXED_BACKWARD_PARAMS) {
  check_lora_linear_mixed(x, weight, std::nullopt, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed);
  check_mixed_grad_out(grad_out, x, weight.size(0));
  check_cpu(x, "x");
  const auto [need_x, need_bias, need_a, need_b] = output_mask;
  const int64_t M = x.size(0), K = x.size(1), n = lora_A.size(0);
  const at::ScalarType acc = acc_dtype(x);
  auto empty = [&] { return at::empty({0}, x.options()); };
  const Tensor g = grad_out.to(acc), x_acc = x.to(acc);
  Tensor gx = need_x ? at::mm(g, weight.to(acc)) : Tensor();
  Tensor ga = need_a ? at::zeros(lora_A.sizes(), lora_A.options().dtype(acc)) : Tensor();
  Tensor gb = need_b ? at::zeros(lora_B.sizes(), lora_B.options().dtype(acc)) : Tensor();
  if (M > 0 && (need_x || need_a || need_b)) {
    const MixedDropout drop = make_mixed_dropout(dropout_p);
    const uint64_t seed = seed_value(drop, dropout_seed);
    const Groups groups = group_rows(adapter_index, n);
    for (int64_t a = 0; a < n; ++a) {
      if (groups.count(a) == 0 || drop.factor[a] == 0.0) continue;
      const Tensor rows = groups.rows(a);
      const Tensor A = lora_A[a].to(acc), B = lora_B[a].to(acc);  // [r, K], [N, r]
      const Tensor gs = g.index_select(0, rows);                  // [c, N]
      const Tensor gbs = at::mm(gs, B);                           // [c, r]
      const double sq = scale[a] * drop.factor[a];
      if (need_x) {
        Tensor part = at::mm(gbs, A).mul_(sq);  // [c, K]
        if (drop.threshold[a] > 0) part.mul_(keep_mask(rows, K, seed, drop.threshold[a], acc));
        gx.index_add_(0, rows, part);
      }
      if (need_a || need_b) {
        const Tensor xs = gathered_input(x_acc, rows, drop, a, seed);
        if (need_a) {
          Tensor ga_a = ga[a];
          at::mm_out(ga_a, gbs.t(), xs).mul_(sq);
        }
        if (need_b) {
          Tensor gb_a = gb[a];
          at::mm_out(gb_a, gs.t(), at::mm(xs, A.t())).mul_(sq);
        }
      }
    }
  }
  const Tensor grad_x = need_x ? gx.to(x.scalar_type()) : empty();
  const Tensor grad_bias = need_bias ? g.sum(0).to(x.scalar_type()) : empty();
  const Tensor grad_a = need_a ? ga.to(lora_A.scalar_type()) : empty();
  const Tensor grad_b = need_b ? gb.to(lora_B.scalar_type()) : empty();
  return {grad_x, grad_bias, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear_mixed", &lora_linear_mixed_cpu);
  m.impl("lora_linear_mixed_backward", &lora_linear_mixed_backward_cpu);
}

}  // namespace lora_ext
