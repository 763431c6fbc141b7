// Nearest-prototype routing, CUDA kernel: one warp per token, its lanes splitting the channels (coalesced
// reads of the token and of each prototype row); the per-token math is kernels/route_nearest.h, shared with
// the CPU kernel. Memory-bound for the few-prototype banks of the models: the token row is read from global
// memory once per prototype and served from L1 after the first.
#include "fastproto_kernels.h"
#include "route_nearest.h"
#include "warp.cuh"

namespace fastproto {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) route_nearest_kernel(
    const T* __restrict__ x, int64_t x_sb, int64_t x_sn, int64_t x_sc, const T* __restrict__ p, int64_t p_bank,
    int64_t p_sm, int64_t p_sc, const float* __restrict__ inv_p, float* dist, int64_t d_sb, int64_t d_sn, int64_t* index, int64_t i_sb,
    int64_t i_sn, int64_t B, int64_t N, int64_t M, int64_t C, bool per_location, float eps) {
  const int64_t t = warp_row();
  if (t >= B * N) return;
  const int lane = threadIdx.x & 31;
  const int64_t b = t / N, n = t % N;
  float best;
  int64_t best_m;
  // inv_p is [M] for a shared bank, else [G, M] (a 3-D bank with bank stride 0 repeats one bank: bank 0's norms)
  const int64_t inv_bank = p_bank == 0 ? 0 : M;
  route::nearest_token(x + b * x_sb + n * x_sn, x_sc, p + route::bank_offset(b, n, per_location, p_bank), p_sm, p_sc,
                       inv_p + route::bank_offset(b, n, per_location, inv_bank), M, C, lane, 32, eps, ToFloat{},
                       WarpSum{}, best, best_m);
  if (lane == 0) {
    dist[b * d_sb + n * d_sn] = best;
    index[b * i_sb + n * i_sn] = best_m;
  }
}

}  // namespace

cudaError_t launch_route_nearest(ElementType dtype, const void* x, const int64_t* x_strides, const void* p,
                                 const int64_t* p_strides, const float* inv_p, float* dist, const int64_t* d_strides,
                                 int64_t* index, const int64_t* i_strides, int64_t B, int64_t N, int64_t M, int64_t C,
                                 bool per_location, float eps, cudaStream_t stream) {
  return launch_rows(dtype, B * N, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    route_nearest_kernel<T><<<grid, block, 0, stream>>>(
        static_cast<const T*>(x), x_strides[0], x_strides[1], x_strides[2], static_cast<const T*>(p), p_strides[0],
        p_strides[1], p_strides[2], inv_p, dist, d_strides[0], d_strides[1], index, i_strides[0], i_strides[1], B, N, M, C,
        per_location, eps);
  });
}

}  // namespace cuda
}  // namespace fastproto
