// Batched log-domain Sinkhorn, CPU kernel: one thread per problem running the solver shared with the
// CUDA kernel (kernels/sinkhorn_solver.h), on float32 costs (16-bit costs staged, csrc/sinkhorn.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sinkhorn.h"
#include "sinkhorn_solver.h"

namespace fastproto {
namespace {

struct CpuIo {
  const float* c;
  int64_t sn, sk;
  float* p;
  int64_t pn, pk;
  float cost(int64_t i, int k) const { return c[i * sn + k * sk]; }
  void plan(int64_t i, int k, float t) const { p[i * pn + k * pk] = t; }
};

void sinkhorn_solve_cpu(const at::Tensor& cost_in, const at::Tensor& log_a, const at::Tensor& log_b, double eps,
                        int64_t n_iters, double tol, at::Tensor plan_out, at::Tensor loss, at::Tensor iters) {
  check_sinkhorn(cost_in, log_a, log_b, eps, n_iters, tol, plan_out, loss, iters, at::kCPU);
  const int64_t B = cost_in.size(0), N = cost_in.size(1);
  const int K = int(cost_in.size(2));
  auto work = at::zeros({B, 2, N}, log_a.options());
  solve_in_float32(cost_in, plan_out, [&](const at::Tensor& cost, at::Tensor& plan) {
    sinkhorn::with_width(K, [&](auto width) {
      constexpr int KB = decltype(width)::value;
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const CpuIo io{cost.data_ptr<float>() + b * cost.stride(0), cost.stride(1), cost.stride(2),
                         plan.data_ptr<float>() + b * plan.stride(0), plan.stride(1), plan.stride(2)};
          const sinkhorn::Problem pb{log_a.data_ptr<float>() + b * N, log_b.data_ptr<float>() + b * K,
                                     work.data_ptr<float>() + b * 2 * N, loss.data_ptr<float>() + b,
                                     iters.data_ptr<int32_t>() + b, N, K, float(eps), float(tol), n_iters};
          sinkhorn::SerialTeam team;
          sinkhorn::solve<KB>(team, io, pb);
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) { m.impl("sinkhorn_solve", &sinkhorn_solve_cpu); }

}  // namespace fastproto
