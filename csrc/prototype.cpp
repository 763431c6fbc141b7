// Prototype attention, CPU kernels: the forward runs one thread per query, the backward one thread per
// (sample, head) so that its prototype-gradient sums need no atomics; both run the routines shared with the
// CUDA kernels (kernels/prototype_attention.h). float32 / float16 / bfloat16, float32 arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_element_type.h"
#include "inverse_norms.h"
#include "prototype.h"
#include "prototype_attention.h"

namespace fastproto {
namespace {

// The strided operands of query (b, h, n): q's row, the head's prototypes, `out`'s row (the forward's output;
// the backward passes grad_out, which the routine only reads), the head's inverse key norms and the weights'
// row (the forward's weights output or the backward's grad_attn, when given).
template <typename T>
struct QueryRows {
  const at::Tensor &q, &k, &v, &out;
  const c10::optional<at::Tensor>& attn;
  const float* inv_k;  // [H,M] (shared bank) or [B,H,M], normalised kinds only
  proto::Rows<T> operator()(int64_t b, int64_t h, int64_t n) const {
    const bool shared = k.dim() == 3;
    const int64_t H = q.size(1), M = k.size(-2);
    return {q.data_ptr<T>() + b * q.stride(0) + h * q.stride(1) + n * q.stride(2), q.stride(3),
            k.data_ptr<T>() + (shared ? 0 : b * k.stride(0)) + h * k.stride(-3), k.stride(-2), k.stride(-1),
            v.data_ptr<T>() + (shared ? 0 : b * v.stride(0)) + h * v.stride(-3), v.stride(-2), v.stride(-1),
            out.data_ptr<T>() + b * out.stride(0) + h * out.stride(1) + n * out.stride(2), out.stride(3),
            inv_k ? inv_k + ((shared ? 0 : b * H) + h) * M : nullptr,
            attn ? attn->data_ptr<T>() + b * attn->stride(0) + h * attn->stride(1) + n * attn->stride(2) : nullptr,
            attn ? attn->stride(3) : 0};
  }
};

// normalised kinds: the keys' inverse norms once ([H,M] or [B,H,M]), not per query
at::Tensor key_inverse_norms(const at::Tensor& k, int64_t kind, double eps) {
  return proto::normalised(int(kind)) ? inverse_norms(k, eps) : at::Tensor();
}

void prototype_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& scale, int64_t kind, double eps, at::Tensor out,
                                     const c10::optional<at::Tensor>& attn) {
  const char* op = "prototype_attention_forward: ";
  check_prototype_attention(op, q, k, v, scale, kind, eps, "out", out, at::kCPU);
  check_attention_weights(op, q, k, attn, "attn");
  const at::Tensor inv_k = key_inverse_norms(k, kind, eps);
  with_cpu_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const QueryRows<T> rows{q, k, v, out, attn, inv_k.defined() ? inv_k.data_ptr<float>() : nullptr};
    const int64_t H = q.size(1), N = q.size(2);
    const float* sp = scale.data_ptr<float>();
    proto::with_max_m(int(k.size(-2)), [&](auto max_m) {
      at::parallel_for(0, q.size(0) * H * N, 64, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t % N, h = (t / N) % H, b = t / (N * H);
          proto::attend<max_m()>(rows(b, h, n), int(k.size(-2)), q.size(3), v.size(-1), int(kind), sp[h],
                                 float(eps), 0, 1, CastToFloat{}, CastFromFloat{}, OneThreadSum{});
        }
      });
    });
  });
}

struct AddInPlace {
  void operator()(float* dst, float v) const { *dst += v; }
};

void prototype_attention_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& scale, const at::Tensor& grad_out,
                                      const c10::optional<at::Tensor>& grad_attn, int64_t kind, double eps,
                                      at::Tensor grad_q, at::Tensor grad_k, at::Tensor grad_v, at::Tensor grad_scale) {
  check_prototype_attention_backward(q, k, v, scale, grad_out, grad_attn, kind, eps, grad_q, grad_k, grad_v,
                                     grad_scale, at::kCPU);
  grad_k.zero_();
  grad_v.zero_();
  const at::Tensor inv_k = key_inverse_norms(k, kind, eps);
  with_cpu_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const QueryRows<T> rows{q, k, v, grad_out, grad_attn, inv_k.defined() ? inv_k.data_ptr<float>() : nullptr};
    const int64_t H = q.size(1), N = q.size(2), M = k.size(-2), D = q.size(3), Dv = v.size(-1);
    const float* sp = scale.data_ptr<float>();
    T* dq = grad_q.data_ptr<T>();
    float* dk = grad_k.data_ptr<float>();
    float* dv = grad_v.data_ptr<float>();
    float* ds = grad_scale.data_ptr<float>();
    at::parallel_for(0, q.size(0) * H, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {  // t = b * H + h owns its [M, D], [M, Dv] and scale accumulators
        const int64_t b = t / H, h = t % H;
        double dscale = 0.0;  // the queries' shares of d(scale) cancel: summed in double, as on the GPU
        for (int64_t n = 0; n < N; ++n) {
          const proto::Rows<T> r = rows(b, h, n);
          T* dq_row = dq + b * grad_q.stride(0) + h * grad_q.stride(1) + n * grad_q.stride(2);
          dscale += proto::attend_backward(r, r.out, r.o_sd, dq_row, grad_q.stride(3), int(M), D, Dv, int(kind),
                                           sp[h], float(eps), 0, 1, CastToFloat{}, CastFromFloat{}, OneThreadSum{},
                                           AddInPlace{}, dk + t * M * D, dv + t * M * Dv);
        }
        ds[t] = float(dscale);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) {
  m.impl("prototype_attention_forward", &prototype_attention_forward_cpu);
  m.impl("prototype_attention_backward", &prototype_attention_backward_cpu);
}

}  // namespace fastproto
