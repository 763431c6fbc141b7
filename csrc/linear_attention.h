// Host code shared by the CPU and CUDA implementations of linear_attention_forward / _backward
// (csrc/linear_attention.cpp, csrc/cuda/linear_attention_cuda.cpp): argument checks, and the products over
// all tokens of a head (the kv state and key sum; in the backward their gradients), computed with ATen on the
// tensors' device (float32 matrix products: cuBLAS on the GPU).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <utility>

namespace fastproto {

// q [B,H,Nq,D], k [B,H,Nk,D], v [B,H,Nk,Dv] float32/float16/bfloat16 of one dtype (any strides); phi 0 (elu+1)
// or 1 (relu); eps finite >= 0; `out` (named out_name: the forward's output or the backward's grad_out)
// [B,H,Nq,Dv] of q's dtype (any strides); state [B,H,D,Dv] and ksum [B,H,D] float32 contiguous; one device.
inline void check_linear_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   int64_t phi, double eps, const char* out_name, const at::Tensor& out,
                                   const at::Tensor& state, const at::Tensor& ksum, at::DeviceType device) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, "q, k, v must be [B,H,N,D], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              "q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, "k and v must have q's dtype ", dt);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && v.size(0) == B && v.size(1) == H, op,
              "q, k, v must share batch and heads, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(3) == D, op, "k has head dim ", k.size(3), " but q has ", D);
  TORCH_CHECK(v.size(2) == k.size(2), op, "v has ", v.size(2), " tokens but k has ", k.size(2));
  TORCH_CHECK(D >= 1 && Dv >= 1, op, "head dims must be positive");
  TORCH_CHECK(phi == 0 || phi == 1, op, "phi must be 0 (elu+1) or 1 (relu), got ", phi);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({B, H, Nq, Dv}) && out.scalar_type() == dt, op, out_name, " must be ",
              dt, " [", B, ",", H, ",", Nq, ",", Dv, "], got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(state.sizes() == at::IntArrayRef({B, H, D, Dv}) && state.scalar_type() == at::kFloat &&
                  state.is_contiguous(),
              op, "state must be contiguous float32 [", B, ",", H, ",", D, ",", Dv, "], got ", state.scalar_type(),
              " ", state.sizes());
  TORCH_CHECK(ksum.sizes() == at::IntArrayRef({B, H, D}) && ksum.scalar_type() == at::kFloat && ksum.is_contiguous(),
              op, "ksum must be contiguous float32 [", B, ",", H, ",", D, "], got ", ksum.scalar_type(), " ",
              ksum.sizes());
  for (const at::Tensor* t : {&q, &k, &v, &out, &state, &ksum})
    TORCH_CHECK(t->device().type() == device && t->device() == q.device(), op, "every tensor must be on ",
                q.device(), " (", device, " kernel), got ", t->device());
}

// The backward's inputs as the forward's (grad_out in place of out, state and ksum as the forward wrote them),
// and its outputs grad_q, grad_k, grad_v shaped and typed like q, k, v (any strides).
inline void check_linear_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& state, const at::Tensor& ksum,
                                            const at::Tensor& grad_out, int64_t phi, double eps,
                                            const at::Tensor& grad_q, const at::Tensor& grad_k,
                                            const at::Tensor& grad_v, at::DeviceType device) {
  const char* op = "linear_attention_backward: ";
  check_linear_attention(op, q, k, v, phi, eps, "grad_out", grad_out, state, ksum, device);
  const auto like = [&](const at::Tensor& grad, const at::Tensor& t, const char* name) {
    TORCH_CHECK(grad.sizes() == t.sizes() && grad.scalar_type() == t.scalar_type() && grad.device() == t.device(),
                op, name, " must be ", t.scalar_type(), " ", t.sizes(), " on ", t.device(), ", got ",
                grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
  };
  like(grad_q, q, "grad_q");
  like(grad_k, k, "grad_k");
  like(grad_v, v, "grad_v");
}

// Writes S = phi(k)^T v into state [B,H,D,Dv] and z = sum_j phi(k_j) into ksum [B,H,D].
inline void kv_state(const at::Tensor& k, const at::Tensor& v, int64_t phi, at::Tensor& state, at::Tensor& ksum) {
  const at::Tensor kf = k.to(at::kFloat);
  const at::Tensor fk = phi == 0 ? at::elu(kf).add_(1.0) : at::relu(kf);
  at::matmul_out(state, fk.transpose(-2, -1), v.to(at::kFloat));
  at::sum_out(ksum, fk, {-2});
}

// The state gradients from the queries' pass (a = r phi(q) [B,H,Nq,D], w = out·g [B,H,Nq], float32):
// dS = a^T g [B,H,D,Dv] and dz = -a^T w [B,H,D], float32 contiguous.
inline std::pair<at::Tensor, at::Tensor> state_gradients(const at::Tensor& a, const at::Tensor& w,
                                                         const at::Tensor& grad_out) {
  const at::Tensor at_ = a.transpose(-2, -1);
  at::Tensor dS = at::matmul(at_, grad_out.to(at::kFloat)).contiguous();
  at::Tensor dz = at::matmul(at_, w.unsqueeze(-1)).squeeze(-1).neg_().contiguous();
  return {std::move(dS), std::move(dz)};
}

}  // namespace fastproto
