// Host code shared by the CPU and CUDA implementations of sinkhorn_solve (csrc/sinkhorn.cpp,
// csrc/cuda/sinkhorn_cuda.cpp): argument checks and the float32 staging of 16-bit costs.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace fastproto {

// Arguments of sinkhorn_solve: cost [B,N,K] float32/float16/bfloat16 (any strides, 1 <= K <= 64),
// log_a [B,N] / log_b [B,K] float32 contiguous, plan like the cost (any strides), loss [B] float32 and
// iters [B] int32 contiguous, all on the kernel's device (one device).
inline void check_sinkhorn(const at::Tensor& cost, const at::Tensor& log_a, const at::Tensor& log_b, double eps,
                           int64_t n_iters, double tol, const at::Tensor& plan, const at::Tensor& loss,
                           const at::Tensor& iters, at::DeviceType device) {
  TORCH_CHECK(cost.dim() == 3, "sinkhorn_solve: cost must be [B,N,K], got ", cost.sizes());
  const auto dt = cost.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "sinkhorn_solve: cost must be float32, float16 or bfloat16, got ", dt);
  const int64_t B = cost.size(0), N = cost.size(1), K = cost.size(2);
  TORCH_CHECK(N >= 1 && K >= 1 && K <= 64, "sinkhorn_solve: cost must have N >= 1 and 1 <= K <= 64, got ",
              cost.sizes());
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "sinkhorn_solve: eps must be finite and > 0, got ", eps);
  TORCH_CHECK(n_iters >= 1, "sinkhorn_solve: n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK(tol >= 0, "sinkhorn_solve: tol must be >= 0, got ", tol);
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType type, bool contiguous) {
    TORCH_CHECK(t.sizes() == shape && t.scalar_type() == type && (!contiguous || t.is_contiguous()),
                "sinkhorn_solve: ", name, " must be ", (contiguous ? "contiguous " : ""), type, " of shape ",
                shape, ", got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device().type() == device && t.device() == cost.device(), "sinkhorn_solve: ", name,
                " must be on ", cost.device(), " (", device, " kernel), got ", t.device());
  };
  check(cost, "cost", cost.sizes(), dt, false);
  check(log_a, "log_a", {B, N}, at::kFloat, true);
  check(log_b, "log_b", {B, K}, at::kFloat, true);
  check(plan, "plan", cost.sizes(), dt, false);
  check(loss, "loss", {B}, at::kFloat, true);
  check(iters, "iters", {B}, at::kInt, true);
}

// The kernels read float32 costs and write float32 plans: 16-bit costs are converted first and the plan is
// written back in their dtype (the models build their OT costs in float32, so this is the rare path).
template <typename Solve>
void solve_in_float32(const at::Tensor& cost, at::Tensor& plan, Solve&& solve) {
  if (cost.scalar_type() == at::kFloat) return solve(cost, plan);
  at::Tensor plan32 = at::empty(cost.sizes(), cost.options().dtype(at::kFloat));
  solve(cost.to(at::kFloat), plan32);
  plan.copy_(plan32);
}

}  // namespace fastproto
