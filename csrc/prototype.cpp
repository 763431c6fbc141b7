// Prototype attention forward (inference), CPU kernel: one thread per query running the routine shared
// with the CUDA kernel (kernels/prototype_attention.h). float32 / float16 / bfloat16, float32 arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "inverse_norms.h"
#include "prototype.h"
#include "prototype_attention.h"

namespace fastproto {
namespace {

template <typename T>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& scale, int kind,
                float eps, at::Tensor& out) {
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(-2), Dv = v.size(-1);
  const bool shared = k.dim() == 3;
  const int64_t kb = shared ? 0 : k.stride(0), vb = shared ? 0 : v.stride(0);
  const int64_t kh = k.stride(-3), vh = v.stride(-3);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float* sp = scale.data_ptr<float>();
  // relu_cos: the keys' inverse norms once ([H,M] or [B,H,M]), not per query
  const at::Tensor inv_k = kind == proto::kReluCos ? inverse_norms(k, eps) : at::Tensor();
  const float* ik = inv_k.defined() ? inv_k.data_ptr<float>() : nullptr;
  at::parallel_for(0, q.size(0) * H * N, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t % N, h = (t / N) % H, b = t / (N * H);
      const proto::Rows<T> r{qp + b * q.stride(0) + h * q.stride(1) + n * q.stride(2), q.stride(3),
                             kp + b * kb + h * kh, k.stride(-2), k.stride(-1),
                             vp + b * vb + h * vh, v.stride(-2), v.stride(-1),
                             op + b * out.stride(0) + h * out.stride(1) + n * out.stride(2), out.stride(3),
                             ik ? ik + ((shared ? 0 : b * H) + h) * M : nullptr};
      proto::attend(r, int(M), D, Dv, kind, sp[h], eps, 0, 1, CastToFloat{}, CastFromFloat{}, OneThreadSum{});
    }
  });
}

void prototype_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& scale, int64_t kind, double eps, at::Tensor out) {
  check_prototype_attention(q, k, v, scale, kind, eps, out, at::kCPU);
  switch (q.scalar_type()) {
    case at::kHalf:
      return attend_all<at::Half>(q, k, v, scale, int(kind), float(eps), out);
    case at::kBFloat16:
      return attend_all<at::BFloat16>(q, k, v, scale, int(kind), float(eps), out);
    default:
      return attend_all<float>(q, k, v, scale, int(kind), float(eps), out);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) { m.impl("prototype_attention_forward", &prototype_attention_forward_cpu); }

}  // namespace fastproto
