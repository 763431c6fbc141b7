// Prototype attention forward (inference), CUDA kernel: one warp per query, its lanes splitting the head
// dims (coalesced reads of q, k, v rows and of the output row). The per-query routine is
// kernels/prototype_attention.h, shared with the CPU kernel. The few prototypes of a head are re-read per
// query from L1/L2; q is read once from global memory per prototype pass and served from L1 after.
#include "fastproto_kernels.h"
#include "prototype_attention.h"
#include "warp.cuh"

namespace fastproto {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) prototype_attention_kernel(ProtoAttnArgs args) {
  const int64_t t = warp_row();
  if (t >= args.B * args.H * args.N) return;
  const int64_t n = t % args.N, h = (t / args.N) % args.H, b = t / (args.N * args.H);
  const T* q = static_cast<const T*>(args.q);
  const T* k = static_cast<const T*>(args.k);
  const T* v = static_cast<const T*>(args.v);
  T* out = static_cast<T*>(args.out);
  const proto::Rows<T> r{q + b * args.q_strides[0] + h * args.q_strides[1] + n * args.q_strides[2],
                         args.q_strides[3],
                         k + b * args.k_strides[0] + h * args.k_strides[1], args.k_strides[2], args.k_strides[3],
                         v + b * args.v_strides[0] + h * args.v_strides[1], args.v_strides[2], args.v_strides[3],
                         out + b * args.o_strides[0] + h * args.o_strides[1] + n * args.o_strides[2],
                         args.o_strides[3], args.inv_k ? args.inv_k + b * args.inv_k_sb + h * args.M : nullptr};
  proto::attend(r, args.M, args.D, args.Dv, args.kind, args.scale[h], args.eps, threadIdx.x & 31, 32, ToFloat{},
                FromFloat{}, WarpSum{});
}

}  // namespace

cudaError_t launch_prototype_attention(ElementType dtype, const ProtoAttnArgs& args, cudaStream_t stream) {
  const int64_t rows = args.B * args.H * args.N;
  if (rows == 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto tag) {
    prototype_attention_kernel<decltype(tag)><<<row_blocks(rows), row_threads(), 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastproto
