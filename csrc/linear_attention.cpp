// Linear attention, CPU kernels: the products over all tokens of a head by ATen (csrc/linear_attention.h), the
// per-row work by one thread per query / key running the routines shared with the CUDA kernels
// (kernels/linear_attention_row.h). float32 / float16 / bfloat16, float32 arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_element_type.h"
#include "linear_attention.h"
#include "linear_attention_row.h"

namespace fastproto {
namespace {

// Row n of head (b, h) of a [B,H,N,*] tensor, and its element stride.
template <typename T>
T* row(const at::Tensor& t, int64_t b, int64_t h, int64_t n) {
  return t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1) + n * t.stride(2);
}

// f(b, h, n, bh) for every row of [B,H,N,*], in parallel.
template <typename F>
void for_rows(int64_t B, int64_t H, int64_t N, F&& f) {
  at::parallel_for(0, B * H * N, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t % N, bh = t / N;
      f(bh / H, bh % H, n, bh);
    }
  });
}

void linear_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t phi,
                                  double eps, at::Tensor out, at::Tensor state, at::Tensor ksum) {
  check_linear_attention("linear_attention_forward: ", q, k, v, phi, eps, "out", out, state, ksum, at::kCPU);
  kv_state(k, v, phi, state, ksum);
  const int64_t D = q.size(3), Dv = out.size(3);
  const float* sp = state.data_ptr<float>();
  const float* zp = ksum.data_ptr<float>();
  with_cpu_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_rows(q.size(0), q.size(1), q.size(2), [&](int64_t b, int64_t h, int64_t n, int64_t bh) {
      linattn::attend(row<T>(q, b, h, n), q.stride(3), sp + bh * D * Dv, zp + bh * D, row<T>(out, b, h, n),
                      out.stride(3), D, Dv, int(phi), float(eps), 0, 1, CastToFloat{}, CastFromFloat{},
                      OneThreadSum{}, OneThreadBcast{});
    });
  });
}

void linear_attention_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& state, const at::Tensor& ksum, const at::Tensor& grad_out,
                                   int64_t phi, double eps, at::Tensor grad_q, at::Tensor grad_k, at::Tensor grad_v) {
  check_linear_attention_backward(q, k, v, state, ksum, grad_out, phi, eps, grad_q, grad_k, grad_v, at::kCPU);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Dv = v.size(3);
  at::Tensor a = at::empty({B, H, q.size(2), D}, q.options().dtype(at::kFloat));
  at::Tensor w = at::empty({B, H, q.size(2)}, q.options().dtype(at::kFloat));
  with_cpu_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const float* sp = state.data_ptr<float>();
    const float* zp = ksum.data_ptr<float>();
    float* ap = a.data_ptr<float>();
    float* wp = w.data_ptr<float>();
    for_rows(B, H, q.size(2), [&](int64_t b, int64_t h, int64_t n, int64_t bh) {
      const int64_t i = bh * q.size(2) + n;
      wp[i] = linattn::query_backward(row<T>(q, b, h, n), q.stride(3), row<T>(grad_out, b, h, n), grad_out.stride(3),
                                      sp + bh * D * Dv, zp + bh * D, row<T>(grad_q, b, h, n), grad_q.stride(3),
                                      ap + i * D, D, Dv, int(phi), float(eps), 0, 1, CastToFloat{}, CastFromFloat{},
                                      OneThreadSum{});
    });
    const auto [dS, dz] = state_gradients(a, w, grad_out);
    const float* dsp = dS.data_ptr<float>();
    const float* dzp = dz.data_ptr<float>();
    for_rows(B, H, k.size(2), [&](int64_t b, int64_t h, int64_t n, int64_t bh) {
      linattn::key_backward(row<T>(k, b, h, n), k.stride(3), row<T>(v, b, h, n), v.stride(3), dsp + bh * D * Dv,
                            dzp + bh * D, row<T>(grad_k, b, h, n), grad_k.stride(3), row<T>(grad_v, b, h, n),
                            grad_v.stride(3), D, Dv, int(phi), 0, 1, CastToFloat{}, CastFromFloat{}, OneThreadSum{});
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) {
  m.impl("linear_attention_forward", &linear_attention_forward_cpu);
  m.impl("linear_attention_backward", &linear_attention_backward_cpu);
}

}  // namespace fastproto
