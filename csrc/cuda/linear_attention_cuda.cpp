// CUDA implementation of linear_attention_forward / _backward: argument checks, the products over all tokens
// of a head by ATen (cuBLAS; csrc/linear_attention.h), and the launches of the per-row passes,
// kernels/linear_attention.cu, on the current stream (the same per-row routines as the CPU kernels,
// csrc/linear_attention.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "element_type.h"
#include "fastproto_kernels.h"
#include "linear_attention.h"

namespace fastproto {
namespace {

void check_rows(const char* op, const at::Tensor& t) {
  TORCH_CHECK((t.size(0) * t.size(1) * t.size(2) + 7) / 8 < (int64_t(1) << 31), op, "too many rows for one launch, got ",
              t.sizes());
}

// The forward / queries' pass arguments; `out` is the forward's output (unused by the backward).
cuda::LinAttnArgs lin_args(const at::Tensor& q, const at::Tensor& state, const at::Tensor& ksum, int64_t Dv,
                           int64_t phi, double eps, void* out, const at::Tensor* out_t) {
  cuda::LinAttnArgs a{};
  a.q = q.data_ptr();
  a.out = out;
  a.state = state.data_ptr<float>();
  a.ksum = ksum.data_ptr<float>();
  for (int i = 0; i < 4; ++i) {
    a.q_strides[i] = q.stride(i);
    a.o_strides[i] = out_t ? out_t->stride(i) : 0;
  }
  a.B = q.size(0);
  a.H = q.size(1);
  a.N = q.size(2);
  a.D = q.size(3);
  a.Dv = Dv;
  a.phi = int(phi);
  a.eps = float(eps);
  return a;
}

void strides(const at::Tensor& t, int64_t* out) {
  for (int i = 0; i < 4; ++i) out[i] = t.stride(i);
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void linear_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t phi,
                                   double eps, at::Tensor out, at::Tensor state, at::Tensor ksum) {
  const char* op = "linear_attention_forward: ";
  check_linear_attention(op, q, k, v, phi, eps, "out", out, state, ksum, at::kCUDA);
  check_rows(op, q);
  const c10::cuda::CUDAGuard guard(q.device());
  kv_state(k, v, phi, state, ksum);
  const cuda::LinAttnArgs a = lin_args(q, state, ksum, out.size(3), phi, eps, out.data_ptr(), &out);
  check_launch(op, cuda::launch_linear_attention(element_type(q), a, at::cuda::getCurrentCUDAStream()));
}

void linear_attention_backward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& state, const at::Tensor& ksum, const at::Tensor& grad_out,
                                    int64_t phi, double eps, at::Tensor grad_q, at::Tensor grad_k,
                                    at::Tensor grad_v) {
  const char* op = "linear_attention_backward: ";
  check_linear_attention_backward(q, k, v, state, ksum, grad_out, phi, eps, grad_q, grad_k, grad_v, at::kCUDA);
  check_rows(op, q);
  check_rows(op, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Dv = v.size(3);
  at::Tensor a = at::empty({B, H, q.size(2), D}, q.options().dtype(at::kFloat));
  at::Tensor w = at::empty({B, H, q.size(2)}, q.options().dtype(at::kFloat));
  cuda::LinAttnBwdQueryArgs qa{};
  qa.fwd = lin_args(q, state, ksum, Dv, phi, eps, nullptr, nullptr);
  qa.g = grad_out.data_ptr();
  qa.dq = grad_q.data_ptr();
  strides(grad_out, qa.g_strides);
  strides(grad_q, qa.dq_strides);
  qa.a = a.data_ptr<float>();
  qa.w = w.data_ptr<float>();
  check_launch(op, cuda::launch_linear_attention_backward_queries(element_type(q), qa, stream));
  const auto [dS, dz] = state_gradients(a, w, grad_out);
  cuda::LinAttnBwdKeyArgs ka{};
  ka.k = k.data_ptr();
  ka.v = v.data_ptr();
  ka.dk = grad_k.data_ptr();
  ka.dv = grad_v.data_ptr();
  ka.dstate = dS.data_ptr<float>();
  ka.dksum = dz.data_ptr<float>();
  strides(k, ka.k_strides);
  strides(v, ka.v_strides);
  strides(grad_k, ka.dk_strides);
  strides(grad_v, ka.dv_strides);
  ka.B = B;
  ka.H = H;
  ka.N = k.size(2);
  ka.D = D;
  ka.Dv = Dv;
  ka.phi = int(phi);
  check_launch(op, cuda::launch_linear_attention_backward_keys(element_type(q), ka, stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) {
  m.impl("linear_attention_forward", &linear_attention_forward_cuda);
  m.impl("linear_attention_backward", &linear_attention_backward_cuda);
}

}  // namespace fastproto
