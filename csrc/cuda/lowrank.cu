// Small kernels around the cuBLAS calls for the low-rank branch.
//
// cuBLAS GEMMs need both inputs in one dtype, but the low-rank intermediates
// (xa = drop(x) A^T, gb = g B) are kept in fp32 (docs/design.md, "Numerics"). Rounding them
// to bf16/fp16 before the expand GEMMs would add an extra rounding of the
// LoRA term. Instead split_pack writes each fp32 value v as hi + lo with
// hi = round(v), lo = round(v - hi): a GEMM over the columns [hi | lo] against
// [R; R] then sees v to ~2^-17 (bf16) / 2^-22 (fp16) relative precision, still
// runs on tensor cores, and costs only a doubled (tiny) inner dimension r.
// combine_splits folds the hi and lo partial products of the low-rank
// gradients back together and rounds once.
#include "numeric.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    split_pack_kernel(const typename Num<T>::acc* __restrict__ v, int64_t ld_v, int64_t rows, int64_t r,
                      typename Num<T>::acc scale, int nsplit, bool ones_column, T* __restrict__ out, int64_t ld_out,
                      int64_t out_cols) {
  using Acc = typename Num<T>::acc;
  const int64_t split_cols = nsplit * r;
  const int64_t total = rows * out_cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / out_cols;
    const int64_t c = e - i * out_cols;
    T value = Num<T>::from_acc(Acc(0));
    if (c < split_cols) {
      const int64_t t = c / r;
      const int64_t j = c - t * r;
      const Acc s = scale * v[i * ld_v + j];
      const T hi = Num<T>::from_acc(s);
      // An overflowed hi (fp16 beyond 65504) carries the inf itself; a lo of
      // s - inf would turn the GEMM's hi + lo into NaN.
      const Acc lo = isfinite(Num<T>::to_acc(hi)) ? s - Num<T>::to_acc(hi) : Acc(0);
      value = t == 0 ? hi : Num<T>::from_acc(lo);
    } else if (ones_column && c == split_cols) {
      value = Num<T>::from_acc(Acc(1));
    }
    out[i * ld_out + c] = value;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_splits_kernel(const typename Num<T>::acc* __restrict__ p, int64_t s0, int64_t s1, int64_t split_stride,
                          int nsplit, int64_t rows, int64_t cols, typename Num<T>::acc scale, T* __restrict__ out) {
  using Acc = typename Num<T>::acc;
  const int64_t total = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / cols;
    const int64_t j = e - i * cols;
    const Acc* src = p + i * s0 + j * s1;
    Acc sum = Acc(0);
    for (int t = 0; t < nsplit; ++t) sum += src[t * split_stride];
    out[e] = Num<T>::from_acc(scale * sum);
  }
}

}  // namespace

cudaError_t launch_split_pack(DType dtype, const void* v, int64_t ld_v, int64_t rows, int64_t r, double scale,
                              int nsplit, bool ones_column, void* out, int64_t ld_out, int64_t out_cols,
                              cudaStream_t stream) {
  if (rows <= 0 || out_cols <= 0) return cudaSuccess;
  if (r <= 0 || nsplit < 1 || nsplit * r + (ones_column ? 1 : 0) > out_cols) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Num<T>::acc;
    split_pack_kernel<T><<<grid_for(rows * out_cols, kThreads, 8192), kThreads, 0, stream>>>(
        static_cast<const Acc*>(v), ld_v, rows, r, static_cast<Acc>(scale), nsplit, ones_column, static_cast<T*>(out),
        ld_out, out_cols);
    return cudaGetLastError();
  });
}

cudaError_t launch_combine_splits(DType dtype, const void* p, int64_t s0, int64_t s1, int64_t split_stride, int nsplit,
                                  int64_t rows, int64_t cols, double scale, void* out, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (nsplit < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Num<T>::acc;
    combine_splits_kernel<T><<<grid_for(rows * cols, kThreads, 8192), kThreads, 0, stream>>>(
        static_cast<const Acc*>(p), s0, s1, split_stride, nsplit, rows, cols, static_cast<Acc>(scale),
        static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_ext
