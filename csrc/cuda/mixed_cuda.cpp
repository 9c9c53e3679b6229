// CUDA launchers of the mixed-adapter LoRA linear: validate (../host/mixed.h), guard the device,
// group the rows by adapter once (a stable sort of adapter_index and the segment starts by
// searchsorted, all on the device: no host loop over adapters), then the base GEMM in cuBLAS
// (fp32/fp64 output) and one kernel per rank-r product (mixed.cu), on PyTorch's current stream.
//
//   forward   base = x W^T + bias (Acc [M, N]), xa = shrink, y = round(base + expand(xa))
//   backward  gw = g W (Acc [M, K]), gb = g B[a], grad_x = round(gw + s q mask (gb A[a])),
//             grad_A / grad_B = per-adapter segmented reductions, grad_bias = sum_rows g
//
// The [M, r] intermediates (xa, gb) stay in Acc; x, g and the outputs are read/written in place
// through their strides. Compiled; not yet run on a GPU (see docs/design.md).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../host/checks.h"
#include "../host/common.h"
#include "../host/mixed.h"
#include "blas.h"
#include "cuda_check.h"
#include "mixed_kernels.h"

namespace lora_ext {
namespace {

using at::Tensor;

struct Grouped {
  Tensor perm, sorted, start;
  cuda::MixedRows rows(int64_t n) const {
    return {perm.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(), start.data_ptr<int64_t>(), perm.size(0), n};
  }
};

Grouped group_rows(const Tensor& adapter_index, int64_t n) {
  auto [sorted, perm] = at::sort(adapter_index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // start[b] = first sorted position whose adapter is >= b - 1, for b = 0 .. n + 1 (start[n + 1] = M).
  const Tensor bounds = at::arange(-1, n + 1, adapter_index.options());
  Tensor start = at::searchsorted(sorted, bounds);
  return {perm.contiguous(), sorted.contiguous(), start.contiguous()};
}

// The per-adapter scalars on the device, and the factor view the kernels take.
struct Factors {
  Tensor A, B, scale_q, threshold;
  cuda::MixedFactors view(const std::optional<Tensor>& seed, bool dropout, int64_t N, int64_t K) const {
    return {A.data_ptr(),
            B.data_ptr(),
            scale_q.data_ptr<double>(),
            threshold.data_ptr<int64_t>(),
            dropout ? seed->data_ptr<int64_t>() : nullptr,
            A.size(1),
            N,
            K};
  }
};

Factors make_factors(const Tensor& lora_A, const Tensor& lora_B, c10::ArrayRef<double> scale, const MixedDropout& drop,
                     bool scaled) {
  std::vector<double> sq(scale.size());
  std::vector<int64_t> thr(scale.size());
  for (size_t a = 0; a < scale.size(); ++a) {
    sq[a] = scaled ? scale[a] * drop.factor[a] : 1.0;
    thr[a] = static_cast<int64_t>(drop.threshold[a]);
  }
  const auto dev = lora_A.device();
  return {lora_A.contiguous(), lora_B.contiguous(),
          at::tensor(c10::ArrayRef<double>(sq), at::TensorOptions().dtype(at::kDouble)).to(dev),
          at::tensor(c10::ArrayRef<int64_t>(thr), at::TensorOptions().dtype(at::kLong)).to(dev)};
}

cuda::ConstMatrix cview(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
cuda::Matrix mview(Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

}  // namespace

Tensor lora_linear_mixed_cuda(LORA_EXT_MIXED_PARAMS) {
  check_lora_linear_mixed(x, weight, bias, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n = lora_A.size(0), r = lora_A.size(1);
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  cudaStream_t stream = cuda::current_stream();
  const at::ScalarType acc = acc_dtype(x);
  const DType dt = kernel_dtype(x.scalar_type());
  const MixedDropout drop = make_mixed_dropout(dropout_p);
  const Grouped groups = group_rows(adapter_index, n);
  const Factors fac = make_factors(lora_A, lora_B, scale, drop, /*scaled=*/true);
  const cuda::MixedFactors f = fac.view(dropout_seed, drop.on, N, K);

  Tensor base = at::empty({M, N}, x.options().dtype(acc));
  double beta = 0.0;
  if (has_tensor(bias)) {
    base.copy_(bias->to(acc).expand({M, N}));
    beta = 1.0;
  }
  const Tensor xb = cuda::blas_friendly(x);
  cuda::gemm_into(M, N, K, cuda::operand(xb), cuda::operand(weight).t(), beta, base, stream);
  Tensor xa = at::empty({M, r}, x.options().dtype(acc));
  LORA_CUDA_CHECK(cuda::launch_mixed_shrink(dt, groups.rows(n), f, cview(xb), xa.data_ptr(), stream));
  LORA_CUDA_CHECK(cuda::launch_mixed_expand(dt, groups.rows(n), f, base.data_ptr(), xa.data_ptr(), mview(y), stream));
  return y;
}

MixedGradTuple lora_linear_mixed_backward_cuda(LORA_EXT_MIXED_BACKWARD_PARAMS) {
  check_lora_linear_mixed(x, weight, std::nullopt, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed);
  check_mixed_grad_out(grad_out, x, weight.size(0));
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [need_x, need_bias, need_a, need_b] = output_mask;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n = lora_A.size(0), r = lora_A.size(1);
  const at::ScalarType acc = acc_dtype(x);
  const DType dt = kernel_dtype(x.scalar_type());
  auto empty = [&] { return at::empty({0}, x.options()); };
  Tensor grad_x = need_x ? at::empty({M, K}, x.options()) : empty();
  Tensor grad_bias = empty();
  Tensor grad_a = need_a ? at::empty(lora_A.sizes(), lora_A.options()) : empty();
  Tensor grad_b = need_b ? at::empty(lora_B.sizes(), lora_B.options()) : empty();
  if (need_bias) grad_bias = grad_out.to(acc).sum(0).to(x.scalar_type());
  if (!(need_x || need_a || need_b)) return {grad_x, grad_bias, grad_a, grad_b};
  if (M == 0) {  // no rows: every factor gradient is zero
    if (need_a) grad_a.zero_();
    if (need_b) grad_b.zero_();
    return {grad_x, grad_bias, grad_a, grad_b};
  }
  cudaStream_t stream = cuda::current_stream();
  const MixedDropout drop = make_mixed_dropout(dropout_p);
  const Grouped groups = group_rows(adapter_index, n);
  const cuda::MixedRows rows = groups.rows(n);
  const Tensor g = cuda::blas_friendly(grad_out), xb = cuda::blas_friendly(x);
  const Factors scaled = make_factors(lora_A, lora_B, scale, drop, /*scaled=*/true);
  const cuda::MixedFactors f = scaled.view(dropout_seed, drop.on, N, K);

  Tensor gb;
  if (need_x || need_a) {
    gb = at::empty({M, r}, x.options().dtype(acc));
    LORA_CUDA_CHECK(cuda::launch_mixed_gb(dt, rows, f, cview(g), gb.data_ptr(), stream));
  }
  if (need_x) {
    Tensor gw = at::empty({M, K}, x.options().dtype(acc));
    cuda::gemm_into(M, K, N, cuda::operand(g), cuda::operand(weight), 0.0, gw, stream);
    LORA_CUDA_CHECK(cuda::launch_mixed_grad_x(dt, rows, f, gw.data_ptr(), gb.data_ptr(), mview(grad_x), stream));
  }
  if (need_a)
    LORA_CUDA_CHECK(cuda::launch_mixed_grad_A(dt, rows, f, cview(xb), gb.data_ptr(), grad_a.data_ptr(), stream));
  if (need_b) {
    Tensor xa = at::empty({M, r}, x.options().dtype(acc));  // carries s q: grad_B = g^T xa per adapter
    LORA_CUDA_CHECK(cuda::launch_mixed_shrink(dt, rows, f, cview(xb), xa.data_ptr(), stream));
    LORA_CUDA_CHECK(cuda::launch_mixed_grad_B(dt, rows, f, cview(g), xa.data_ptr(), grad_b.data_ptr(), stream));
  }
  return {grad_x, grad_bias, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear_mixed", &lora_linear_mixed_cuda);
  m.impl("lora_linear_mixed_backward", &lora_linear_mixed_backward_cuda);
}

}  // namespace lora_ext
