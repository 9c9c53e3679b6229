// CUDA implementations of the NF4 ops: nf4_dequantize, and the QLoRA forward
// and backward as "dequantize into a transient buffer, then the dense LoRA op".
//
// The transient weight W = dequantize_nf4(·, x.dtype) [N, K] lives only for
// the duration of one call (the caching allocator reuses it across layers);
// nothing full-precision is kept between forward and backward. The LoRA math
// itself is the dense CUDA op's implementation (lora_linear_cuda_impl /
// lora_linear_backward_cuda_impl, ../ops.h), called after this op's own checks
// and without re-validating, so the strategy choice (shrink/expand vs merge),
// dropout and rounding are exactly those of the dense op. (A tile-streaming
// variant that never materialises [N, K] is the next step once it can be
// measured on a GPU.)
//
// nf4_quantize and blockwise_quantize_8bit have no CUDA kernel: the
// pure-PyTorch fallback (lora_ext/ops/reference.py) serves them on GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>

#include "../host/checks.h"
#include "../host/common.h"
#include "../host/nf4_entries.h"
#include "../host/nf4_params.h"
#include "../host/strategy.h"
#include "../ops.h"
#include "blas.h"
#include "cuda_check.h"
#include "nf4_kernels.h"

namespace lora_ext {
namespace {

using at::Tensor;

// fp32 block scales on the GPU (one small kernel for double quantization).
Tensor scales_cuda(const NF4Params& w, cudaStream_t stream) {
  if (!w.double_quant()) return w.absmax.reshape({-1}).contiguous();
  const Tensor q = w.absmax.reshape({-1}).contiguous();
  const Tensor nested = w.nested_absmax->reshape({-1}).contiguous();
  const Tensor code = w.nested_code->reshape({-1}).contiguous();
  Tensor scales = at::empty({q.numel()}, q.options().dtype(at::kFloat));
  LORA_CUDA_CHECK(nf4_cuda::launch_resolve_absmax(q.data_ptr<uint8_t>(), nested.data_ptr<float>(),
                                                  code.data_ptr<float>(), static_cast<float>(w.offset),
                                                  w.nested_blocksize, q.numel(), scales.data_ptr<float>(), stream));
  return scales;
}

// W [N, K] in `dtype`; the storage was checked by the caller.
Tensor dequantize(const NF4Params& w, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = cuda::current_stream();
  const Tensor scales = scales_cuda(w, stream);
  const Tensor p = w.packed.contiguous();
  Tensor out = at::empty({w.N, w.K}, w.packed.options().dtype(dtype));
  LORA_CUDA_CHECK(nf4_cuda::launch_dequantize(kernel_dtype(dtype), p.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                              w.log2_blocksize(), w.N * w.K, out.data_ptr(), stream));
  return out;
}

Tensor nf4_dequantize_cuda(const NF4Params& w, at::IntArrayRef shape, at::ScalarType dtype) {
  return dequantize(w, dtype);
}

// The unchecked NF4 LoRA ops: W dequantized into a transient in x's dtype, then the dense CUDA op.
Tensor lora_linear_nf4_forward_cuda(const Tensor& x, const NF4Params& w, const std::optional<Tensor>& bias,
                                    const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                                    const std::optional<Tensor>& dropout_seed) {
  return lora_linear_cuda_impl(x, dequantize(w, x.scalar_type()), bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
                               kAuto);
}

NF4GradTuple lora_linear_nf4_backward_cuda(const Tensor& grad_out, const Tensor& x, const NF4Params& w,
                                           const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                                           const std::optional<Tensor>& dropout_seed, std::array<bool, 4> mask) {
  auto [gx, gw, gbias, ga, gb] =
      lora_linear_backward_cuda_impl(grad_out, x, dequantize(w, x.scalar_type()), lora_A, lora_B, scale, dropout_p,
                                     dropout_seed, kAuto, {mask[0], false, mask[1], mask[2], mask[3]});
  (void)gw;
  return {gx, gbias, ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("nf4_dequantize", &nf4_dequantize_entry<c10::DeviceType::CUDA, &nf4_dequantize_cuda>);
  m.impl("lora_linear_nf4", &lora_linear_nf4_entry<c10::DeviceType::CUDA, &lora_linear_nf4_forward_cuda>);
  m.impl("lora_linear_nf4_backward",
         &lora_linear_nf4_backward_entry<c10::DeviceType::CUDA, &lora_linear_nf4_backward_cuda>);
}

}  // namespace lora_ext
