// Prototype attention, CUDA kernels: one warp per query, its lanes splitting the head dims (coalesced reads of
// q, k, v rows and of the output row). The per-query routines are kernels/prototype_attention.h, shared with the
// CPU kernels. The few prototypes of a head are re-read per query from L1/L2.
//
// Backward: one block per (sample * head, tile of queries); its warps add the queries' shares of the prototype
// gradients into shared memory, and the block adds those sums to global memory once (M*(D+Dv) atomics per
// block, instead of per query), and one d(scale) share per warp.
#include "fastproto_kernels.h"
#include "prototype_attention.h"
#include "warp.cuh"

namespace fastproto {
namespace cuda {
namespace {

// The strided operands of query (b, h, n); `out` is the forward's output or the backward's grad_out, `attn`
// the forward's weights output or the backward's grad_attn.
template <typename T>
__device__ __forceinline__ proto::Rows<T> query_rows(const ProtoAttnArgs& a, int64_t b, int64_t h, int64_t n) {
  return {static_cast<const T*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1] + n * a.q_strides[2],
          a.q_strides[3],
          static_cast<const T*>(a.k) + b * a.k_strides[0] + h * a.k_strides[1], a.k_strides[2], a.k_strides[3],
          static_cast<const T*>(a.v) + b * a.v_strides[0] + h * a.v_strides[1], a.v_strides[2], a.v_strides[3],
          static_cast<T*>(a.out) + b * a.o_strides[0] + h * a.o_strides[1] + n * a.o_strides[2], a.o_strides[3],
          a.inv_k ? a.inv_k + b * a.inv_k_sb + h * a.M : nullptr,
          a.attn ? static_cast<T*>(a.attn) + b * a.a_strides[0] + h * a.a_strides[1] + n * a.a_strides[2] : nullptr,
          a.a_strides[3]};
}

template <typename T, int MaxM>
__global__ void __launch_bounds__(kRowWarps * 32) prototype_attention_kernel(ProtoAttnArgs args) {
  const int64_t t = warp_row();
  if (t >= args.B * args.H * args.N) return;
  const int64_t n = t % args.N, h = (t / args.N) % args.H, b = t / (args.N * args.H);
  proto::attend<MaxM>(query_rows<T>(args, b, h, n), args.M, args.D, args.Dv, args.kind, args.scale[h], args.eps,
                threadIdx.x & 31, 32, ToFloat{}, FromFloat{}, WarpSum{});
}

struct SharedAdd {
  __device__ __forceinline__ void operator()(float* dst, float v) const { atomicAdd(dst, v); }
};

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) prototype_attention_backward_kernel(ProtoAttnBwdArgs args) {
  extern __shared__ float acc[];  // this (sample, head)'s dk [M, D], then dv [M, Dv]
  const ProtoAttnArgs& f = args.fwd;
  const int64_t bh = blockIdx.x, b = bh / f.H, h = bh % f.H;
  const int64_t md = f.M * f.D, mv = f.M * f.Dv;
  for (int64_t i = threadIdx.x; i < md + mv; i += blockDim.x) acc[i] = 0.f;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t tile_end = int64_t(blockIdx.y + 1) * kProtoBwdQueries;
  const int64_t n_end = tile_end < f.N ? tile_end : f.N;
  double dscale = 0.0;  // the queries' shares of d(scale) cancel: summed in double
  for (int64_t n = int64_t(blockIdx.y) * kProtoBwdQueries + (threadIdx.x >> 5); n < n_end; n += kRowWarps) {
    const proto::Rows<T> r = query_rows<T>(f, b, h, n);
    T* dq = static_cast<T*>(args.dq) + b * args.dq_strides[0] + h * args.dq_strides[1] + n * args.dq_strides[2];
    dscale += proto::attend_backward(r, r.out, r.o_sd, dq, args.dq_strides[3], f.M, f.D, f.Dv, f.kind, f.scale[h],
                                     f.eps, lane, 32, ToFloat{}, FromFloat{}, WarpSum{}, SharedAdd{}, acc, acc + md);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < md; i += blockDim.x) atomicAdd(args.dk + bh * md + i, acc[i]);
  for (int64_t i = threadIdx.x; i < mv; i += blockDim.x) atomicAdd(args.dv + bh * mv + i, acc[md + i]);
  if (lane == 0) atomicAdd(args.ds + bh, float(dscale));
}

}  // namespace

cudaError_t launch_prototype_attention(ElementType dtype, const ProtoAttnArgs& args, cudaStream_t stream) {
  return launch_rows(dtype, args.B * args.H * args.N, [&](auto tag, dim3 grid, dim3 block) {
    proto::with_max_m(args.M, [&](auto max_m) {
      prototype_attention_kernel<decltype(tag), max_m()><<<grid, block, 0, stream>>>(args);
    });
  });
}

cudaError_t launch_prototype_attention_backward(ElementType dtype, const ProtoAttnBwdArgs& args, cudaStream_t stream) {
  const ProtoAttnArgs& f = args.fwd;
  if (f.B * f.H * f.N == 0) return cudaSuccess;
  const dim3 grid(unsigned(f.B * f.H), unsigned((f.N + kProtoBwdQueries - 1) / kProtoBwdQueries));
  const size_t smem = proto_backward_shared_bytes(f);
  return with_element_type(dtype, [&](auto tag) {
    const auto kernel = prototype_attention_backward_kernel<decltype(tag)>;
    if (smem > 48 * 1024) {  // above the default limit the kernel must opt in (the caller checked the device's)
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<grid, row_threads(), smem, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastproto
