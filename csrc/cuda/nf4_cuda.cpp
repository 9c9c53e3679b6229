// CUDA implementations of the NF4 ops: nf4_dequantize, and the QLoRA forward
// and backward as "dequantize into a transient buffer, then the fused LoRA op".
//
// The transient weight W = dequantize_nf4(·, x.dtype) [N, K] lives only for
// the duration of one call (the caching allocator reuses it across layers);
// nothing full-precision is kept between forward and backward. The LoRA math
// itself is lora_ext::lora_linear / lora_linear_backward, called through the
// dispatcher, so the strategy choice (shrink/expand vs merge), dropout and
// rounding are exactly those of the dense op. (A tile-streaming variant that
// never materialises [N, K] is the next step once it can be measured on a GPU.)
//
// nf4_quantize and blockwise_quantize_8bit have no CUDA kernel: the
// pure-PyTorch fallback (lora_ext/nf4.py) serves them on GPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>

#include "../nf4_ops.h"
#include "cuda_check.h"
#include "nf4_kernels.h"

namespace lora_ext {
namespace {

using at::Tensor;

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lora_ext: ", name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

nf4_cuda::OutType out_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return nf4_cuda::OutType::kFloat32;
    case at::kHalf:
      return nf4_cuda::OutType::kFloat16;
    case at::kBFloat16:
      return nf4_cuda::OutType::kBFloat16;
    case at::kDouble:
      return nf4_cuda::OutType::kFloat64;
    default:
      TORCH_CHECK(false, "lora_ext: dequantize_nf4 dtype must be a floating dtype, got ", dtype);
  }
}

// fp32 block scales on the GPU (one small kernel for double quantization).
Tensor scales_cuda(const Tensor& absmax, const std::optional<Tensor>& nested_absmax,
                   const std::optional<Tensor>& nested_code, double offset, int64_t nested_blocksize,
                   cudaStream_t stream) {
  if (!(nested_absmax.has_value() && nested_absmax->defined())) return absmax.reshape({-1}).contiguous();
  const Tensor q = absmax.reshape({-1}).contiguous();
  const Tensor nested = nested_absmax->reshape({-1}).contiguous();
  const Tensor code = nested_code->reshape({-1}).contiguous();
  Tensor scales = at::empty({q.numel()}, q.options().dtype(at::kFloat));
  LORA_CUDA_CHECK(nf4_cuda::launch_resolve_absmax(q.data_ptr<uint8_t>(), nested.data_ptr<float>(),
                                                  code.data_ptr<float>(), static_cast<float>(offset),
                                                  nested_blocksize, q.numel(), scales.data_ptr<float>(), stream));
  return scales;
}

Tensor dequantize(const Tensor& packed, const Tensor& absmax, const std::optional<Tensor>& nested_absmax,
                  const std::optional<Tensor>& nested_code, double offset, int64_t blocksize, int64_t nested_blocksize,
                  int64_t N, int64_t K, at::ScalarType dtype) {
  check_cuda(packed, "packed");
  check_nf4_storage(packed, absmax, nested_absmax, nested_code, blocksize, nested_blocksize, N, K);
  const c10::cuda::CUDAGuard guard(packed.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor scales = scales_cuda(absmax, nested_absmax, nested_code, offset, nested_blocksize, stream);
  const Tensor p = packed.contiguous();
  Tensor out = at::empty({N, K}, packed.options().dtype(dtype));
  LORA_CUDA_CHECK(nf4_cuda::launch_dequantize(out_type(dtype), p.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                              log2_exact(blocksize), N * K, out.data_ptr(), stream));
  return out;
}

Tensor nf4_dequantize_cuda(const Tensor& packed, const Tensor& absmax, const std::optional<Tensor>& nested_absmax,
                           const std::optional<Tensor>& nested_code, double offset, int64_t blocksize,
                           int64_t nested_blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(shape.size() == 2, "lora_ext: NF4 weight shape must be 2-D [N, K] with N, K > 0, got ", shape);
  return dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape[0],
                    shape[1], dtype);
}

Tensor lora_linear_nf4_cuda(const Tensor& x, const Tensor& packed, const Tensor& absmax,
                            const std::optional<Tensor>& nested_absmax, const std::optional<Tensor>& nested_code,
                            double offset, int64_t blocksize, int64_t nested_blocksize, int64_t out_features,
                            const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                            double scale, double dropout_p, const std::optional<Tensor>& dropout_seed) {
  check_cuda(x, "x");
  check_nf4_lora(x, packed, out_features, bias, lora_A, lora_B, scale, dropout_p, dropout_seed);
  const Tensor w = dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                              out_features, x.size(1), x.scalar_type());
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ext::lora_linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                     const Tensor&, double, double, const std::optional<Tensor>&, int64_t)>();
  return op.call(x, w, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, /*strategy=auto*/ 0);
}

NF4GradTuple lora_linear_nf4_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& packed,
                                           const Tensor& absmax, const std::optional<Tensor>& nested_absmax,
                                           const std::optional<Tensor>& nested_code, double offset,
                                           int64_t blocksize, int64_t nested_blocksize, int64_t out_features,
                                           const Tensor& lora_A, const Tensor& lora_B, double scale,
                                           double dropout_p, const std::optional<Tensor>& dropout_seed,
                                           std::array<bool, 4> mask) {
  check_cuda(x, "x");
  check_nf4_lora(x, packed, out_features, std::nullopt, lora_A, lora_B, scale, dropout_p, dropout_seed);
  const Tensor w = dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                              out_features, x.size(1), x.scalar_type());
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lora_ext::lora_linear_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
              const std::optional<Tensor>&, int64_t, std::array<bool, 5>)>();
  auto [gx, gw, gbias, ga, gb] = op.call(grad_out, x, w, lora_A, lora_B, scale, dropout_p, dropout_seed, 0,
                                         {mask[0], false, mask[1], mask[2], mask[3]});
  (void)gw;
  return {gx, gbias, ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("lora_linear_nf4", &lora_linear_nf4_cuda);
  m.impl("lora_linear_nf4_backward", &lora_linear_nf4_backward_cuda);
}

}  // namespace lora_ext
