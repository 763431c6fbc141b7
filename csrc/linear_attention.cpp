// Linear attention forward (inference), CPU kernel: the kv state by ATen (csrc/linear_attention.h), then one
// thread per query running the routine shared with the CUDA kernel (kernels/linear_attention.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "linear_attention.h"
#include "linear_attention_row.h"

namespace fastproto {
namespace {

template <typename T>
void attend_all(const at::Tensor& q, const at::Tensor& state, const at::Tensor& z, int kind, float eps,
                at::Tensor& out) {
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3), Dv = out.size(3);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float* sp = state.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  at::parallel_for(0, q.size(0) * H * N, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t % N, bh = t / N, h = bh % H, b = bh / H;
      linattn::attend(qp + b * q.stride(0) + h * q.stride(1) + n * q.stride(2), q.stride(3), sp + bh * D * Dv,
                      zp + bh * D, op + b * out.stride(0) + h * out.stride(1) + n * out.stride(2), out.stride(3), D,
                      Dv, kind, eps, 0, 1, CastToFloat{}, CastFromFloat{}, OneThreadSum{}, OneThreadBcast{});
    }
  });
}

void linear_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t phi,
                                  double eps, at::Tensor out, at::Tensor state) {
  check_linear_attention(q, k, v, phi, eps, out, state, at::kCPU);
  const at::Tensor z = kv_state(k, v, phi, state);
  switch (q.scalar_type()) {
    case at::kHalf:
      return attend_all<at::Half>(q, state, z, int(phi), float(eps), out);
    case at::kBFloat16:
      return attend_all<at::BFloat16>(q, state, z, int(phi), float(eps), out);
    default:
      return attend_all<float>(q, state, z, int(phi), float(eps), out);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) { m.impl("linear_attention_forward", &linear_attention_forward_cpu); }

}  // namespace fastproto
