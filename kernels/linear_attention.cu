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

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) linear_attention_kernel(LinAttnArgs args) {
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= args.B * args.H * args.N) return;  // whole warps leave together
  const int64_t n = t % args.N, bh = t / args.N, h = bh % args.H, b = bh / args.H;
  const T* q = static_cast<const T*>(args.q) + b * args.q_strides[0] + h * args.q_strides[1] + n * args.q_strides[2];
  T* out = static_cast<T*>(args.out) + b * args.o_strides[0] + h * args.o_strides[1] + n * args.o_strides[2];
  linattn::attend(q, args.q_strides[3], args.state + bh * args.D * args.Dv, args.ksum + bh * args.D, out,
                  args.o_strides[3], args.D, args.Dv, args.phi, args.eps, threadIdx.x & 31, 32, ToFloat{},
                  FromFloat{}, WarpSum{}, WarpBcast{});
}

template <typename T>
cudaError_t launch_typed(const LinAttnArgs& args, cudaStream_t stream) {
  const int64_t rows = args.B * args.H * args.N;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  linear_attention_kernel<T><<<dim3(unsigned(blocks)), dim3(kWarpsPerBlock * 32), 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_linear_attention(ElementType dtype, const LinAttnArgs& args, cudaStream_t stream) {
  if (args.B * args.H * args.N == 0) return cudaSuccess;
  switch (dtype) {
    case ElementType::kHalf:
      return launch_typed<__half>(args, stream);
    case ElementType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
    default:
      return launch_typed<float>(args, stream);
  }
}

}  // namespace cuda
}  // namespace fastproto
