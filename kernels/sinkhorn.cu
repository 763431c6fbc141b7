// Batched log-domain Sinkhorn, CUDA kernel: one thread block per problem runs every iteration, with the
// convergence test on the device, in one launch. The solver is kernels/sinkhorn_solver.h (shared with the
// CPU kernel); this file supplies the block-wide reductions (a Team) and the cost / plan access (an Io).
#include "fastproto_kernels.h"
#include "sinkhorn_solver.h"
#include "warp.cuh"

namespace fastproto {
namespace cuda {
namespace {

using sinkhorn::kMaxK;
constexpr int kMaxWarps = 8;  // threads per block <= 256

struct DeviceIo {
  const float* __restrict__ c;
  int64_t sn, sk;
  float* __restrict__ p;
  int64_t pn, pk;
  __device__ __forceinline__ float cost(int64_t i, int k) const { return c[i * sn + k * sk]; }
  __device__ __forceinline__ void plan(int64_t i, int k, float t) const { p[i * pn + k * pk] = t; }
};

// The threads of one block. Each reduction goes to lane 0 of every warp by shuffles, then every thread
// combines the per-warp values from shared memory in the same order: the same bits in every thread.
struct BlockTeam {
  float* red;   // [kMaxWarps][kMaxK]
  float* red2;  // [kMaxWarps][kMaxK]
  double* dred; // [kMaxWarps]
  float* g;     // [kMaxK]

  __device__ __forceinline__ int rank() const { return threadIdx.x; }
  __device__ __forceinline__ int size() const { return blockDim.x; }
  __device__ __forceinline__ float* columns() { return g; }
  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ int lane() const { return threadIdx.x & 31; }
  __device__ __forceinline__ int warp() const { return threadIdx.x >> 5; }
  __device__ __forceinline__ int warps() const { return blockDim.x >> 5; }

  template <int KB>
  __device__ void sum(float (&v)[KB], int K) {
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k < K) {
        float x = v[k];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(kAllLanes, x, o);
        if (lane() == 0) red[warp() * kMaxK + k] = x;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k < K) {
        float t = 0.f;
        for (int w = 0; w < warps(); ++w) t += red[w * kMaxK + k];
        v[k] = t;
      }
    }
    __syncthreads();  // red is reused by the next reduction
  }

  __device__ float max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_down_sync(kAllLanes, x, o));
    if (lane() == 0) red[warp() * kMaxK] = x;
    __syncthreads();
    float t = red[0];
    for (int w = 1; w < warps(); ++w) t = fmaxf(t, red[w * kMaxK]);
    __syncthreads();
    return t;
  }

  __device__ double sum(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(kAllLanes, x, o);
    if (lane() == 0) dred[warp()] = x;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < warps(); ++w) t += dred[w];
    __syncthreads();
    return t;
  }

  template <int KB>
  __device__ void merge_lse(float (&m)[KB], float (&s)[KB], int K) {
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k < K) {
        float mk = m[k], sk = s[k];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float m2 = __shfl_down_sync(kAllLanes, mk, o);
          const float s2 = __shfl_down_sync(kAllLanes, sk, o);
          sinkhorn::lse_merge(mk, sk, m2, s2);
        }
        if (lane() == 0) {
          red[warp() * kMaxK + k] = mk;
          red2[warp() * kMaxK + k] = sk;
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (k < K) {
        float mk = -INFINITY, sk = 0.f;
        for (int w = 0; w < warps(); ++w) sinkhorn::lse_merge(mk, sk, red[w * kMaxK + k], red2[w * kMaxK + k]);
        m[k] = mk;
        s[k] = sk;
      }
    }
    __syncthreads();
  }
};

template <int KB>
__global__ void __launch_bounds__(kMaxWarps * 32) sinkhorn_kernel(
    const float* cost, int64_t c_sb, int64_t c_sn, int64_t c_sk, const float* log_a, const float* log_b, float* work,
    float* plan, int64_t p_sb, int64_t p_sn, int64_t p_sk, float* loss, int32_t* iters, int64_t N, int K, float eps,
    float tol, int64_t n_iters) {
  __shared__ float red[kMaxWarps * kMaxK];
  __shared__ float red2[kMaxWarps * kMaxK];
  __shared__ double dred[kMaxWarps];
  __shared__ float g[kMaxK];
  const int64_t b = blockIdx.x;
  BlockTeam team{red, red2, dred, g};
  const DeviceIo io{cost + b * c_sb, c_sn, c_sk, plan + b * p_sb, p_sn, p_sk};
  const sinkhorn::Problem pb{log_a + b * N, log_b + b * K, work + b * 2 * N, loss + b, iters + b,
                             N, K, eps, tol, n_iters};
  sinkhorn::solve<KB>(team, io, pb);
}

}  // namespace

cudaError_t launch_sinkhorn(const float* cost, const int64_t* c_strides, const float* log_a, const float* log_b,
                            float* work, float* plan, const int64_t* p_strides, float* loss, int32_t* iters,
                            int64_t B, int64_t N, int K, float eps, float tol, int64_t n_iters, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  sinkhorn::with_width(K, [&](auto width) {
    constexpr int KB = decltype(width)::value;
    // wide rows hold about 2 KB floats of registers per thread: fewer threads per block
    const int threads = KB >= 32 ? 128 : 256;
    sinkhorn_kernel<KB><<<dim3(unsigned(B)), dim3(threads), 0, stream>>>(
        cost, c_strides[0], c_strides[1], c_strides[2], log_a, log_b, work, plan, p_strides[0], p_strides[1],
        p_strides[2], loss, iters, N, K, eps, tol, n_iters);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace cuda
}  // namespace fastproto
