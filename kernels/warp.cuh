// Device helpers of the CUDA kernels: the full-warp lane mask, and for the one-warp-per-row kernels
// (kernels/route.cu, kernels/prototype.cu) the element conversions and the warp-wide sum they pass to the
// shared host/device routines.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastproto_kernels.h"

namespace fastproto {
namespace cuda {

constexpr unsigned kAllLanes = 0xffffffffu;
constexpr int kRowWarps = 8;  // warps (rows) per block of the one-warp-per-row kernels

// The row of this thread's warp in a one-warp-per-row launch (whole warps share it, so they leave together).
__device__ __forceinline__ int64_t warp_row() { return int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); }

// Launch shape of a one-warp-per-row kernel over `rows` rows (rows / kRowWarps < 2^31, checked by the callers).
inline dim3 row_blocks(int64_t rows) { return dim3(unsigned((rows + kRowWarps - 1) / kRowWarps)); }
inline dim3 row_threads() { return dim3(kRowWarps * 32); }

// f(T{}) with T the element type: float, __half or __nv_bfloat16. Host code.
template <typename F>
cudaError_t with_element_type(ElementType dtype, F&& f) {
  switch (dtype) {
    case ElementType::kHalf:
      return f(__half{});
    case ElementType::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      return f(float{});
  }
}

// launch(T{}, grid, block) for a one-warp-per-row kernel over `rows` rows (none: nothing), T by dtype; returns
// the launch's error. Host code.
template <typename Launch>
cudaError_t launch_rows(ElementType dtype, int64_t rows, Launch&& launch) {
  if (rows == 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto tag) {
    launch(tag, row_blocks(rows), row_threads());
    return cudaGetLastError();
  });
}

struct ToFloat {
  __device__ __forceinline__ float operator()(float v) const { return v; }
  __device__ __forceinline__ float operator()(__half v) const { return __half2float(v); }
  __device__ __forceinline__ float operator()(__nv_bfloat16 v) const { return __bfloat162float(v); }
};

struct FromFloat {
  __device__ __forceinline__ void operator()(float& dst, float v) const { dst = v; }
  __device__ __forceinline__ void operator()(__half& dst, float v) const { dst = __float2half_rn(v); }
  __device__ __forceinline__ void operator()(__nv_bfloat16& dst, float v) const { dst = __float2bfloat16_rn(v); }
};

// xor shuffles leave the sum in every lane of the warp
struct WarpSum {
  __device__ __forceinline__ float operator()(float v) const {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kAllLanes, v, o);
    return v;
  }
};

// lane l's value in every lane of the warp
struct WarpBcast {
  __device__ __forceinline__ float operator()(float v, int l) const { return __shfl_sync(kAllLanes, v, l); }
};

}  // namespace cuda
}  // namespace fastproto
