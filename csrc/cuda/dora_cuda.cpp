// CUDA registration of the DoRA ops (schemas: csrc/dora_bindings.cpp): the checked
// entries over the shared ATen routine of csrc/host/dora_impl.h (cuBLAS GEMMs through
// ATen on the current stream), with the dropout kernel of csrc/cuda/dropout.cu.
// The cancellation test of dora_weight_norm reads one flag on the host per weight block.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../host/dora_impl.h"
#include "cuda_check.h"
#include "kernels.h"

namespace lora_ext {
namespace {

using at::Tensor;

dora::Dropper cuda_dropper(const DropoutParams& drop) {
  return [&drop](const Tensor& x_c, int64_t row0) {
    const Tensor in = x_c.contiguous();
    Tensor out = at::empty_like(in);
    LORA_CUDA_CHECK(cuda::launch_apply_dropout(
        kernel_dtype(in.scalar_type()), {in.data_ptr(), in.stride(0), 1}, {out.data_ptr(), out.stride(0), 1},
        in.size(0), in.size(1), row0, in.size(1), drop.seed_ptr(), drop.threshold, at::cuda::getCurrentCUDAStream()));
    return out;
  };
}

Tensor dora_weight_norm_cuda(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale,
                             const std::optional<Tensor>& weight_sq_norm) {
  dora::check_weight_norm(weight, lora_A, lora_B, scale, weight_sq_norm);
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  return dora::weight_norm_impl(weight, lora_A, lora_B, scale, weight_sq_norm);
}

Tensor dora_linear_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                        const Tensor& lora_B, const Tensor& magnitude, const Tensor& weight_norm, double scale,
                        double dropout_p, const std::optional<Tensor>& dropout_seed) {
  dora::check_dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  return dora::forward_impl(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, drop, cuda_dropper(drop));
}

dora::DoraGrads dora_linear_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                          const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
                                          const Tensor& weight_norm, double scale, double dropout_p,
                                          const std::optional<Tensor>& dropout_seed, std::array<bool, 6> output_mask) {
  dora::check_dora_linear(x, weight, std::nullopt, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p,
                          dropout_seed);
  check_grad_out(grad_out, x, weight.size(0));
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  return dora::backward_impl(grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, scale, drop,
                             cuda_dropper(drop), output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("dora_weight_norm", &dora_weight_norm_cuda);
  m.impl("dora_linear", &dora_linear_cuda);
  m.impl("dora_linear_backward", &dora_linear_backward_cuda);
}

}  // namespace lora_ext
