// Host-callable launchers of the exact merge / unmerge kernels (csrc/cuda/exact_merge.cu); the
// per-element function is documented in csrc/host/exact_merge.h. No torch header (nvcc includes it).
//
// W is a contiguous [N, K] weight of `dtype` (fp32, fp16 or bf16); A32 [r, K] and B32 [N, r] are
// contiguous fp32. Every launcher enqueues on `stream` and returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../host/dtype.h"

namespace lora_ext {
namespace cuda {

// Merge in place. An element whose unmerge would not restore it is appended at slot
// atomicAdd(count, 1) to (index, value) while the slot is below `capacity`; past it, the element
// is left unmerged and its bit is set in `overflow` ((N*K + 31) / 32 words, zeroed by the caller).
cudaError_t launch_merge_exact(DType dtype, void* W, const float* A32, const float* B32, int64_t N, int64_t K,
                               int64_t r, float scale, int64_t* index, void* value, int64_t capacity,
                               unsigned long long* count, uint32_t* overflow, cudaStream_t stream);

// The overflowed elements of launch_merge_exact: merge them and append them all (count continues
// from the first pass; index/value hold room for every element).
cudaError_t launch_merge_exact_overflow(DType dtype, void* W, const float* A32, const float* B32, int64_t N, int64_t K,
                                        int64_t r, float scale, int64_t* index, void* value, unsigned long long* count,
                                        const uint32_t* overflow, cudaStream_t stream);

// Unmerge in place: W = round(W - d) for every element (the recorded originals are written back
// by the caller).
cudaError_t launch_unmerge_exact(DType dtype, void* W, const float* A32, const float* B32, int64_t N, int64_t K,
                                 int64_t r, float scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
