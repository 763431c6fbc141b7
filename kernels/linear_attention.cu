// Linear attention, CUDA kernels of the per-row passes: one warp per query (forward output; backward dq and
// the query terms of the state gradients) or per key (backward dk, dv), lanes splitting the head and value
// dims. The per-row routines are kernels/linear_attention_row.h (shared with the CPU kernels). The products
// over all tokens of a head (kv state, key sum, their gradients) come in as float32, computed by the host
// wrapper with cuBLAS; a head's [D, Dv] matrix is re-read per row from L1/L2.
#include "fastproto_kernels.h"
#include "linear_attention_row.h"
#include "warp.cuh"

namespace fastproto {
namespace cuda {
namespace {

// Row n of head (b, h) of a strided [B,H,N,*] tensor.
template <typename T>
__device__ __forceinline__ T* row(const void* base, const int64_t* strides, int64_t b, int64_t h, int64_t n) {
  return static_cast<T*>(const_cast<void*>(base)) + b * strides[0] + h * strides[1] + n * strides[2];
}

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) linear_attention_kernel(LinAttnArgs args) {
  const int64_t t = warp_row();
  if (t >= args.B * args.H * args.N) return;
  const int64_t n = t % args.N, bh = t / args.N, h = bh % args.H, b = bh / args.H;
  linattn::attend(row<const T>(args.q, args.q_strides, b, h, n), args.q_strides[3], args.state + bh * args.D * args.Dv,
                  args.ksum + bh * args.D, row<T>(args.out, args.o_strides, b, h, n), args.o_strides[3], args.D,
                  args.Dv, args.phi, args.eps, threadIdx.x & 31, 32, ToFloat{}, FromFloat{}, WarpSum{}, WarpBcast{});
}

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) linear_attention_backward_query_kernel(LinAttnBwdQueryArgs args) {
  const LinAttnArgs& f = args.fwd;
  const int64_t t = warp_row();
  if (t >= f.B * f.H * f.N) return;
  const int64_t n = t % f.N, bh = t / f.N, h = bh % f.H, b = bh / f.H;
  const int lane = threadIdx.x & 31;
  const float w = linattn::query_backward(
      row<const T>(f.q, f.q_strides, b, h, n), f.q_strides[3], row<const T>(args.g, args.g_strides, b, h, n),
      args.g_strides[3], f.state + bh * f.D * f.Dv, f.ksum + bh * f.D, row<T>(args.dq, args.dq_strides, b, h, n),
      args.dq_strides[3], args.a + t * f.D, f.D, f.Dv, f.phi, f.eps, lane, 32, ToFloat{}, FromFloat{}, WarpSum{});
  if (lane == 0) args.w[t] = w;
}

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) linear_attention_backward_key_kernel(LinAttnBwdKeyArgs args) {
  const int64_t t = warp_row();
  if (t >= args.B * args.H * args.N) return;
  const int64_t n = t % args.N, bh = t / args.N, h = bh % args.H, b = bh / args.H;
  linattn::key_backward(row<const T>(args.k, args.k_strides, b, h, n), args.k_strides[3],
                        row<const T>(args.v, args.v_strides, b, h, n), args.v_strides[3],
                        args.dstate + bh * args.D * args.Dv, args.dksum + bh * args.D,
                        row<T>(args.dk, args.dk_strides, b, h, n), args.dk_strides[3],
                        row<T>(args.dv, args.dv_strides, b, h, n), args.dv_strides[3], args.D, args.Dv, args.phi,
                        threadIdx.x & 31, 32, ToFloat{}, FromFloat{}, WarpSum{});
}

}  // namespace

cudaError_t launch_linear_attention(ElementType dtype, const LinAttnArgs& args, cudaStream_t stream) {
  return launch_rows(dtype, args.B * args.H * args.N, [&](auto tag, dim3 grid, dim3 block) {
    linear_attention_kernel<decltype(tag)><<<grid, block, 0, stream>>>(args);
  });
}

cudaError_t launch_linear_attention_backward_queries(ElementType dtype, const LinAttnBwdQueryArgs& args,
                                                     cudaStream_t stream) {
  return launch_rows(dtype, args.fwd.B * args.fwd.H * args.fwd.N, [&](auto tag, dim3 grid, dim3 block) {
    linear_attention_backward_query_kernel<decltype(tag)><<<grid, block, 0, stream>>>(args);
  });
}

cudaError_t launch_linear_attention_backward_keys(ElementType dtype, const LinAttnBwdKeyArgs& args,
                                                  cudaStream_t stream) {
  return launch_rows(dtype, args.B * args.H * args.N, [&](auto tag, dim3 grid, dim3 block) {
    linear_attention_backward_key_kernel<decltype(tag)><<<grid, block, 0, stream>>>(args);
  });
}

}  // namespace cuda
}  // namespace fastproto
