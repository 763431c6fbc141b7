// CUDA implementation of prototype_attention_forward: argument checks and the launch of kernels/prototype.cu
// on the current stream (the same per-query routine as the CPU kernel, csrc/prototype.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "element_type.h"
#include "fastproto_kernels.h"
#include "inverse_norms.h"
#include "prototype.h"

namespace fastproto {
namespace {

void prototype_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& scale, int64_t kind, double eps, at::Tensor out) {
  check_prototype_attention(q, k, v, scale, kind, eps, out, at::kCUDA);
  TORCH_CHECK((q.size(0) * q.size(1) * q.size(2) + 7) / 8 < (int64_t(1) << 31),
              "prototype_attention_forward: too many queries for one launch");
  const c10::cuda::CUDAGuard guard(q.device());
  const bool shared = k.dim() == 3;
  cuda::ProtoAttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.scale = scale.data_ptr<float>();
  // relu_cos: the keys' inverse norms once per bank, not per query
  const at::Tensor inv_k = kind == 0 ? inverse_norms(k, eps) : at::Tensor();
  a.inv_k = inv_k.defined() ? inv_k.data_ptr<float>() : nullptr;
  a.inv_k_sb = shared ? 0 : q.size(1) * k.size(-2);
  a.out = out.data_ptr();
  for (int i = 0; i < 4; ++i) {
    a.q_strides[i] = q.stride(i);
    a.o_strides[i] = out.stride(i);
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
  const cudaError_t err = cuda::launch_prototype_attention(element_type(q), a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "prototype_attention_forward: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) { m.impl("prototype_attention_forward", &prototype_attention_forward_cuda); }

}  // namespace fastproto
