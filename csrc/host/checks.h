// Named input checks of every op, shared by the CPU and CUDA kernels. The
// contract is lora_ext/ops/checks.py's (the dense and the NF4 ops),
// in the same order and with the same messages, so a bad call raises the same
// Python exception on every path:
//   TORCH_CHECK_VALUE -> ValueError: shapes and values (ranks, K, N, bias, scale,
//                                    dropout_p, the dropout seed, strategy, NF4 storage sizes)
//   TORCH_CHECK_TYPE  -> TypeError : dtypes, and tensors on different devices (the seed
//                                    and the NF4 storage included)
// Each op entry validates once; the functions it calls trust their inputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

#include "../nf4_format.h"
#include "nf4_params.h"

namespace lora_ext {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// A dtype as Python prints it ("torch.float32"), so C++ and Python messages read the same.
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    default:
      return c10::toString(t);
  }
}

inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "lora_ext: ", name,
                   " must be float32, float16, bfloat16 or float64, got ", dtype_str(dt));
}

inline void check_same_dtype_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                    const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "lora_ext: ", name, " has dtype ", dtype_str(t.scalar_type()),
                   " but ", ref_name, " has dtype ", dtype_str(ref.scalar_type()),
                   "; all tensors must share one dtype");
  TORCH_CHECK_TYPE(t.device() == ref.device(), "lora_ext: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                   ref.device(), "; all tensors must be on one device");
}

inline void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "lora_ext: scale must be finite, got ", scale);
}

inline void check_strategy(int64_t strategy) {
  TORCH_CHECK_VALUE(strategy >= 0 && strategy <= 2,
                    "lora_ext: strategy must be 0 (auto), 1 (shrink_expand) or 2 (merge), got ", strategy);
}

// dropout_p in [0, 1]; with p > 0 a one-element int64 seed on x's device.
inline void check_dropout_p(double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "lora_ext: dropout_p must be in [0, 1], got ", dropout_p);
}

inline void check_dropout_seed(double dropout_p, const std::optional<at::Tensor>& dropout_seed, const at::Tensor& x) {
  if (dropout_p <= 0.0) return;
  TORCH_CHECK_VALUE(has_tensor(dropout_seed), "lora_ext: dropout_p > 0 needs a dropout_seed tensor");
  TORCH_CHECK_VALUE(dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
                    "lora_ext: dropout_seed must be a one-element int64 tensor, got shape ", shape_str(*dropout_seed),
                    " and dtype ", dtype_str(dropout_seed->scalar_type()));
  TORCH_CHECK_TYPE(dropout_seed->device() == x.device(), "lora_ext: dropout_seed is on ", dropout_seed->device(),
                   " but x is on ", x.device());
}

// weight [N, K], lora_A [r, K], lora_B [N, r] (lora_ext/ops/checks.py check_adapter).
inline void check_adapter(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_float_dtype(weight, "weight");
  check_float_dtype(lora_A, "lora_A");
  check_float_dtype(lora_B, "lora_B");
  TORCH_CHECK_VALUE(weight.dim() == 2, "lora_ext: weight must be 2-D [N, K], got shape ", shape_str(weight));
  TORCH_CHECK_VALUE(lora_A.dim() == 2, "lora_ext: lora_A must be 2-D [r, K], got shape ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_B.dim() == 2, "lora_ext: lora_B must be 2-D [N, r], got shape ", shape_str(lora_B));
  check_same_dtype_device(weight, "weight", lora_A, "lora_A");
  check_same_dtype_device(weight, "weight", lora_B, "lora_B");
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK_VALUE(r > 0, "lora_ext: rank must be positive, got lora_A of shape ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_A.size(1) == K, "lora_ext: lora_A must be [r, K] with K = ", K, " (weight is ",
                    shape_str(weight), "), got lora_A of shape ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_B.size(0) == N && lora_B.size(1) == r, "lora_ext: lora_B must be [N, r] = [", N, ", ", r,
                    "] (weight is ", shape_str(weight), ", lora_A is ", shape_str(lora_A), "), got lora_B of shape ",
                    shape_str(lora_B));
}

// The lora_linear op: x [M, K] plus the adapter, bias [N] or none, dropout settings, strategy
// (lora_ext/ops/checks.py check_op_level).
inline void check_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                              const std::optional<at::Tensor>& dropout_seed, int64_t strategy) {
  TORCH_CHECK_VALUE(x.dim() == 2, "lora_ext: x must be 2-D [M, K] at the op level, got shape ", shape_str(x));
  check_float_dtype(x, "x");
  check_adapter(weight, lora_A, lora_B);
  check_same_dtype_device(weight, "weight", x, "x");
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "lora_ext: x has K = ", x.size(1), " (shape ", shape_str(x),
                    ") but weight is [N, K] = ", shape_str(weight));
  if (has_tensor(bias)) {
    check_float_dtype(*bias, "bias");
    check_same_dtype_device(weight, "weight", *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "lora_ext: bias must be [N] = [",
                      weight.size(0), "], got shape ", shape_str(*bias));
  }
  check_scale(scale);
  check_dropout_p(dropout_p);
  check_dropout_seed(dropout_p, dropout_seed, x);
  check_strategy(strategy);
}

// grad_out [M, N] like x and weight (lora_ext/ops/checks.py check_grad_out).
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, int64_t N) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == N,
                    "lora_ext: grad_out must be [M, N] = [", x.size(0), ", ", N, "], got shape ", shape_str(grad_out));
  check_same_dtype_device(x, "x", grad_out, "grad_out");
}

// The xa that lora_linear_xa returned for x and a rank-r adapter: [M, r] in x's accumulation
// dtype (float64 for float64 x, else float32), on x's device (lora_ext/ops/checks.py check_saved_xa).
inline void check_saved_xa(const at::Tensor& xa, const at::Tensor& x, int64_t r) {
  TORCH_CHECK_VALUE(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == r, "lora_ext: xa must be [M, r] = [",
                    x.size(0), ", ", r, "] (the xa lora_linear_xa returned), got shape ", shape_str(xa));
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(xa.scalar_type() == acc, "lora_ext: xa must be ", dtype_str(acc), " for ",
                   dtype_str(x.scalar_type()), " x (the accumulation dtype), got ", dtype_str(xa.scalar_type()));
  TORCH_CHECK_TYPE(xa.device() == x.device(), "lora_ext: xa is on ", xa.device(), " but x is on ", x.device());
}

// dropout_mask(seed, rows, cols, p) (lora_ext/ops/reference.py dropout_mask).
inline void check_dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong,
                    "lora_ext: seed must be a one-element int64 tensor, got shape ", shape_str(seed), " and dtype ",
                    dtype_str(seed.scalar_type()));
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "lora_ext: dropout_mask rows and cols must be >= 0, got ", rows, " x ",
                    cols);
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "lora_ext: dropout p must be in [0, 1], got ", p);
}

// ------------------------------------------------------------------ NF4 (lora_ext/ops/checks.py)

inline void check_nf4_blocksize(int64_t blocksize) {
  TORCH_CHECK_VALUE(nf4::is_supported_blocksize(blocksize),
                    "lora_ext: NF4 blocksize must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096), got ",
                    blocksize);
}

inline void check_nf4_shape(at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(shape.size() == 2 && shape[0] > 0 && shape[1] > 0,
                    "lora_ext: NF4 weight shape must be 2-D [N, K] with N, K > 0, got ", shape);
}

// packed uint8 [(n+1)/2], absmax fp32 [nblocks] or uint8 codes with nested_absmax fp32
// [ceil(nblocks / nested_blocksize)] and nested_code fp32 [256]; all on packed's device
// (lora_ext/ops/checks.py check_nf4_storage).
inline void check_nf4_storage(const NF4Params& w) {
  check_nf4_blocksize(w.blocksize);
  check_nf4_shape({w.N, w.K});
  const int64_t n = w.N * w.K;
  TORCH_CHECK_TYPE(w.packed.scalar_type() == at::kByte, "lora_ext: packed NF4 data must be uint8, got ",
                   dtype_str(w.packed.scalar_type()));
  TORCH_CHECK_VALUE(w.packed.numel() == (n + 1) / 2, "lora_ext: packed NF4 data of a [", w.N, ", ", w.K,
                    "] weight must hold (N*K+1)//2 = ", (n + 1) / 2, " bytes, got ", w.packed.numel(), " (shape ",
                    w.packed.sizes(), ")");
  const int64_t blocks = nf4::ceil_div(n, w.blocksize);
  TORCH_CHECK_VALUE(w.absmax.numel() == blocks, "lora_ext: absmax must hold ceil(N*K/blocksize) = ", blocks,
                    " block scales for a [", w.N, ", ", w.K, "] weight with blocksize ", w.blocksize, ", got ",
                    w.absmax.numel());
  TORCH_CHECK_TYPE(w.absmax.device() == w.packed.device(), "lora_ext: absmax is on ", w.absmax.device(),
                   " but packed is on ", w.packed.device());
  if (!w.double_quant()) {
    TORCH_CHECK_TYPE(w.absmax.scalar_type() == at::kFloat,
                     "lora_ext: absmax must be float32 without double quantization, got ",
                     dtype_str(w.absmax.scalar_type()));
    TORCH_CHECK_VALUE(!has_tensor(w.nested_code), "lora_ext: nested_code given without nested_absmax");
    return;
  }
  TORCH_CHECK_TYPE(w.absmax.scalar_type() == at::kByte, "lora_ext: double-quantized absmax must be uint8 codes, got ",
                   dtype_str(w.absmax.scalar_type()));
  TORCH_CHECK_VALUE(
      has_tensor(w.nested_code) && w.nested_code->scalar_type() == at::kFloat && w.nested_code->numel() == 256,
      "lora_ext: double quantization needs nested_code, a float32 tensor of 256 values");
  TORCH_CHECK_VALUE(w.nested_blocksize > 0, "lora_ext: nested_blocksize must be positive, got ", w.nested_blocksize);
  const int64_t nested_blocks = nf4::ceil_div(blocks, w.nested_blocksize);
  TORCH_CHECK_VALUE(w.nested_absmax->scalar_type() == at::kFloat && w.nested_absmax->numel() == nested_blocks,
                    "lora_ext: nested_absmax must be float32 with ceil(", blocks, "/", w.nested_blocksize,
                    ") = ", nested_blocks, " values, got ", dtype_str(w.nested_absmax->scalar_type()), " with ",
                    w.nested_absmax->numel());
  TORCH_CHECK_TYPE(w.nested_absmax->device() == w.packed.device(), "lora_ext: nested_absmax is on ",
                   w.nested_absmax->device(), " but packed is on ", w.packed.device());
  TORCH_CHECK_TYPE(w.nested_code->device() == w.packed.device(), "lora_ext: nested_code is on ",
                   w.nested_code->device(), " but packed is on ", w.packed.device());
}

// nf4_dequantize's output dtype (lora_ext/quant/nf4.py dequantize_nf4).
inline void check_nf4_out_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   "lora_ext: dequantize_nf4 dtype must be a floating dtype, got ", dtype_str(dtype));
}

// lora_linear_nf4 (w.K is x's K): x 2-D, the storage, then x [M, K] and the adapter in one float dtype on the NF4
// weight's device, bias [N] or none (lora_ext/ops/functional.py: the device checks first, then
// lora_ext/ops/checks.py's checks against the dequantized weight [N, K] in x's dtype).
inline void check_nf4_lora(const at::Tensor& x, const NF4Params& w, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                           const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(x.dim() == 2, "lora_ext: x must be 2-D [M, K] at the op level, got shape ", shape_str(x));
  check_nf4_storage(w);
  const auto on_weight_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.device() == w.device(), "lora_ext: ", name, " is on ", t.device(), " but the NF4 weight is on ",
                     w.device());
  };
  on_weight_device(x, "x");
  on_weight_device(lora_A, "lora_A");
  on_weight_device(lora_B, "lora_B");
  if (has_tensor(bias)) on_weight_device(*bias, "bias");
  check_float_dtype(x, "x");
  check_float_dtype(lora_A, "lora_A");
  check_float_dtype(lora_B, "lora_B");
  TORCH_CHECK_VALUE(lora_A.dim() == 2, "lora_ext: lora_A must be 2-D [r, K], got shape ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_B.dim() == 2, "lora_ext: lora_B must be 2-D [N, r], got shape ", shape_str(lora_B));
  check_same_dtype_device(x, "x", lora_A, "lora_A");
  check_same_dtype_device(x, "x", lora_B, "lora_B");
  const int64_t N = w.N, K = w.K, r = lora_A.size(0);
  TORCH_CHECK_VALUE(r > 0, "lora_ext: rank must be positive, got lora_A of shape ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_A.size(1) == K, "lora_ext: lora_A must be [r, K] with K = ", K, " (the NF4 weight is [", N,
                    ", ", K, "]), got lora_A of shape ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_B.size(0) == N && lora_B.size(1) == r, "lora_ext: lora_B must be [N, r] = [", N, ", ", r,
                    "], got lora_B of shape ", shape_str(lora_B));
  TORCH_CHECK_VALUE(x.size(1) == K, "lora_ext: x has K = ", x.size(1), " (shape ", shape_str(x),
                    ") but weight is [N, K] = [", N, ", ", K, "]");
  if (has_tensor(bias)) {
    check_float_dtype(*bias, "bias");
    check_same_dtype_device(x, "x", *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "lora_ext: bias must be [N] = [", N, "], got shape ",
                      shape_str(*bias));
  }
  check_scale(scale);
  check_dropout_p(dropout_p);
  check_dropout_seed(dropout_p, dropout_seed, x);
}

}  // namespace lora_ext
