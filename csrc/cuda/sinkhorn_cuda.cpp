// CUDA implementation of sinkhorn_solve: argument checks and the launch of kernels/sinkhorn.cu on the
// current stream (the same solver as the CPU kernel, csrc/sinkhorn.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastproto_kernels.h"
#include "sinkhorn.h"

namespace fastproto {
namespace {

void sinkhorn_solve_cuda(const at::Tensor& cost_in, const at::Tensor& log_a, const at::Tensor& log_b, double eps,
                         int64_t n_iters, double tol, at::Tensor plan_out, at::Tensor loss, at::Tensor iters) {
  check_sinkhorn(cost_in, log_a, log_b, eps, n_iters, tol, plan_out, loss, iters, at::kCUDA);
  const c10::cuda::CUDAGuard guard(cost_in.device());
  const int64_t B = cost_in.size(0), N = cost_in.size(1);
  auto work = at::zeros({B, 2, N}, log_a.options());
  solve_in_float32(cost_in, plan_out, [&](const at::Tensor& cost, at::Tensor& plan) {
    const int64_t c_strides[3] = {cost.stride(0), cost.stride(1), cost.stride(2)};
    const int64_t p_strides[3] = {plan.stride(0), plan.stride(1), plan.stride(2)};
    const cudaError_t err = cuda::launch_sinkhorn(
        cost.data_ptr<float>(), c_strides, log_a.data_ptr<float>(), log_b.data_ptr<float>(), work.data_ptr<float>(),
        plan.data_ptr<float>(), p_strides, loss.data_ptr<float>(), iters.data_ptr<int32_t>(), B, N,
        int(cost.size(2)), float(eps), float(tol), n_iters, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "sinkhorn_solve: CUDA kernel launch failed: ", cudaGetErrorString(err));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) { m.impl("sinkhorn_solve", &sinkhorn_solve_cuda); }

}  // namespace fastproto
