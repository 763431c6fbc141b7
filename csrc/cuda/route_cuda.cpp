// CUDA implementation of route_nearest: argument checks and the launch of kernels/route.cu on the current
// stream (the same per-token math as the CPU kernel, csrc/route.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "element_type.h"
#include "fastproto_kernels.h"
#include "inverse_norms.h"
#include "route.h"

namespace fastproto {
namespace {

void route_nearest_cuda(const at::Tensor& x, const at::Tensor& p, bool per_location, double eps, at::Tensor dist,
                        at::Tensor index) {
  check_route_nearest(x, p, per_location, eps, dist, index, at::kCUDA);
  TORCH_CHECK((x.size(0) * x.size(1) + 7) / 8 < (int64_t(1) << 31), "route_nearest: too many tokens for one launch");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t x_strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t p_strides[3] = {p.dim() == 3 ? p.stride(0) : 0, p.stride(-2), p.stride(-1)};
  const int64_t d_strides[2] = {dist.stride(0), dist.stride(1)};
  const int64_t i_strides[2] = {index.stride(0), index.stride(1)};
  const at::Tensor inv_p = inverse_norms(p, eps);
  const cudaError_t err = cuda::launch_route_nearest(
      element_type(x), x.data_ptr(), x_strides, p.data_ptr(), p_strides, inv_p.data_ptr<float>(),
      dist.data_ptr<float>(), d_strides,
      index.data_ptr<int64_t>(), i_strides, x.size(0), x.size(1), p.size(-2), x.size(2), per_location, float(eps),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "route_nearest: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) { m.impl("route_nearest", &route_nearest_cuda); }

}  // namespace fastproto
