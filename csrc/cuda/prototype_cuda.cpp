// CUDA implementation of prototype_attention_forward / _backward: argument checks and the launches of
// kernels/prototype.cu on the current stream (the same per-query routines as the CPU kernels,
// csrc/prototype.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "element_type.h"
#include "fastproto_kernels.h"
#include "inverse_norms.h"
#include "prototype.h"

namespace fastproto {
namespace {

// The kernels' arguments for checked inputs; `out` is the forward's output or the backward's grad_out, `attn`
// the forward's weights or the backward's grad_attn, and `inv_k` holds the normalised kinds' inverse key norms
// (computed once per bank, not per query) while they run.
cuda::ProtoAttnArgs proto_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& scale,
                               int64_t kind, double eps, const at::Tensor& out, const c10::optional<at::Tensor>& attn,
                               at::Tensor& inv_k) {
  const bool shared = k.dim() == 3;
  cuda::ProtoAttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.scale = scale.data_ptr<float>();
  inv_k = kind == 0 || kind == 2 ? inverse_norms(k, eps) : at::Tensor();
  a.inv_k = inv_k.defined() ? inv_k.data_ptr<float>() : nullptr;
  a.inv_k_sb = shared ? 0 : q.size(1) * k.size(-2);
  a.out = out.data_ptr();
  a.attn = attn ? attn->data_ptr() : nullptr;
  for (int i = 0; i < 4; ++i) {
    a.q_strides[i] = q.stride(i);
    a.o_strides[i] = out.stride(i);
    a.a_strides[i] = attn ? attn->stride(i) : 0;
    // shared [H,M,*] banks: batch stride 0, the other three strides as they are
    a.k_strides[i] = shared ? (i == 0 ? 0 : k.stride(i - 1)) : k.stride(i);
    a.v_strides[i] = shared ? (i == 0 ? 0 : v.stride(i - 1)) : v.stride(i);
  }
  a.B = q.size(0);
  a.H = q.size(1);
  a.N = q.size(2);
  a.D = q.size(3);
  a.Dv = v.size(-1);
  a.M = int(k.size(-2));
  a.kind = int(kind);
  a.eps = float(eps);
  return a;
}

void prototype_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& scale, int64_t kind, double eps, at::Tensor out,
                                      const c10::optional<at::Tensor>& attn) {
  check_prototype_attention("prototype_attention_forward: ", q, k, v, scale, kind, eps, "out", out, at::kCUDA);
  check_attention_weights("prototype_attention_forward: ", q, k, attn, "attn");
  TORCH_CHECK((q.size(0) * q.size(1) * q.size(2) + 7) / 8 < (int64_t(1) << 31),
              "prototype_attention_forward: too many queries for one launch");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor inv_k;
  const cuda::ProtoAttnArgs a = proto_args(q, k, v, scale, kind, eps, out, attn, inv_k);
  const cudaError_t err = cuda::launch_prototype_attention(element_type(q), a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "prototype_attention_forward: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

void prototype_attention_backward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& scale, const at::Tensor& grad_out,
                                       const c10::optional<at::Tensor>& grad_attn, int64_t kind, double eps,
                                       at::Tensor grad_q, at::Tensor grad_k, at::Tensor grad_v,
                                       at::Tensor grad_scale) {
  check_prototype_attention_backward(q, k, v, scale, grad_out, grad_attn, kind, eps, grad_q, grad_k, grad_v,
                                     grad_scale, at::kCUDA);
  const char* op = "prototype_attention_backward: ";
  TORCH_CHECK(q.size(0) * q.size(1) < (int64_t(1) << 31) && q.size(2) / cuda::kProtoBwdQueries < 65536, op,
              "too many samples x heads or queries for one launch, got q ", q.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor inv_k;
  cuda::ProtoAttnBwdArgs a{};
  a.fwd = proto_args(q, k, v, scale, kind, eps, grad_out, grad_attn, inv_k);
  const size_t smem = cuda::proto_backward_shared_bytes(a.fwd);
  int smem_optin = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()) ==
                  cudaSuccess,
              op, "cannot read the device's shared memory limit");
  const size_t smem_max = size_t(smem_optin);
  TORCH_CHECK(smem <= smem_max, op, "M*(D+Dv) = ", k.size(-2), "*(", q.size(3), "+", v.size(-1),
              ") float32 prototype-gradient sums need ", smem, " bytes of shared memory, the device has ", smem_max);
  grad_k.zero_();
  grad_v.zero_();
  grad_scale.zero_();
  a.dq = grad_q.data_ptr();
  for (int i = 0; i < 4; ++i) a.dq_strides[i] = grad_q.stride(i);
  a.dk = grad_k.data_ptr<float>();
  a.dv = grad_v.data_ptr<float>();
  a.ds = grad_scale.data_ptr<float>();
  const cudaError_t err =
      cuda::launch_prototype_attention_backward(element_type(q), a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) {
  m.impl("prototype_attention_forward", &prototype_attention_forward_cuda);
  m.impl("prototype_attention_backward", &prototype_attention_backward_cuda);
}

}  // namespace fastproto
