// Linear attention forward (inference), CUDA kernel of the output pass: one warp per query, lanes splitting
// the head and value dims; the per-query routine is kernels/linear_attention_row.h (shared with the CPU
// kernel). The kv state and key sum come in as float32 (computed by the host wrapper with cuBLAS); the
// state of a (batch, head) is re-read per query from L1/L2.
#include "fastproto_kernels.h"
#include "linear_attention_row.h"
#include "warp.cuh"

namespace fastproto {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) linear_attention_kernel(LinAttnArgs args) {
  const int64_t t = warp_row();
  if (t >= args.B * args.H * args.N) return;
  const int64_t n = t % args.N, bh = t / args.N, h = bh % args.H, b = bh / args.H;
  const T* q = static_cast<const T*>(args.q) + b * args.q_strides[0] + h * args.q_strides[1] + n * args.q_strides[2];
  T* out = static_cast<T*>(args.out) + b * args.o_strides[0] + h * args.o_strides[1] + n * args.o_strides[2];
  linattn::attend(q, args.q_strides[3], args.state + bh * args.D * args.Dv, args.ksum + bh * args.D, out,
                  args.o_strides[3], args.D, args.Dv, args.phi, args.eps, threadIdx.x & 31, 32, ToFloat{},
                  FromFloat{}, WarpSum{}, WarpBcast{});
}

}  // namespace

cudaError_t launch_linear_attention(ElementType dtype, const LinAttnArgs& args, cudaStream_t stream) {
  const int64_t rows = args.B * args.H * args.N;
  if (rows == 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto tag) {
    linear_attention_kernel<decltype(tag)><<<row_blocks(rows), row_threads(), 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastproto
