// Kernels of the mixed-adapter LoRA linear (launchers: mixed_kernels.h). Plain CUDA cores, fp32
// accumulation (fp64 for double), each output rounded once. The base GEMMs (x W^T, g W) run in
// cuBLAS (mixed_cuda.cpp); these kernels carry the rank-r work, which is small next to them.
//
// Rows arrive grouped by adapter (sorted positions), so neighbouring warps and threads read the
// same adapter's factors from L1/L2. The per-adapter reductions (grad_A, grad_B) give one thread
// per output element a loop over its adapter's segment: deterministic, no atomics, and an
// adapter without rows writes zeros.
#include "../dropout_hash.h"
#include "mixed_kernels.h"
#include "numeric.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ typename Num<T>::acc load(const void* p, int64_t i) {
  return Num<T>::to_acc(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ bool kept(const MixedFactors& f, int64_t a, int64_t row, int64_t k) {
  const uint64_t thr = static_cast<uint64_t>(f.threshold[a]);
  if (thr == 0) return true;
  return dropout_keep(static_cast<uint64_t>(*f.seed),
                      static_cast<uint64_t>(row) * static_cast<uint64_t>(f.K) + static_cast<uint64_t>(k), thr);
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// One warp per sorted position; lanes stride over K.
template <typename T>
__global__ void __launch_bounds__(kThreads) shrink_kernel(MixedRows rows, MixedFactors f, ConstMatrix x, void* xa_) {
  using Acc = typename Num<T>::acc;
  Acc* xa = static_cast<Acc*>(xa_);
  const int lane = threadIdx.x & 31;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); p < rows.M;
       p += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t a = rows.sorted[p], row = rows.perm[p];
    for (int64_t j = 0; j < f.r; ++j) {
      Acc s = Acc(0);
      if (a >= 0) {
        const int64_t a_off = (a * f.r + j) * f.K;
        for (int64_t k = lane; k < f.K; k += 32) {
          if (!kept(f, a, row, k)) continue;
          s += load<T>(x.data, row * x.s0 + k * x.s1) * load<T>(f.A, a_off + k);
        }
      }
      s = warp_sum(s);
      if (lane == 0) xa[p * f.r + j] = a >= 0 ? static_cast<Acc>(f.scale_q[a]) * s : Acc(0);
    }
  }
}

// Same walk for gb = g B[a] (B[a] is [N, r]: column j has stride r).
template <typename T>
__global__ void __launch_bounds__(kThreads) gb_kernel(MixedRows rows, MixedFactors f, ConstMatrix g, void* gb_) {
  using Acc = typename Num<T>::acc;
  Acc* gb = static_cast<Acc*>(gb_);
  const int lane = threadIdx.x & 31;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); p < rows.M;
       p += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t a = rows.sorted[p], row = rows.perm[p];
    for (int64_t j = 0; j < f.r; ++j) {
      Acc s = Acc(0);
      if (a >= 0) {
        for (int64_t c = lane; c < f.N; c += 32) {
          s += load<T>(g.data, row * g.s0 + c * g.s1) * load<T>(f.B, (a * f.N + c) * f.r + j);
        }
      }
      s = warp_sum(s);
      if (lane == 0) gb[p * f.r + j] = s;
    }
  }
}

// Threads along the columns, grid.y over sorted positions.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(MixedRows rows, MixedFactors f, const void* base_, const void* xa_, Matrix y) {
  using Acc = typename Num<T>::acc;
  const Acc* base = static_cast<const Acc*>(base_);
  const Acc* xa = static_cast<const Acc*>(xa_);
  T* out = static_cast<T*>(y.data);
  for (int64_t p = blockIdx.y; p < rows.M; p += gridDim.y) {
    const int64_t a = rows.sorted[p], row = rows.perm[p];
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < f.N;
         c += static_cast<int64_t>(gridDim.x) * kThreads) {
      Acc v = base[row * f.N + c];
      if (a >= 0) {
        const int64_t b_off = (a * f.N + c) * f.r;
        for (int64_t j = 0; j < f.r; ++j) v += xa[p * f.r + j] * load<T>(f.B, b_off + j);
      }
      out[row * y.s0 + c * y.s1] = Num<T>::from_acc(v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(MixedRows rows, MixedFactors f, const void* gw_, const void* gb_, Matrix grad_x) {
  using Acc = typename Num<T>::acc;
  const Acc* gw = static_cast<const Acc*>(gw_);
  const Acc* gb = static_cast<const Acc*>(gb_);
  T* out = static_cast<T*>(grad_x.data);
  for (int64_t p = blockIdx.y; p < rows.M; p += gridDim.y) {
    const int64_t a = rows.sorted[p], row = rows.perm[p];
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < f.K;
         k += static_cast<int64_t>(gridDim.x) * kThreads) {
      Acc v = gw[row * f.K + k];
      if (a >= 0 && kept(f, a, row, k)) {
        Acc s = Acc(0);
        for (int64_t j = 0; j < f.r; ++j) s += gb[p * f.r + j] * load<T>(f.A, (a * f.r + j) * f.K + k);
        v += static_cast<Acc>(f.scale_q[a]) * s;
      }
      out[row * grad_x.s0 + k * grad_x.s1] = Num<T>::from_acc(v);
    }
  }
}

// One thread per element (a, j, k) of grad_A, k fastest (coalesced reads of x's rows).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_A_kernel(MixedRows rows, MixedFactors f, ConstMatrix x, const void* gb_, void* grad_A) {
  using Acc = typename Num<T>::acc;
  const Acc* gb = static_cast<const Acc*>(gb_);
  T* out = static_cast<T*>(grad_A);
  const int64_t total = rows.n * f.r * f.K;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t k = e % f.K, j = (e / f.K) % f.r, a = e / (f.K * f.r);
    Acc s = Acc(0);
    for (int64_t p = rows.start[a + 1]; p < rows.start[a + 2]; ++p) {
      const int64_t row = rows.perm[p];
      if (kept(f, a, row, k)) s += gb[p * f.r + j] * load<T>(x.data, row * x.s0 + k * x.s1);
    }
    out[e] = Num<T>::from_acc(static_cast<Acc>(f.scale_q[a]) * s);
  }
}

// One thread per element (a, c, j) of grad_B, j fastest.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_B_kernel(MixedRows rows, MixedFactors f, ConstMatrix g, const void* xa_, void* grad_B) {
  using Acc = typename Num<T>::acc;
  const Acc* xa = static_cast<const Acc*>(xa_);
  T* out = static_cast<T*>(grad_B);
  const int64_t total = rows.n * f.N * f.r;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t j = e % f.r, c = (e / f.r) % f.N, a = e / (f.r * f.N);
    Acc s = Acc(0);
    for (int64_t p = rows.start[a + 1]; p < rows.start[a + 2]; ++p) {
      s += load<T>(g.data, rows.perm[p] * g.s0 + c * g.s1) * xa[p * f.r + j];
    }
    out[e] = Num<T>::from_acc(s);
  }
}

dim3 row_grid(int64_t M) { return dim3(grid_for(M, kWarps), 1, 1); }  // one warp per sorted position

dim3 col_row_grid(int64_t cols, int64_t M) {
  const unsigned int gx = grid_for(cols, kThreads, 1024);
  const unsigned int gy = static_cast<unsigned int>(M < 65535 ? (M > 0 ? M : 1) : 65535);
  return dim3(gx, gy, 1);
}

}  // namespace

cudaError_t launch_mixed_shrink(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix x, void* xa,
                                cudaStream_t stream) {
  if (rows.M == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto t) {
    shrink_kernel<decltype(t)><<<row_grid(rows.M), kThreads, 0, stream>>>(rows, f, x, xa);
    return cudaGetLastError();
  });
}

cudaError_t launch_mixed_expand(DType dtype, MixedRows rows, MixedFactors f, const void* base, const void* xa, Matrix y,
                                cudaStream_t stream) {
  if (rows.M == 0 || f.N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto t) {
    expand_kernel<decltype(t)><<<col_row_grid(f.N, rows.M), kThreads, 0, stream>>>(rows, f, base, xa, y);
    return cudaGetLastError();
  });
}

cudaError_t launch_mixed_gb(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix g, void* gb, cudaStream_t stream) {
  if (rows.M == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto t) {
    gb_kernel<decltype(t)><<<row_grid(rows.M), kThreads, 0, stream>>>(rows, f, g, gb);
    return cudaGetLastError();
  });
}

cudaError_t launch_mixed_grad_x(DType dtype, MixedRows rows, MixedFactors f, const void* gw, const void* gb,
                                Matrix grad_x, cudaStream_t stream) {
  if (rows.M == 0 || f.K == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto t) {
    grad_x_kernel<decltype(t)><<<col_row_grid(f.K, rows.M), kThreads, 0, stream>>>(rows, f, gw, gb, grad_x);
    return cudaGetLastError();
  });
}

cudaError_t launch_mixed_grad_A(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix x, const void* gb,
                                void* grad_A, cudaStream_t stream) {
  const int64_t total = rows.n * f.r * f.K;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto t) {
    grad_A_kernel<decltype(t)><<<grid_for(total, kThreads), kThreads, 0, stream>>>(rows, f, x, gb, grad_A);
    return cudaGetLastError();
  });
}

cudaError_t launch_mixed_grad_B(DType dtype, MixedRows rows, MixedFactors f, ConstMatrix g, const void* xa,
                                void* grad_B, cudaStream_t stream) {
  const int64_t total = rows.n * f.N * f.r;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto t) {
    grad_B_kernel<decltype(t)><<<grid_for(total, kThreads), kThreads, 0, stream>>>(rows, f, g, xa, grad_B);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_ext
