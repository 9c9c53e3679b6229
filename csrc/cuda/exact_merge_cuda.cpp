// Exact merge / unmerge on CUDA: the checked op entries around csrc/cuda/exact_merge.cu.
//
// The merge is one pass over W. Its record has a data-dependent length, so the kernel appends to
// a buffer of `capacity` entries (N*K/16, at least 4096: well above what realistic adapters need,
// see csrc/host/exact_merge.h) through an atomic counter; elements past the capacity are left
// unmerged and flagged in a bitmap, and a second kernel merges and records just those into a
// buffer of the exact size. The record is then sorted by index, so it equals the CPU kernel's
// and the fallback's (the per-element function is the same on every path).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../host/common.h"
#include "../host/exact_merge.h"
#include "cuda_check.h"
#include "exact_merge_kernels.h"

namespace lora_ext {
namespace {

using at::Tensor;

void check_exact_args(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  check_exact_adapter(weight, lora_A, lora_B);
  check_scale(scale);
  check_cuda(weight, "weight");
}

std::tuple<Tensor, Tensor> merge_exact_cuda(Tensor weight, const Tensor& lora_A, const Tensor& lora_B, double scale) {
  check_exact_args(weight, lora_A, lora_B, scale);
  const c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor A32 = lora_A.to(at::kFloat).contiguous(), B32 = lora_B.to(at::kFloat).contiguous();
  Tensor W = weight.contiguous();
  const int64_t N = W.size(0), K = W.size(1), r = A32.size(0), total = N * K;
  const DType dt = kernel_dtype(W.scalar_type());
  const float s = static_cast<float>(scale);
  const int64_t capacity = std::min<int64_t>(total, std::max<int64_t>(4096, total / 16));
  Tensor index = at::empty({capacity}, W.options().dtype(at::kLong));
  Tensor value = at::empty({capacity}, W.options());
  Tensor count = at::zeros({1}, W.options().dtype(at::kLong));
  Tensor overflow = at::zeros({(total + 31) / 32}, W.options().dtype(at::kInt));
  auto* count_p = reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>());
  auto* overflow_p = reinterpret_cast<uint32_t*>(overflow.data_ptr<int32_t>());
  LORA_CUDA_CHECK(cuda::launch_merge_exact(dt, W.data_ptr(), A32.data_ptr<float>(), B32.data_ptr<float>(), N, K, r, s,
                                           index.data_ptr<int64_t>(), value.data_ptr(), capacity, count_p, overflow_p,
                                           stream));
  const int64_t recorded = count.item<int64_t>();  // synchronizes: the record's length is data-dependent
  if (recorded > capacity) {
    Tensor all_index = at::empty({recorded}, index.options());
    Tensor all_value = at::empty({recorded}, value.options());
    all_index.narrow(0, 0, capacity).copy_(index);
    all_value.narrow(0, 0, capacity).copy_(value);
    count.fill_(capacity);
    LORA_CUDA_CHECK(cuda::launch_merge_exact_overflow(dt, W.data_ptr(), A32.data_ptr<float>(), B32.data_ptr<float>(), N,
                                                      K, r, s, all_index.data_ptr<int64_t>(), all_value.data_ptr(),
                                                      count_p, overflow_p, stream));
    index = all_index, value = all_value;
  } else {
    index = index.narrow(0, 0, recorded), value = value.narrow(0, 0, recorded);
  }
  auto [sorted, order] = index.sort();
  Tensor out_value = value.index_select(0, order);
  if (!W.is_same(weight)) weight.copy_(W);
  return {sorted.to(exact_index_dtype(total)), out_value};
}

void unmerge_exact_cuda(Tensor weight, const Tensor& lora_A, const Tensor& lora_B, double scale, const Tensor& index,
                        const Tensor& value) {
  check_exact_args(weight, lora_A, lora_B, scale);
  check_merge_record(weight, index, value);
  const c10::cuda::CUDAGuard guard(weight.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor A32 = lora_A.to(at::kFloat).contiguous(), B32 = lora_B.to(at::kFloat).contiguous();
  Tensor W = weight.contiguous();
  LORA_CUDA_CHECK(cuda::launch_unmerge_exact(kernel_dtype(W.scalar_type()), W.data_ptr(), A32.data_ptr<float>(),
                                             B32.data_ptr<float>(), W.size(0), W.size(1), A32.size(0),
                                             static_cast<float>(scale), stream));
  if (index.numel() > 0) W.view({-1}).index_copy_(0, index.to(at::kLong), value);
  if (!W.is_same(weight)) weight.copy_(W);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_exact_", &merge_exact_cuda);
  m.impl("unmerge_exact_", &unmerge_exact_cuda);
}

}  // namespace lora_ext
