// Host code shared by the CPU and CUDA implementations of prototype_attention_forward (csrc/prototype.cpp,
// csrc/cuda/prototype_cuda.cpp): argument checks.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace fastproto {

// q [B,H,N,D] float32/float16/bfloat16; k [B,H,M,D] or shared [H,M,D] and v like k with Dv, q's dtype
// (any strides, 1 <= M <= 64); scale [H] float32 contiguous; out [B,H,N,Dv] q's dtype (any strides);
// kind 0 (relu_cos) or 1 (softmax); one device.
inline void check_prototype_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& scale, int64_t kind, double eps, const at::Tensor& out,
                                      at::DeviceType device) {
  const char* op = "prototype_attention_forward: ";
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
  TORCH_CHECK(kind == 0 || kind == 1, op, "kind must be 0 (relu_cos) or 1 (softmax), got ", kind);
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, "eps must be finite and > 0, got ", eps);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == H && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              op, "scale must be contiguous float32 [H] = [", H, "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({B, H, N, Dv}) && out.scalar_type() == dt, op, "out must be ", dt,
              " [", B, ",", H, ",", N, ",", Dv, "], got ", out.scalar_type(), " ", out.sizes());
  for (const at::Tensor* t : {&q, &k, &v, &scale, &out})
    TORCH_CHECK(t->device().type() == device && t->device() == q.device(), op, "every tensor must be on ",
                q.device(), " (", device, " kernel), got ", t->device());
}

}  // namespace fastproto
