// Dropout kernels for the LoRA branch. The keep decision is the counter-based
// hash of ../dropout_hash.h (shared with the CPU path and the pure-PyTorch
// fallback), so every path drops the same elements for the same seed: element
// (m, k) of the logical [M, K] input uses index m*K + k. The seed is a
// one-element int64 tensor on the device, read here through its pointer: no
// host synchronisation, and a CUDA graph replays whatever seed the captured
// torch.randint wrote.
#include "../dropout_hash.h"
#include "numeric.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    dropout_mask_kernel(const int64_t* __restrict__ seed_ptr, bool* __restrict__ out, int64_t numel,
                        uint64_t threshold) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += stride) {
    out[i] = dropout_keep(seed, static_cast<uint64_t>(i), threshold);
  }
}

// One block row per tensor row (grid-stride over rows in y), threads along the
// columns: no 64-bit division per element, coalesced for row-major layouts.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_dropout_kernel(const T* in, int64_t in_s0, int64_t in_s1, T* out, int64_t out_s0, int64_t out_s1,
                         int64_t rows, int64_t cols, int64_t row_offset, int64_t index_cols,
                         const int64_t* __restrict__ seed_ptr, uint64_t threshold) {
  using Acc = typename Num<T>::acc;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t col_stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const uint64_t row_index = static_cast<uint64_t>(row_offset + i) * static_cast<uint64_t>(index_cols);
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < cols; k += col_stride) {
      const bool keep = dropout_keep(seed, row_index + static_cast<uint64_t>(k), threshold);
      // A multiply by exactly 0 or 1: exact, and NaN/Inf in a dropped element
      // propagate as they do in x * mask.
      const Acc v = Num<T>::to_acc(in[i * in_s0 + k * in_s1]);
      out[i * out_s0 + k * out_s1] = Num<T>::from_acc(v * (keep ? Acc(1) : Acc(0)));
    }
  }
}

}  // namespace

cudaError_t launch_dropout_mask(const int64_t* seed, bool* out, int64_t numel, uint64_t threshold,
                                cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  dropout_mask_kernel<<<grid_for(numel, kThreads, 65535), kThreads, 0, stream>>>(seed, out, numel, threshold);
  return cudaGetLastError();
}

cudaError_t launch_apply_dropout(DType dtype, ConstMatrix in, Matrix out, int64_t rows, int64_t cols,
                                 int64_t row_offset, int64_t index_cols, const int64_t* seed, uint64_t threshold,
                                 cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const dim3 grid(grid_for(cols, kThreads, 1024), static_cast<unsigned int>(rows < 65535 ? rows : 65535));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    apply_dropout_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(in.data), in.s0, in.s1,
                                                           static_cast<T*>(out.data), out.s0, out.s1, rows, cols,
                                                           row_offset, index_cols, seed, threshold);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_ext
