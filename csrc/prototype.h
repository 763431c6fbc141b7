// Host code shared by the CPU and CUDA implementations of prototype_attention_forward / _backward
// (csrc/prototype.cpp, csrc/cuda/prototype_cuda.cpp): argument checks.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cmath>

namespace fastproto {

// q [B,H,N,D] float32/float16/bfloat16; k [B,H,M,D] or shared [H,M,D] and v like k with Dv, q's dtype
// (any strides, 1 <= M <= 64); scale [H] float32 contiguous; `out` (named out_name: the forward's output or
// the backward's grad_out) [B,H,N,Dv] q's dtype (any strides); kind 0 (relu_cos) or 1 (softmax); one device.
inline void check_prototype_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& scale, int64_t kind, double eps, const char* out_name,
                                      const at::Tensor& out, at::DeviceType device) {
  TORCH_CHECK(q.dim() == 4, op, "q must be [B,H,N,D], got ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              "q must be float32, float16 or bfloat16, got ", dt);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == v.dim() && (k.dim() == 3 || k.dim() == 4), op,
              "k and v must both be [B,H,M,*] or both [H,M,*], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, "k and v must have q's dtype ", dt);
  const bool shared = k.dim() == 3;
  TORCH_CHECK(k.size(-1) == D && k.size(shared ? 0 : 1) == H && (shared || k.size(0) == B), op, "k must be [",
              B, ",", H, ",M,", D, "] or [", H, ",M,", D, "], got ", k.sizes());
  const int64_t M = k.size(-2), Dv = v.size(-1);
  TORCH_CHECK(M >= 1 && M <= 64, op, "need 1 <= M <= 64 prototypes, got ", M);
  for (int64_t i = 0; i + 1 < k.dim(); ++i)
    TORCH_CHECK(v.size(i) == k.size(i), op, "v must match k in all but the last dim, got ", v.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 3, op, "kind must be 0 (relu_cos), 1 (softmax), 2 (cos_softmax) or 3 (linear), got ",
              kind);
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, "eps must be finite and > 0, got ", eps);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == H && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              op, "scale must be contiguous float32 [H] = [", H, "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({B, H, N, Dv}) && out.scalar_type() == dt, op, out_name, " must be ",
              dt, " [", B, ",", H, ",", N, ",", Dv, "], got ", out.scalar_type(), " ", out.sizes());
  for (const at::Tensor* t : {&q, &k, &v, &scale, &out})
    TORCH_CHECK(t->device().type() == device && t->device() == q.device(), op, "every tensor must be on ",
                q.device(), " (", device, " kernel), got ", t->device());
}

// The attention weights [B,H,N,M] of q's dtype (any strides) on q's device, when given (attn_name: the
// forward's weights output or the backward's grad_attn).
inline void check_attention_weights(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const c10::optional<at::Tensor>& attn, const char* attn_name) {
  if (!attn.has_value()) return;
  const std::array<int64_t, 4> want{q.size(0), q.size(1), q.size(2), k.size(-2)};
  TORCH_CHECK(attn->sizes() == at::IntArrayRef(want) && attn->scalar_type() == q.scalar_type() &&
                  attn->device() == q.device(),
              op, attn_name, " must be ", q.scalar_type(), " ", at::IntArrayRef(want), " on ", q.device(), ", got ",
              attn->scalar_type(), " ", attn->sizes(), " on ", attn->device());
}

// The backward's inputs as the forward's (grad_out in place of out), and its outputs: grad_q like q (any
// strides); float32 contiguous grad_k [B,H,M,D], grad_v [B,H,M,Dv] and grad_scale [B,H] (per-sample shares
// also for shared banks), on q's device.
inline void check_prototype_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& scale, const at::Tensor& grad_out,
                                               const c10::optional<at::Tensor>& grad_attn, int64_t kind,
                                               double eps, const at::Tensor& grad_q, const at::Tensor& grad_k,
                                               const at::Tensor& grad_v, const at::Tensor& grad_scale,
                                               at::DeviceType device) {
  const char* op = "prototype_attention_backward: ";
  check_prototype_attention(op, q, k, v, scale, kind, eps, "grad_out", grad_out, device);
  check_attention_weights(op, q, k, grad_attn, "grad_attn");
  const int64_t B = q.size(0), H = q.size(1), M = k.size(-2), D = q.size(3), Dv = v.size(-1);
  TORCH_CHECK(grad_q.sizes() == q.sizes() && grad_q.scalar_type() == q.scalar_type(), op, "grad_q must be ",
              q.scalar_type(), " ", q.sizes(), ", got ", grad_q.scalar_type(), " ", grad_q.sizes());
  const auto accumulator = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape && t.scalar_type() == at::kFloat && t.is_contiguous(), op, name,
                " must be contiguous float32 ", shape, ", got ", t.scalar_type(), " ", t.sizes());
  };
  accumulator(grad_k, "grad_k", {B, H, M, D});
  accumulator(grad_v, "grad_v", {B, H, M, Dv});
  accumulator(grad_scale, "grad_scale", {B, H});
  for (const at::Tensor* t : {&grad_q, &grad_k, &grad_v, &grad_scale})
    TORCH_CHECK(t->device() == q.device(), op, "every tensor must be on ", q.device(), ", got ", t->device());
}

}  // namespace fastproto
