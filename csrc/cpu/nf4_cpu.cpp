// CPU implementations of the NF4 (QLoRA) ops.
//
// quantize / dequantize reproduce bitsandbytes 0.50 bit for bit (see the
// rounding rules in lora_ext/quant/nf4.py); the fused LoRA forward and backward
// dequantize the frozen weight in row tiles of about 4 MiB straight into the
// GEMM operand, so no full-precision copy of W ever exists:
//
//   forward : y[m-chunk, n-tile] = x_c · W_tileᵀ        (GEMM per tile, written in place)
//             y += bias + s·(drop(x_c) Aᵀ) Bᵀ              (rank-r update of the chunk)
//   backward: grad_x[m-chunk] = Σ_tiles g[:, tile] · W_tile + s·mask ⊙ (g B) A
//             grad_A, grad_B, grad_bias from one pass over g and x per chunk
//
// Only the base term (the tile loops) is NF4-specific: the low-rank branch,
// dropout included, is the dense CPU op's code (lowrank_aten.h).
//
// fp32/fp64 inputs are one chunk (no copy of x or g); bf16/fp16 are widened
// to fp32 a row chunk at a time, accumulated in fp32 and rounded once, and the
// dequantized tile is rounded to x's dtype first (W is dequantize_nf4(·, x.dtype)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../host/checks.h"
#include "../host/common.h"
#include "../host/dropout.h"
#include "../host/nf4_entries.h"
#include "../host/nf4_params.h"
#include "lowrank_aten.h"

// The bit-exact paths must round every product and sum separately, as
// bitsandbytes and the pure-PyTorch reference do: no fused multiply-add.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lora_ext {
namespace {

using at::Tensor;

// ------------------------------------------------------------------ quantization

// torch.bucketize(s, midpoints, right=False): the number of midpoints b with
// !(b >= s); a value on a midpoint takes the lower code, NaN takes 15.
struct NF4Bounds {
  float b[15];
  NF4Bounds() {
    for (int i = 0; i < 15; ++i) b[i] = (nf4::kNF4Code[i] + nf4::kNF4Code[i + 1]) / 2.0f;
  }
  uint8_t code(float s) const {
    uint8_t idx = 0;
    for (int i = 0; i < 15; ++i) idx += !(b[i] >= s);
    return idx;
  }
};

// torch.clamp(s, -1, 1): NaN stays NaN.
inline float clamp_unit(float s) {
  if (s < -1.0f) return -1.0f;
  if (s > 1.0f) return 1.0f;
  return s;
}

template <typename scalar_t>
void nf4_quantize_kernel(const scalar_t* w, int64_t n, int64_t bs, uint8_t* packed, float* absmax) {
  const NF4Bounds bounds;
  const uint8_t pad_code = bounds.code(0.0f);
  const float tiny = static_cast<float>(1e-38);  // bitsandbytes' clamp(min=1e-38) of the divisor
  const int64_t nblocks = nf4::ceil_div(n, bs);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs;
      const int64_t len = std::min(bs, n - start);
      float am = 0.0f;
      bool has_nan = false;
      for (int64_t i = 0; i < len; ++i) {
        const float a = std::fabs(static_cast<float>(w[start + i]));
        if (std::isnan(a)) has_nan = true;
        if (a > am) am = a;
      }
      if (has_nan) am = std::numeric_limits<float>::quiet_NaN();  // torch.max propagates NaN
      const float divisor = std::isnan(am) ? am : (am < tiny ? tiny : am);
      const bool full = len == bs;
      absmax[b] = full ? am : divisor;  // a full block stores the unclamped max, the tail the clamped one
      const float recip = 1.0f / divisor;
      // full blocks: w * (1 / absmax); the tail: w / absmax (a true division), as bitsandbytes.
      auto scaled = [&](int64_t e) {
        const float v = static_cast<float>(w[e]);
        return clamp_unit(full ? v * recip : v / divisor);
      };
      for (int64_t i = 0; i < len; i += 2) {
        const uint8_t hi = bounds.code(scaled(start + i));
        const uint8_t lo = i + 1 < len ? bounds.code(scaled(start + i + 1)) : pad_code;
        packed[(start + i) >> 1] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
}

std::tuple<Tensor, Tensor> nf4_quantize_cpu(const Tensor& weight, int64_t blocksize) {
  check_cpu(weight, "weight");
  check_nf4_blocksize(blocksize);
  check_float_dtype(weight, "weight");
  const int64_t n = weight.numel();
  TORCH_CHECK_VALUE(n > 0, "lora_ext: cannot quantize an empty weight of shape ", weight.sizes());
  const Tensor w = weight.contiguous();
  Tensor packed = at::empty({(n + 1) / 2}, weight.options().dtype(at::kByte));
  Tensor absmax = at::empty({nf4::ceil_div(n, blocksize)}, weight.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "nf4_quantize", [&] {
    nf4_quantize_kernel<scalar_t>(w.data_ptr<scalar_t>(), n, blocksize, packed.data_ptr<uint8_t>(),
                                  absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

// bitsandbytes' CPU quantize_blockwise: a 65536-entry table maps
// trunc((v + 1) * 0.5 * 65535 + 0.5) to the code whose fp32 midpoints bracket it.
std::vector<uint8_t> build_lut_8bit(const float* code) {
  float mids[255];
  for (int i = 0; i < 255; ++i) mids[i] = 0.5f * (code[i] + code[i + 1]);
  std::vector<uint8_t> lut(nf4::kLUTSize);
  int code_idx = 0;
  for (int64_t i = 0; i < nf4::kLUTSize; ++i) {
    const float val = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(nf4::kLUTSize - 1);
    while (code_idx < 255 && mids[code_idx] < val) ++code_idx;
    lut[i] = static_cast<uint8_t>(code_idx);
  }
  return lut;
}

std::tuple<Tensor, Tensor> blockwise_quantize_8bit_cpu(const Tensor& x, const Tensor& code, int64_t blocksize) {
  check_cpu(x, "x");
  check_cpu(code, "code");
  check_float_dtype(x, "x");
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat, "lora_ext: code must be a float32 tensor of 256 values, got ",
                   code.scalar_type());
  TORCH_CHECK_VALUE(code.numel() == 256, "lora_ext: code must be a float32 tensor of 256 values, got ", code.numel(),
                    " values");
  TORCH_CHECK_VALUE(blocksize > 0, "lora_ext: blocksize must be positive, got ", blocksize);
  const Tensor xf = x.contiguous().to(at::kFloat).reshape({-1});
  const Tensor codef = code.contiguous().reshape({-1});
  const int64_t n = xf.numel();
  const int64_t nblocks = nf4::ceil_div(n, blocksize);
  Tensor q = at::empty({n}, x.options().dtype(at::kByte));
  Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {q, absmax};
  const std::vector<uint8_t> lut = build_lut_8bit(codef.data_ptr<float>());
  const float* src = xf.data_ptr<float>();
  uint8_t* out = q.data_ptr<uint8_t>();
  float* am_out = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t end = std::min(start + blocksize, n);
      float am = 0.0f;
      for (int64_t i = start; i < end; ++i) {
        const float a = std::fabs(src[i]);
        if (a > am) am = a;  // NaN is ignored, as bitsandbytes' kernel does
      }
      am_out[b] = am;
      if (am == 0.0f) {
        std::fill(out + start, out + end, uint8_t(0));
        continue;
      }
      const float inv = 1.0f / am;
      for (int64_t i = start; i < end; ++i) {
        const float v = clamp_unit(src[i] * inv);
        if (std::isnan(v)) {  // only from Inf/NaN input; bitsandbytes leaves this undefined
          out[i] = 0;
          continue;
        }
        const float t = (v + 1.0f) * 0.5f;
        const float pos = t * static_cast<float>(nf4::kLUTSize - 1) + 0.5f;
        out[i] = lut[static_cast<uint16_t>(pos)];
      }
    }
  });
  return {q, absmax};
}

// ------------------------------------------------------------------ dequantization

// The 16 values of one block: round_to<scalar_t>(code[c] * scale) widened to out_t. Each
// element is then a table lookup (same products as elementwise, 16 per block instead of bs).
template <typename scalar_t, typename out_t>
inline void block_table(float scale, out_t* tab) {
  for (int c = 0; c < 16; ++c) {
    const float v = nf4::kNF4Code[c] * scale;
    tab[c] = static_cast<out_t>(static_cast<scalar_t>(v));
  }
}

// out[e - e_begin] = value of flat element e for e in [e_begin, e_end).
template <typename scalar_t, typename out_t>
void dequant_range(const uint8_t* packed, const float* scales, int shift, int64_t e_begin, int64_t e_end, out_t* out) {
  out_t tab[16];
  int64_t e = e_begin;
  while (e < e_end) {
    const int64_t block = e >> shift;
    const int64_t seg_end = std::min(e_end, (block + 1) << shift);
    block_table<scalar_t, out_t>(scales[block], tab);
    if ((e & 1) && e < seg_end) {  // odd start: the low nibble of a byte
      out[e - e_begin] = tab[packed[e >> 1] & 0xF];
      ++e;
    }
    for (; e + 1 < seg_end; e += 2) {
      const uint8_t byte = packed[e >> 1];
      out[e - e_begin] = tab[byte >> 4];
      out[e + 1 - e_begin] = tab[byte & 0xF];
    }
    if (e < seg_end) {
      out[e - e_begin] = tab[packed[e >> 1] >> 4];
      ++e;
    }
  }
}

// dst[r, k] = round_to<scalar_t>(code[q] * scale) widened to acc_t, for rows
// [row0, row0 + rows) of the [*, K] weight.
template <typename scalar_t, typename acc_t>
void dequant_rows(const uint8_t* packed, const float* scales, int shift, int64_t K, int64_t row0, int64_t rows,
                  acc_t* dst) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    const int64_t e0 = (row0 + r0) * K;
    dequant_range<scalar_t, acc_t>(packed, scales, shift, e0, (row0 + r1) * K, dst + r0 * K);
  });
}

template <typename scalar_t>
void dequant_flat(const uint8_t* packed, const float* scales, int shift, int64_t n, scalar_t* out) {
  at::parallel_for(0, n, 16384, [&](int64_t e0, int64_t e1) {
    dequant_range<scalar_t, scalar_t>(packed, scales, shift, e0, e1, out + e0);
  });
}

// W (or rows [row0, row0 + rows) of it) as `dtype`, rounded once from fp32 (bitsandbytes' dequantization).
Tensor nf4_dequantize_cpu(const NF4Params& w, at::IntArrayRef shape, at::ScalarType dtype) {
  const Tensor& packed = w.packed;
  const Tensor scales = resolve_absmax(w);
  const Tensor p = packed.contiguous();
  Tensor out = at::empty(shape, packed.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize", [&] {
    dequant_flat<scalar_t>(p.data_ptr<uint8_t>(), scales.data_ptr<float>(), w.log2_blocksize(), out.numel(),
                           out.data_ptr<scalar_t>());
  });
  return out;
}

// ------------------------------------------------------------------ fused LoRA
//
// The base term x W^T is computed tile by tile from the NF4 storage; everything
// else (bias, dropout, the low-rank branch and its gradients) is the dense CPU
// op's code (lowrank_aten.h), so the two ops share their numerics.

// The weight as the tile loops read it: contiguous codes and resolved fp32 scales.
struct DequantSource {
  Tensor packed;  // contiguous uint8
  Tensor scales;  // fp32 [nblocks]
  int shift;      // log2(blocksize)
  int64_t K;
};

DequantSource dequant_source(const NF4Params& w) {
  return {w.packed.contiguous(), resolve_absmax(w), w.log2_blocksize(), w.K};
}

// Fills tile[0:rows] with W[row0:row0+rows] (rounded to x's dtype, widened to acc).
void dequant_tile(const DequantSource& w, at::ScalarType x_dtype, int64_t row0, int64_t rows, Tensor& tile) {
  const uint8_t* p = w.packed.data_ptr<uint8_t>();
  const float* s = w.scales.data_ptr<float>();
  switch (x_dtype) {
    case at::kDouble:
      dequant_rows<double, double>(p, s, w.shift, w.K, row0, rows, tile.data_ptr<double>());
      break;
    case at::kHalf:
      dequant_rows<c10::Half, float>(p, s, w.shift, w.K, row0, rows, tile.data_ptr<float>());
      break;
    case at::kBFloat16:
      dequant_rows<c10::BFloat16, float>(p, s, w.shift, w.K, row0, rows, tile.data_ptr<float>());
      break;
    default:
      dequant_rows<float, float>(p, s, w.shift, w.K, row0, rows, tile.data_ptr<float>());
  }
}

// Rows of W per tile: about 1M elements (4 MiB of fp32), at least 16.
int64_t tile_rows(int64_t N, int64_t K) { return chunk_rows(N, K, int64_t(1) << 20, 16); }

// Rows of x per chunk: fp32/fp64 use one chunk (no copy of x or g, each tile is
// dequantized once per call); bf16/fp16 widen chunks of about 16 MiB of fp32.
int64_t nf4_chunk_rows(int64_t M, int64_t width, bool lowp) {
  if (!lowp) return std::max<int64_t>(M, 1);
  return chunk_rows(M, width, int64_t(1) << 22, 64);
}

// Inputs checked by the op entry (check_nf4_lora).
Tensor lora_linear_nf4_forward(const Tensor& x, const NF4Params& nf4, const std::optional<Tensor>& bias,
                               const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                               const std::optional<Tensor>& dropout_seed) {
  const int64_t M = x.size(0), K = x.size(1), N = nf4.N;
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;

  const DequantSource w = dequant_source(nf4);
  const at::ScalarType acc = acc_dtype(x);
  const bool lowp = is_low_precision(x);
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);
  const bool has_bias = has_tensor(bias);
  const Tensor bias_acc = has_bias ? bias->to(acc) : Tensor();
  const int64_t tn = tile_rows(N, K), mc = nf4_chunk_rows(M, std::max(K, N), lowp);
  Tensor tile = at::empty({tn, K}, x.options().dtype(acc));

  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t rows = std::min(mc, M - m0);
    const Tensor xc = x.narrow(0, m0, rows).to(acc);
    Tensor yc = lowp ? at::empty({rows, N}, x.options().dtype(acc)) : y.narrow(0, m0, rows);
    for (int64_t n0 = 0; n0 < N; n0 += tn) {
      const int64_t nt = std::min(tn, N - n0);
      Tensor wt = tile.narrow(0, 0, nt);
      dequant_tile(w, x.scalar_type(), n0, nt, wt);
      Tensor out = yc.narrow(1, n0, nt);
      at::mm_out(out, xc, wt.t());
    }
    if (has_bias) yc.add_(bias_acc);
    cpu::add_lowrank_forward(yc, xc, A, B, scale, drop, m0);
    if (lowp) y.narrow(0, m0, rows).copy_(yc);
  }
  return y;
}

// Inputs checked by the op entry (check_nf4_lora, check_grad_out).
NF4GradTuple lora_linear_nf4_backward_impl(const Tensor& grad_out, const Tensor& x, const NF4Params& nf4,
                                           const Tensor& lora_A, const Tensor& lora_B, double scale, double dropout_p,
                                           const std::optional<Tensor>& dropout_seed, std::array<bool, 4> mask) {
  const int64_t M = x.size(0), K = x.size(1), N = nf4.N;
  const at::ScalarType acc = acc_dtype(x);
  const bool lowp = is_low_precision(x);
  const DropoutParams drop = make_dropout(dropout_p, dropout_seed);
  const Tensor A = lora_A.to(acc), B = lora_B.to(acc);
  const auto acc_opts = x.options().dtype(acc);
  const double branch_scale = scale * drop.factor;

  Tensor grad_x = mask[0] ? at::empty({M, K}, x.options()) : x.new_empty({0});
  Tensor gbias = mask[1] ? at::zeros({N}, acc_opts) : Tensor();
  Tensor gA = mask[2] ? at::zeros({A.size(0), K}, acc_opts) : Tensor();
  Tensor gB = mask[3] ? at::zeros({N, A.size(0)}, acc_opts) : Tensor();
  const int64_t tn = tile_rows(N, K), mc = nf4_chunk_rows(M, std::max(K, N), lowp);
  const DequantSource w = mask[0] && M > 0 ? dequant_source(nf4) : DequantSource{};
  Tensor tile = mask[0] ? at::empty({tn, K}, acc_opts) : Tensor();

  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t rows = std::min(mc, M - m0);
    const Tensor gc = grad_out.narrow(0, m0, rows).to(acc);
    Tensor gxc;  // grad_x of the chunk: g W from the tiles, then the low-rank term
    if (mask[0]) {
      gxc = lowp ? at::empty({rows, K}, acc_opts) : grad_x.narrow(0, m0, rows);
      for (int64_t n0 = 0; n0 < N; n0 += tn) {
        const int64_t nt = std::min(tn, N - n0);
        Tensor wt = tile.narrow(0, 0, nt);
        dequant_tile(w, x.scalar_type(), n0, nt, wt);
        if (n0 == 0) {
          at::mm_out(gxc, gc.narrow(1, n0, nt), wt);
        } else {
          gxc.addmm_(gc.narrow(1, n0, nt), wt);
        }
      }
    }
    const Tensor xc = (mask[2] || mask[3]) ? x.narrow(0, m0, rows).to(acc) : Tensor();
    cpu::add_lowrank_backward(gc, xc, A, B, scale, drop, m0, gA, gB, mask[0] ? &gxc : nullptr);
    if (mask[0] && lowp) grad_x.narrow(0, m0, rows).copy_(gxc);
    if (mask[1]) gbias.add_(gc.sum(0));
  }
  return {grad_x, mask[1] ? gbias.to(x.scalar_type()) : x.new_empty({0}),
          mask[2] ? gA.mul_(branch_scale).to(lora_A.scalar_type()) : x.new_empty({0}),
          mask[3] ? gB.mul_(branch_scale).to(lora_B.scalar_type()) : x.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("blockwise_quantize_8bit", &blockwise_quantize_8bit_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_entry<c10::DeviceType::CPU, &nf4_dequantize_cpu>);
  m.impl("lora_linear_nf4", &lora_linear_nf4_entry<c10::DeviceType::CPU, &lora_linear_nf4_forward>);
  m.impl("lora_linear_nf4_backward",
         &lora_linear_nf4_backward_entry<c10::DeviceType::CPU, &lora_linear_nf4_backward_impl>);
}

}  // namespace lora_ext
