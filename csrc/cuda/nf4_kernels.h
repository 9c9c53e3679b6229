// Host-callable launchers of the NF4 CUDA kernels (csrc/cuda/nf4_dequant.cu).
// No torch header here: nvcc never parses torch. Each launcher enqueues on
// `stream` and returns cudaGetLastError(); nf4_cuda.cpp turns a failure into
// a TORCH_CHECK. Numerics match the CPU kernels bit for bit: fp32 products
// and sums rounded separately (__fmul_rn/__fadd_rn, never an FMA), one
// round-to-nearest-even to the output dtype.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../host/dtype.h"

namespace lora_ext {
namespace nf4_cuda {

// out[e] = round<out_type>(kNF4Code[nibble(packed, e)] * scales[e >> log2_blocksize]) for e < n;
// `out` is row-major contiguous with n elements.
cudaError_t launch_dequantize(DType out_type, const uint8_t* packed, const float* scales, int log2_blocksize, int64_t n,
                              void* out, cudaStream_t stream);

// Double quantization: scales[b] = code[q[b]] * nested_absmax[b / nested_blocksize] + offset, for b < nblocks.
cudaError_t launch_resolve_absmax(const uint8_t* q, const float* nested_absmax, const float* code, float offset,
                                  int64_t nested_blocksize, int64_t nblocks, float* scales, cudaStream_t stream);

}  // namespace nf4_cuda
}  // namespace lora_ext
