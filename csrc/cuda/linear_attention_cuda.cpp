// CUDA implementation of linear_attention_forward: argument checks, the kv state by ATen (cuBLAS), and the
// launch of the output pass, kernels/linear_attention.cu, on the current stream (the same per-query routine
// as the CPU kernel, csrc/linear_attention.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "element_type.h"
#include "fastproto_kernels.h"
#include "linear_attention.h"

namespace fastproto {
namespace {

void linear_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t phi,
                                   double eps, at::Tensor out, at::Tensor state) {
  check_linear_attention(q, k, v, phi, eps, out, state, at::kCUDA);
  TORCH_CHECK((q.size(0) * q.size(1) * q.size(2) + 7) / 8 < (int64_t(1) << 31),
              "linear_attention_forward: too many queries for one launch");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor z = kv_state(k, v, phi, state);
  cuda::LinAttnArgs a{};
  a.q = q.data_ptr();
  a.out = out.data_ptr();
  a.state = state.data_ptr<float>();
  a.ksum = z.data_ptr<float>();
  for (int i = 0; i < 4; ++i) {
    a.q_strides[i] = q.stride(i);
    a.o_strides[i] = out.stride(i);
  }
  a.B = q.size(0);
  a.H = q.size(1);
  a.N = q.size(2);
  a.D = q.size(3);
  a.Dv = out.size(3);
  a.phi = int(phi);
  a.eps = float(eps);
  const cudaError_t err = cuda::launch_linear_attention(element_type(q), a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "linear_attention_forward: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) { m.impl("linear_attention_forward", &linear_attention_forward_cuda); }

}  // namespace fastproto
