// Dropout parameters of one op call, shared by the CPU and CUDA paths. The
// keep/drop hash itself is csrc/dropout_hash.h (torch-free: nvcc and the
// pure-PyTorch mirror in lora_ext/ops/reference.py implement the same bits).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "../dropout_hash.h"

namespace lora_ext {

struct DropoutParams {
  double p = 0.0;          // drop probability in [0, 1]
  double factor = 1.0;     // 1 / (1 - p), 0 for p == 1 (folded into the branch's fp32 scale)
  uint64_t threshold = 0;  // keep = hash >= threshold (dropout_threshold(p))
  uint64_t seed = 0;       // the seed's value, read on the host for a CPU seed only
  at::Tensor seed_tensor;  // one-element int64 on the op's device; undefined without dropout

  bool on() const { return p > 0.0; }
  bool branch_zero() const { return p >= 1.0; }
  // The device-side seed for the CUDA kernels (no host synchronisation).
  const int64_t* seed_ptr() const { return seed_tensor.data_ptr<int64_t>(); }
};

// Inputs already checked (check_dropout in host/checks.h): with p > 0, seed is a
// one-element int64 tensor on the op's device.
inline DropoutParams make_dropout(double p, const std::optional<at::Tensor>& seed) {
  DropoutParams d;
  d.p = p;
  if (p > 0.0) {
    d.threshold = dropout_threshold(p);
    d.factor = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
    d.seed_tensor = *seed;
    if (seed->device().is_cpu()) d.seed = static_cast<uint64_t>(seed->reshape({}).item<int64_t>());
  }
  return d;
}

}  // namespace lora_ext
