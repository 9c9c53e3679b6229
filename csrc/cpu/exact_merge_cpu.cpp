// Exact merge / unmerge on the CPU (the per-element function: csrc/host/exact_merge.h).
//
// One pass over W: each row block computes d = s * (B A) for a strip of columns in fp32
// (products and sums rounded one by one in a fixed order, so the fallback and the CUDA kernel
// compute the same d), writes round(W + d) and, in the same pass, checks whether round(W' - d)
// gives W's bits back; the elements that do not are appended, with their original value, to
// the block's own list. The lists are concatenated in block order, so the record is sorted by
// flat index and does not depend on the thread count.
//
// No fused multiply-add: this file is compiled for the baseline x86-64 ISA (no FMA) and the
// AVX2 clone below enables AVX2 only, so the compiler cannot contract a * b + c.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../host/common.h"
#include "../host/exact_merge.h"

namespace lora_ext {
namespace {

using at::Tensor;

constexpr int64_t kStrip = 256;     // columns of d computed at once (stays in L1)
constexpr int64_t kBlockRows = 16;  // rows per parallel work item

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T narrow_to(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<T>(v);  // c10::BFloat16 / c10::Half: round to nearest even
  }
}

template <typename T>
inline bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// d[0, len) = s * sum_j B[n, j] A[j, k0 + c], the fixed-order fp32 sum.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void strip_delta(const float* brow, const float* A, int64_t K, int64_t r, int64_t k0, int64_t len, float s, float* d) {
  const float* a0 = A + k0;
  const float b0 = brow[0];
  for (int64_t c = 0; c < len; ++c) d[c] = b0 * a0[c];
  for (int64_t j = 1; j < r; ++j) {
    const float* aj = A + j * K + k0;
    const float bj = brow[j];
    for (int64_t c = 0; c < len; ++c) {
      const float p = bj * aj[c];
      d[c] = d[c] + p;
    }
  }
  for (int64_t c = 0; c < len; ++c) d[c] = s * d[c];
}

template <typename T>
struct BlockRecord {
  std::vector<int64_t> index;
  std::vector<T> value;
};

template <typename T>
void merge_rows(T* W, const float* A, const float* B, int64_t K, int64_t r, float s, int64_t n0, int64_t n1,
                BlockRecord<T>& rec) {
  float d[kStrip];
  for (int64_t n = n0; n < n1; ++n) {
    T* row = W + n * K;
    for (int64_t k0 = 0; k0 < K; k0 += kStrip) {
      const int64_t len = std::min(kStrip, K - k0);
      strip_delta(B + n * r, A, K, r, k0, len, s, d);
      for (int64_t c = 0; c < len; ++c) {
        const T w = row[k0 + c];
        const T merged = narrow_to<T>(widen(w) + d[c]);
        const T back = narrow_to<T>(widen(merged) - d[c]);
        if (!same_bits(back, w)) {
          rec.index.push_back(n * K + k0 + c);
          rec.value.push_back(w);
        }
        row[k0 + c] = merged;
      }
    }
  }
}

template <typename T>
void unmerge_rows(T* W, const float* A, const float* B, int64_t K, int64_t r, float s, int64_t n0, int64_t n1) {
  float d[kStrip];
  for (int64_t n = n0; n < n1; ++n) {
    T* row = W + n * K;
    for (int64_t k0 = 0; k0 < K; k0 += kStrip) {
      const int64_t len = std::min(kStrip, K - k0);
      strip_delta(B + n * r, A, K, r, k0, len, s, d);
      for (int64_t c = 0; c < len; ++c) row[k0 + c] = narrow_to<T>(widen(row[k0 + c]) - d[c]);
    }
  }
}

template <typename T>
std::tuple<Tensor, Tensor> merge_exact_typed(Tensor& W, const Tensor& A32, const Tensor& B32, float s) {
  const int64_t N = W.size(0), K = W.size(1), r = A32.size(0);
  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;
  std::vector<BlockRecord<T>> recs(static_cast<size_t>(nblocks));
  T* wp = W.data_ptr<T>();
  const float* ap = A32.data_ptr<float>();
  const float* bp = B32.data_ptr<float>();
  if (K > 0) {
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        merge_rows<T>(wp, ap, bp, K, r, s, b * kBlockRows, std::min(N, (b + 1) * kBlockRows), recs[b]);
    });
  }
  int64_t total = 0;
  for (const auto& rec : recs) total += static_cast<int64_t>(rec.index.size());
  Tensor index = at::empty({total}, W.options().dtype(at::kLong));
  Tensor value = at::empty({total}, W.options());
  int64_t* ip = index.data_ptr<int64_t>();
  T* vp = value.data_ptr<T>();
  for (const auto& rec : recs) {
    std::copy(rec.index.begin(), rec.index.end(), ip);
    std::copy(rec.value.begin(), rec.value.end(), vp);
    ip += rec.index.size();
    vp += rec.value.size();
  }
  return {index.to(exact_index_dtype(W.numel())), value};
}

template <typename T>
void unmerge_exact_typed(Tensor& W, const Tensor& A32, const Tensor& B32, float s) {
  const int64_t N = W.size(0), K = W.size(1), r = A32.size(0);
  if (K == 0) return;
  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;
  T* wp = W.data_ptr<T>();
  const float* ap = A32.data_ptr<float>();
  const float* bp = B32.data_ptr<float>();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      unmerge_rows<T>(wp, ap, bp, K, r, s, b * kBlockRows, std::min(N, (b + 1) * kBlockRows));
  });
}

void check_exact_args(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  check_exact_adapter(weight, lora_A, lora_B);
  check_scale(scale);
  check_cpu(weight, "weight");
}

std::tuple<Tensor, Tensor> merge_exact_cpu(Tensor weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  check_exact_args(weight, lora_A, lora_B, scale);
  const Tensor A32 = lora_A.to(at::kFloat).contiguous(), B32 = lora_B.to(at::kFloat).contiguous();
  Tensor W = weight.contiguous();
  const float s = static_cast<float>(scale);
  std::tuple<Tensor, Tensor> out;
  switch (weight.scalar_type()) {
    case at::kFloat:
      out = merge_exact_typed<float>(W, A32, B32, s);
      break;
    case at::kHalf:
      out = merge_exact_typed<c10::Half>(W, A32, B32, s);
      break;
    default:
      out = merge_exact_typed<c10::BFloat16>(W, A32, B32, s);
      break;
  }
  if (!W.is_same(weight)) weight.copy_(W);
  return out;
}

void unmerge_exact_cpu(Tensor weight, const Tensor& lora_A, const Tensor& lora_B, double scale, const Tensor& index,
                       const Tensor& value) {
  check_exact_args(weight, lora_A, lora_B, scale);
  check_merge_record(weight, index, value);
  const Tensor A32 = lora_A.to(at::kFloat).contiguous(), B32 = lora_B.to(at::kFloat).contiguous();
  Tensor W = weight.contiguous();
  const float s = static_cast<float>(scale);
  switch (weight.scalar_type()) {
    case at::kFloat:
      unmerge_exact_typed<float>(W, A32, B32, s);
      break;
    case at::kHalf:
      unmerge_exact_typed<c10::Half>(W, A32, B32, s);
      break;
    default:
      unmerge_exact_typed<c10::BFloat16>(W, A32, B32, s);
      break;
  }
  if (index.numel() > 0) W.view({-1}).index_copy_(0, index.to(at::kLong), value);
  if (!W.is_same(weight)) weight.copy_(W);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("merge_exact_", &merge_exact_cpu);
  m.impl("unmerge_exact_", &unmerge_exact_cpu);
}

}  // namespace lora_ext
