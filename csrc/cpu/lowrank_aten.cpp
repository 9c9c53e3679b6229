// The shared low-rank branch of the CPU ops (see lowrank_aten.h).
#include "lowrank_aten.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace lora_ext {
namespace cpu {
namespace {

template <typename scalar_t>
void apply_keep_mask_kernel(scalar_t* data, int64_t rows, int64_t K, int64_t row0, const DropoutParams& d) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(K);
      scalar_t* row = data + i * K;
      for (int64_t k = 0; k < K; ++k) {
        if (!dropout_keep(d.seed, base + static_cast<uint64_t>(k), d.threshold)) row[k] *= scalar_t(0);
      }
    }
  });
}

}  // namespace

void apply_keep_mask_(at::Tensor& t, int64_t row0, const DropoutParams& d) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.dim() == 2);
  if (t.scalar_type() == at::kDouble) {
    apply_keep_mask_kernel<double>(t.data_ptr<double>(), t.size(0), t.size(1), row0, d);
  } else {
    TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat);
    apply_keep_mask_kernel<float>(t.data_ptr<float>(), t.size(0), t.size(1), row0, d);
  }
}

at::Tensor dropped(const at::Tensor& x_c, at::ScalarType acc, int64_t row0, const DropoutParams& d) {
  if (!d.on()) return x_c.to(acc);
  at::Tensor out = x_c.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  apply_keep_mask_(out, row0, d);
  return out;
}

void add_lowrank_forward(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale,
                         const DropoutParams& d, int64_t row0) {
  if (d.branch_zero()) return;
  const at::ScalarType acc = A.scalar_type();
  const double s = scale * d.factor;
  if (!d.on()) {
    out.addmm_(at::mm(x.to(acc), A.t()), B.t(), 1.0, s);  // [rows, r] intermediate
    return;
  }
  const int64_t M = x.size(0), rows = chunk_rows(M, x.size(1));
  for (int64_t m0 = 0; m0 < M; m0 += rows) {
    const int64_t mc = std::min(rows, M - m0);
    at::Tensor out_c = out.narrow(0, m0, mc);
    out_c.addmm_(at::mm(dropped(x.narrow(0, m0, mc), acc, row0 + m0, d), A.t()), B.t(), 1.0, s);
  }
}

void add_lowrank_backward(const at::Tensor& g_c, const at::Tensor& x_c, const at::Tensor& A, const at::Tensor& B,
                          double scale, const DropoutParams& d, int64_t row0, at::Tensor& grad_A_acc,
                          at::Tensor& grad_B_acc, at::Tensor* dx_c) {
  if (d.branch_zero()) return;  // the branch is identically zero: nothing to add
  const at::ScalarType acc = A.scalar_type();
  const bool need_a = grad_A_acc.defined(), need_b = grad_B_acc.defined();
  const at::Tensor gb = (need_a || dx_c != nullptr) ? at::mm(g_c, B) : at::Tensor();  // [rows, r]
  if (need_a || need_b) {
    const at::Tensor xd = dropped(x_c, acc, row0, d);
    if (need_a) grad_A_acc.addmm_(gb.t(), xd);
    if (need_b) grad_B_acc.addmm_(g_c.t(), at::mm(xd, A.t()));
  }
  if (dx_c != nullptr) {
    const double s = scale * d.factor;
    if (d.on()) {
      at::Tensor t = at::mm(gb, A);  // [rows, K], contiguous
      apply_keep_mask_(t, row0, d);
      dx_c->add_(t, s);
    } else {
      dx_c->addmm_(gb, A, 1.0, s);
    }
  }
}

}  // namespace cpu
}  // namespace lora_ext
