// Shared-memory tile kernel for merge_ / unmerge_ / merged_weight:
//   out[n, k] = round(in[n, k] + scale * sum_j B[n, j] A[j, k])
//
// Cost model (docs/design.md, "Cost model"): the op must move W once (read + write, 2*N*K
// elements); A and B are tiny and stay in L2. So each block owns a TN x TK
// tile of W, stages the matching slices A[:, k-tile] and B[n-tile, :] in
// shared memory (fp32, r in chunks of RC), computes its tile of B A in fp32
// registers, adds the weight and rounds once. The weight tile is prefetched
// into registers before the low-rank product so its HBM latency overlaps the
// arithmetic. For r <= ~32 the kernel is bound by W's bandwidth; for larger r
// the CUDA-core FMAs (r per element) start to dominate.
#include "numeric.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 32;                       // rows of W per block
constexpr int kRowsPerThread = kTileN / kWarps;  // each warp owns rows warp, warp+8, ...
constexpr int kRankChunk = 32;                   // rank columns staged in shared memory at once

template <typename T>
struct Tile {
  using Acc = typename Num<T>::acc;
  static constexpr int kVec = 16 / sizeof(T);            // W elements per 16-byte vector
  static constexpr int kTileK = 32 * kVec;               // one vector per lane across a warp
  static constexpr int kAccPerChunk = 16 / sizeof(Acc);  // acc values per 16-byte shared load
  static constexpr int kChunks = kVec / kAccPerChunk;    // 16-byte shared loads per lane per rank step
  // Rank-loop unrolling: 4 keeps the FMA pipes fed; fp64 (twice the registers per
  // value) uses 2 so ptxas stays free of spills.
  static constexpr int kRankUnroll = sizeof(Acc) == 8 ? 2 : 4;

  // Shared-memory position of tile column c. Lane l owns columns [l*kVec, (l+1)*kVec)
  // (contiguous in global memory, for coalesced 16-byte accesses); in shared memory
  // its 16-byte chunks are interleaved across lanes, so a warp's chunk-q loads hit
  // 32 consecutive 16-byte words: no bank conflicts.
  static __device__ __forceinline__ int smem_col(int c) {
    const int lane = c / kVec, within = c % kVec;
    return (within / kAccPerChunk) * (32 * kAccPerChunk) + lane * kAccPerChunk + within % kAccPerChunk;
  }
};

// `out` may alias `in` (merge_ in place), so neither is __restrict__.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads, 2)
    merge_lowrank_kernel(const T* in, int64_t in_s0, int64_t in_s1, T* out, int64_t out_s0, int64_t out_s1,
                         const T* __restrict__ A, int64_t a_s0, int64_t a_s1, const T* __restrict__ B, int64_t b_s0,
                         int64_t b_s1, int64_t N, int64_t K, int r, typename Num<T>::acc scale) {
  using Acc = typename Num<T>::acc;
  using TT = Tile<T>;
  constexpr int kVec = TT::kVec;
  constexpr int kTileK = TT::kTileK;

  __shared__ __align__(16) Acc a_s[kRankChunk][kTileK];
  __shared__ Acc b_s[kTileN][kRankChunk + 1];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileK;
  const int64_t k_lane = k0 + static_cast<int64_t>(lane) * kVec;

  // Prefetch this thread's slice of W (vector path) so the loads are in flight
  // during the low-rank product below.
  uint4 w_raw[kRowsPerThread];
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t n = n0 + warp + i * kWarps;
      if (n < N && k_lane < K) {
        w_raw[i] = *reinterpret_cast<const uint4*>(in + n * in_s0 + k_lane);  // not __ldg: in may alias out
      } else {
        w_raw[i] = make_uint4(0, 0, 0, 0);
      }
    }
  }

  Acc acc[kRowsPerThread][kVec];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[i][v] = Acc(0);
  }

  for (int j0 = 0; j0 < r; j0 += kRankChunk) {
    const int jn = min(kRankChunk, r - j0);
    // Stage A[j0:j0+jn, k-tile] (consecutive threads read consecutive k: coalesced
    // for a row-major A) and B[n-tile, j0:j0+jn]; entries past K or N are zero.
    // Rank rows >= jn are never read, so they are not staged.
    for (int idx = threadIdx.x; idx < jn * kTileK; idx += kThreads) {
      const int j = idx / kTileK, c = idx % kTileK;
      const int64_t k = k0 + c;
      Acc v = Acc(0);
      if (k < K) v = Num<T>::to_acc(A[static_cast<int64_t>(j0 + j) * a_s0 + k * a_s1]);
      a_s[j][TT::smem_col(c)] = v;
    }
    for (int idx = threadIdx.x; idx < kTileN * kRankChunk; idx += kThreads) {
      const int i = idx / kRankChunk, j = idx % kRankChunk;
      const int64_t n = n0 + i;
      Acc v = Acc(0);
      if (j < jn && n < N) v = Num<T>::to_acc(B[n * b_s0 + static_cast<int64_t>(j0 + j) * b_s1]);
      b_s[i][j] = v;
    }
    __syncthreads();

#pragma unroll(TT::kRankUnroll)
    for (int j = 0; j < jn; ++j) {
      Acc a[kVec];
#pragma unroll
      for (int q = 0; q < TT::kChunks; ++q) {
        const Acc* src = &a_s[j][q * 32 * TT::kAccPerChunk + lane * TT::kAccPerChunk];
        if constexpr (sizeof(Acc) == 4) {
          const float4 t = *reinterpret_cast<const float4*>(src);
          a[q * 4 + 0] = t.x;
          a[q * 4 + 1] = t.y;
          a[q * 4 + 2] = t.z;
          a[q * 4 + 3] = t.w;
        } else {
          const double2 t = *reinterpret_cast<const double2*>(src);
          a[q * 2 + 0] = t.x;
          a[q * 2 + 1] = t.y;
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const Acc b = b_s[warp + i * kWarps][j];  // same address across the warp: broadcast
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[i][v] = fma(b, a[v], acc[i][v]);
      }
    }
    __syncthreads();
  }

  // Epilogue: one fp32 add of the weight and one rounding per element.
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t n = n0 + warp + i * kWarps;
    if (n >= N) continue;
    if constexpr (kVector) {
      if (k_lane >= K) continue;  // K % kVec == 0 on this path, so the vector is in range
      T w[kVec];
      unpack16<T>(w_raw[i], w);
#pragma unroll
      for (int v = 0; v < kVec; ++v) w[v] = Num<T>::from_acc(fma(scale, acc[i][v], Num<T>::to_acc(w[v])));
      *reinterpret_cast<uint4*>(out + n * out_s0 + k_lane) = pack16<T>(w);
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int64_t k = k_lane + v;
        if (k < K) {
          const Acc w = Num<T>::to_acc(in[n * in_s0 + k * in_s1]);
          out[n * out_s0 + k * out_s1] = Num<T>::from_acc(fma(scale, acc[i][v], w));
        }
      }
    }
  }
}

template <typename T>
bool row_vectorizable(const void* p, int64_t s0, int64_t s1, int64_t K) {
  constexpr int64_t kVec = 16 / sizeof(T);
  return s1 == 1 && K % kVec == 0 && (s0 * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
cudaError_t merge_typed(ConstMatrix in, Matrix out, ConstMatrix A, ConstMatrix B, int64_t N, int64_t K, int64_t r,
                        double scale, cudaStream_t stream) {
  if (N == 0 || K == 0) return cudaSuccess;
  // A transposed (column-major) weight is merged as its row-major transpose:
  // W^T += scale * A^T B^T, i.e. the same kernel with A and B swapped. This
  // keeps the 16-byte path for weights stored as W.t().
  if (!row_vectorizable<T>(in.data, in.s0, in.s1, K) && row_vectorizable<T>(in.data, in.s1, in.s0, N) &&
      row_vectorizable<T>(out.data, out.s1, out.s0, N)) {
    const ConstMatrix in_t{in.data, in.s1, in.s0};
    const Matrix out_t{out.data, out.s1, out.s0};
    const ConstMatrix a_t{B.data, B.s1, B.s0};  // [r, N]
    const ConstMatrix b_t{A.data, A.s1, A.s0};  // [K, r]
    return merge_typed<T>(in_t, out_t, a_t, b_t, K, N, r, scale, stream);
  }
  if (r > INT32_MAX) return cudaErrorInvalidValue;
  const int64_t tiles_n = (N + kTileN - 1) / kTileN;
  const int64_t tiles_k = (K + Tile<T>::kTileK - 1) / Tile<T>::kTileK;
  if (tiles_n > INT32_MAX || tiles_k > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(tiles_n), static_cast<unsigned int>(tiles_k));
  using Acc = typename Num<T>::acc;
  const bool vector = row_vectorizable<T>(in.data, in.s0, in.s1, K) && row_vectorizable<T>(out.data, out.s0, out.s1, K);
  const T* in_p = static_cast<const T*>(in.data);
  T* out_p = static_cast<T*>(out.data);
  const T* a_p = static_cast<const T*>(A.data);
  const T* b_p = static_cast<const T*>(B.data);
  if (vector) {
    merge_lowrank_kernel<T, true><<<grid, kThreads, 0, stream>>>(in_p, in.s0, in.s1, out_p, out.s0, out.s1, a_p, A.s0,
                                                                 A.s1, b_p, B.s0, B.s1, N, K, static_cast<int>(r),
                                                                 static_cast<Acc>(scale));
  } else {
    merge_lowrank_kernel<T, false><<<grid, kThreads, 0, stream>>>(in_p, in.s0, in.s1, out_p, out.s0, out.s1, a_p, A.s0,
                                                                  A.s1, b_p, B.s0, B.s1, N, K, static_cast<int>(r),
                                                                  static_cast<Acc>(scale));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_merge_lowrank(DType dtype, ConstMatrix in, Matrix out, ConstMatrix A, ConstMatrix B, int64_t N,
                                 int64_t K, int64_t r, double scale, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return merge_typed<T>(in, out, A, B, N, K, r, scale, stream);
  });
}

}  // namespace cuda
}  // namespace lora_ext
