// Host code shared by the compiled ops that normalise prototypes (route_nearest, prototype_attention_forward).
#pragma once
#include <ATen/ATen.h>

namespace fastproto {

// 1 / max(||p||, eps) over the last dim, float32 contiguous, shaped like p without it: a bank's prototype
// norms computed once, not once per token or query that reads them.
inline at::Tensor inverse_norms(const at::Tensor& p, double eps) {
  return at::reciprocal(p.to(at::kFloat).norm(2, {-1}).clamp_min(eps)).contiguous();
}

}  // namespace fastproto
