// Host code shared by the CPU and CUDA implementations of route_nearest (csrc/route.cpp,
// csrc/cuda/route_cuda.cpp): argument checks.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace fastproto {

// x [B,N,C] float32/float16/bfloat16 (any strides); prototypes [M,C], [B,M,C] or (per_location) [N,M,C] of
// x's dtype (any strides), M >= 1; dist [B,N] float32 and index [B,N] int64 (any strides); one device.
inline void check_route_nearest(const at::Tensor& x, const at::Tensor& p, bool per_location, double eps,
                                const at::Tensor& dist, const at::Tensor& index, at::DeviceType device) {
  TORCH_CHECK(x.dim() == 3, "route_nearest: x must be [B,N,C], got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "route_nearest: x must be float32, float16 or bfloat16, got ", dt);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(p.scalar_type() == dt, "route_nearest: prototypes must have x's dtype ", dt, ", got ", p.scalar_type());
  TORCH_CHECK(p.dim() == 2 || p.dim() == 3, "route_nearest: prototypes must be [M,C] or [G,M,C], got ", p.sizes());
  TORCH_CHECK(p.size(-1) == C, "route_nearest: prototypes have ", p.size(-1), " channels, x has ", C);
  TORCH_CHECK(p.size(-2) >= 1, "route_nearest: the bank has no prototypes");
  if (p.dim() == 3) {
    TORCH_CHECK(p.size(0) == (per_location ? N : B), "route_nearest: a ", (per_location ? "per-location" : "per-sample"),
                " bank needs leading dim ", (per_location ? N : B), ", got ", p.sizes());
  } else {
    TORCH_CHECK(!per_location, "route_nearest: per_location needs an [N,M,C] bank, got ", p.sizes());
  }
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "route_nearest: eps must be finite and > 0, got ", eps);
  TORCH_CHECK(dist.sizes() == at::IntArrayRef({B, N}) && dist.scalar_type() == at::kFloat,
              "route_nearest: dist must be float32 [B,N], got ", dist.scalar_type(), " ", dist.sizes());
  TORCH_CHECK(index.sizes() == at::IntArrayRef({B, N}) && index.scalar_type() == at::kLong,
              "route_nearest: index must be int64 [B,N], got ", index.scalar_type(), " ", index.sizes());
  for (const at::Tensor* t : {&x, &p, &dist, &index})
    TORCH_CHECK(t->device().type() == device && t->device() == x.device(), "route_nearest: every tensor must be on ",
                x.device(), " (", device, " kernel), got ", t->device());
}

}  // namespace fastproto
