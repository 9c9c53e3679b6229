// The low-rank branch of the CPU LoRA ops on ATen's BLAS-backed GEMMs, shared by
// the dense ops (lora_cpu.cpp) and the NF4 ops (nf4_cpu.cpp), which differ only
// in how they produce the base term x W^T (a dense GEMM or dequantized tiles).
//
// Every function works on one row chunk [rows, *] whose first row is logical
// row `row0` of the op's [M, *] input, so the dropout mask (csrc/dropout_hash.h)
// is that of the whole op. A and B are the adapter in the accumulation dtype
// (host/common.h acc_dtype), x_c and g_c chunks in that dtype (fp32 / fp64
// inputs: views of the op's tensors, no copy).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../host/common.h"
#include "../host/dropout.h"

namespace lora_ext {
namespace cpu {

// Rows per chunk of the CPU passes: about 512K elements of the wider of the two row
// lengths (2 MiB in fp32), so a chunk of x (or g) stays in the last-level cache
// between the two GEMMs that read it, while each GEMM call still has enough rows to
// amortise BLAS's per-call threading cost (128-row chunks measured slower on 2 threads).
inline int64_t chunk_rows(int64_t M, int64_t width) { return lora_ext::chunk_rows(M, width, int64_t(1) << 19, 64); }

// t[i, k] *= keep(row0 + i, k) (an exact multiply by 0 or 1, so NaN/Inf in dropped
// elements propagate as in x * mask), in place; t contiguous, fp32 or fp64.
void apply_keep_mask_(at::Tensor& t, int64_t row0, const DropoutParams& d);

// drop(x_c) without the 1/(1-p) factor, in `acc`: x_c.to(acc) without dropout (no copy
// when x_c is already acc), else a fresh contiguous copy with the mask applied.
at::Tensor dropped(const at::Tensor& x_c, at::ScalarType acc, int64_t row0, const DropoutParams& d);

// out += scale * (drop(x) A^T) B^T / (1 - p), for out [rows, N] and x [rows, K]. The
// [rows, r] intermediate stays in the accumulation dtype; with dropout, x is masked
// in cache-sized row chunks (no copy of x as a whole).
void add_lowrank_forward(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale,
                         const DropoutParams& d, int64_t row0);

// One row chunk of the low-rank backward, g_c [rows, N] and x_c [rows, K] in acc:
//   grad_A_acc += (g_c B)^T drop(x_c)          (if defined; unscaled: multiply by scale/(1-p) at the end)
//   grad_B_acc += g_c^T (drop(x_c) A^T)        (if defined; unscaled likewise)
//   *dx_c      += scale/(1-p) * mask ⊙ ((g_c B) A)   (if dx_c is given)
// g_c B is computed once and feeds both grad_A and grad_x while the chunk is in cache.
void add_lowrank_backward(const at::Tensor& g_c, const at::Tensor& x_c, const at::Tensor& A, const at::Tensor& B,
                          double scale, const DropoutParams& d, int64_t row0, at::Tensor& grad_A_acc,
                          at::Tensor& grad_B_acc, at::Tensor* dx_c);

}  // namespace cpu
}  // namespace lora_ext
