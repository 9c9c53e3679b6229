// Host-side helpers of the NF4 ops shared by the CPU and CUDA implementations:
// named input checks (same messages as lora_ext/nf4.py) and the fp32 block
// scales of a (possibly double-quantized) weight.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "nf4_format.h"

namespace lora_ext {

using NF4GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// packed uint8 [(n+1)/2], absmax fp32 [nblocks] or uint8 codes with nested_absmax fp32
// [ceil(nblocks / nested_blocksize)] and nested_code fp32 [256]; all on packed's device.
inline void check_nf4_storage(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code, int64_t blocksize,
                              int64_t nested_blocksize, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(nf4::is_supported_blocksize(blocksize),
              "lora_ext: NF4 blocksize must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096), got ", blocksize);
  TORCH_CHECK_VALUE(N > 0 && K > 0, "lora_ext: NF4 weight shape must be 2-D [N, K] with N, K > 0, got [", N, ", ", K, "]");
  const int64_t n = N * K;
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "lora_ext: packed NF4 data must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, "lora_ext: packed NF4 data of a [", N, ", ", K,
              "] weight must hold (N*K+1)//2 = ", (n + 1) / 2, " bytes, got ", packed.numel(), " (shape ",
              packed.sizes(), ")");
  const int64_t blocks = nf4::ceil_div(n, blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == blocks, "lora_ext: absmax must hold ceil(N*K/blocksize) = ", blocks,
              " block scales for a [", N, ", ", K, "] weight with blocksize ", blocksize, ", got ", absmax.numel());
  TORCH_CHECK_VALUE(absmax.device() == packed.device(), "lora_ext: absmax is on ", absmax.device(), " but packed is on ",
              packed.device());
  const bool nested = nested_absmax.has_value() && nested_absmax->defined();
  if (!nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat,
                "lora_ext: absmax must be float32 without double quantization, got ", absmax.scalar_type());
    TORCH_CHECK_VALUE(!(nested_code.has_value() && nested_code->defined()),
                "lora_ext: nested_code given without nested_absmax");
    return;
  }
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, "lora_ext: double-quantized absmax must be uint8 codes, got ",
              absmax.scalar_type());
  TORCH_CHECK_VALUE(nested_code.has_value() && nested_code->defined() && nested_code->scalar_type() == at::kFloat &&
                  nested_code->numel() == 256,
              "lora_ext: double quantization needs nested_code, a float32 tensor of 256 values");
  TORCH_CHECK_VALUE(nested_blocksize > 0, "lora_ext: nested_blocksize must be positive, got ", nested_blocksize);
  const int64_t nested_blocks = nf4::ceil_div(blocks, nested_blocksize);
  TORCH_CHECK_VALUE(nested_absmax->scalar_type() == at::kFloat && nested_absmax->numel() == nested_blocks,
              "lora_ext: nested_absmax must be float32 with ceil(", blocks, "/", nested_blocksize,
              ") = ", nested_blocks, " values, got ", nested_absmax->scalar_type(), " with ", nested_absmax->numel());
  TORCH_CHECK_VALUE(nested_absmax->device() == packed.device() && nested_code->device() == packed.device(),
              "lora_ext: nested_absmax and nested_code must be on packed's device ", packed.device());
}

// fp32 [nblocks] block scales, contiguous. Double quantization: code[q] * nested_absmax[b / nbs]
// then + offset, as two separately rounded fp32 ops (bitsandbytes' order; no FMA).
inline at::Tensor resolve_absmax(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code, double offset,
                                 int64_t nested_blocksize) {
  if (!(nested_absmax.has_value() && nested_absmax->defined())) return absmax.reshape({-1}).contiguous();
  const int64_t n = absmax.numel();
  const at::Tensor vals = nested_code->reshape({-1}).index_select(0, absmax.reshape({-1}).to(at::kLong));
  const at::Tensor scales = nested_absmax->reshape({-1}).repeat_interleave(nested_blocksize).narrow(0, 0, n);
  at::Tensor out = vals.mul(scales);
  out.add_(at::scalar_tensor(static_cast<float>(offset), out.options()));
  return out.contiguous();
}

// x [M, K] and the adapter in one float dtype on packed's device; bias [N] or none.
inline void check_nf4_lora(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                           double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(x.dim() == 2, "lora_ext: x must be 2-D [M, K] at the op level, got shape ", x.sizes());
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.device() == packed.device(), "lora_ext: x is on ", x.device(), " but the NF4 weight is on ",
              packed.device());
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_B.dim() == 2, "lora_ext: lora_A [r, K] and lora_B [N, r] must be 2-D, got ",
              lora_A.sizes(), " and ", lora_B.sizes());
  check_same_dtype_device(x, "x", lora_A, "lora_A");
  check_same_dtype_device(x, "x", lora_B, "lora_B");
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(r > 0, "lora_ext: rank must be positive, got lora_A of shape ", lora_A.sizes());
  TORCH_CHECK_VALUE(lora_A.size(1) == K, "lora_ext: lora_A must be [r, K] with K = ", K, " (x is ", x.sizes(),
              "), got lora_A of shape ", lora_A.sizes());
  TORCH_CHECK_VALUE(lora_B.size(0) == N && lora_B.size(1) == r, "lora_ext: lora_B must be [N, r] = [", N, ", ", r,
              "], got lora_B of shape ", lora_B.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same_dtype_device(x, "x", *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "lora_ext: bias must be [N] = [", N, "], got shape ",
                bias->sizes());
  }
  check_scale(scale);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "lora_ext: dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(dropout_seed.has_value() && dropout_seed->defined(),
                "lora_ext: dropout_p > 0 needs a dropout_seed tensor");
    TORCH_CHECK_VALUE(dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
                "lora_ext: dropout_seed must be a one-element int64 tensor, got shape ", dropout_seed->sizes(),
                " and dtype ", dropout_seed->scalar_type());
    TORCH_CHECK_VALUE(dropout_seed->device() == x.device(), "lora_ext: dropout_seed is on ", dropout_seed->device(),
                " but x is on ", x.device());
  }
}

}  // namespace lora_ext
