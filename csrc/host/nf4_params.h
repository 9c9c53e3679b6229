// The NF4 storage of a frozen weight [N, K] as the ops receive it, gathered
// once from an op's arguments and handed to the CPU and CUDA NF4 paths
// (csrc/cpu/nf4_cpu.cpp, csrc/cuda/nf4_cuda.cpp). The format itself is
// csrc/nf4_format.h; its checks are check_nf4_storage (host/checks.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common.h"

namespace lora_ext {

using NF4GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct NF4Params {
  at::Tensor packed;                        // uint8 [(N*K+1)/2]
  at::Tensor absmax;                        // fp32 [nblocks], or uint8 codes with double quantization
  std::optional<at::Tensor> nested_absmax;  // fp32 [ceil(nblocks / nested_blocksize)] (double quantization)
  std::optional<at::Tensor> nested_code;    // fp32 [256] (double quantization)
  double offset = 0.0;
  int64_t blocksize = 0;
  int64_t nested_blocksize = 0;
  int64_t N = 0, K = 0;

  bool double_quant() const { return nested_absmax.has_value() && nested_absmax->defined(); }
  int log2_blocksize() const { return log2_exact(blocksize); }
  at::Device device() const { return packed.device(); }
};

inline NF4Params nf4_params(const at::Tensor& packed, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                            int64_t nested_blocksize, int64_t N, int64_t K) {
  return {packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, N, K};
}

// fp32 [nblocks] block scales, contiguous, with ATen ops (the CPU path; CUDA has a kernel).
// Double quantization: code[q] * nested_absmax[b / nbs] then + offset, as two separately
// rounded fp32 ops (bitsandbytes' order; no FMA).
inline at::Tensor resolve_absmax(const NF4Params& w) {
  if (!w.double_quant()) return w.absmax.reshape({-1}).contiguous();
  const int64_t n = w.absmax.numel();
  const at::Tensor vals = w.nested_code->reshape({-1}).index_select(0, w.absmax.reshape({-1}).to(at::kLong));
  const at::Tensor scales = w.nested_absmax->reshape({-1}).repeat_interleave(w.nested_blocksize).narrow(0, 0, n);
  at::Tensor out = vals.mul(scales);
  out.add_(at::scalar_tensor(static_cast<float>(w.offset), out.options()));
  return out.contiguous();
}

}  // namespace lora_ext
