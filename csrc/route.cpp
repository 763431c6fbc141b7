// Nearest-prototype routing, CPU kernel (the per-token math is kernels/route_nearest.h, shared with the
// CUDA kernel). float32 / float16 / bfloat16 tokens and banks, float32 arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_element_type.h"
#include "inverse_norms.h"
#include "route.h"
#include "route_nearest.h"

namespace fastproto {
namespace {

template <typename T>
void nearest_batch(const at::Tensor& x, const at::Tensor& p, bool per_location, double eps, at::Tensor& dist,
                   at::Tensor& index) {
  const int64_t N = x.size(1), C = x.size(2), M = p.size(-2);
  const int64_t p_bank = p.dim() == 3 ? p.stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  const T* pp = p.data_ptr<T>();
  const at::Tensor inv_p = inverse_norms(p, eps);
  const float* np = inv_p.data_ptr<float>();
  const int64_t n_bank = p.dim() == 3 ? M : 0;
  float* dp = dist.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  at::parallel_for(0, x.size(0) * N, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / N, n = t % N;
      float best;
      int64_t best_m;
      route::nearest_token(xp + b * x.stride(0) + n * x.stride(1), x.stride(2),
                           pp + route::bank_offset(b, n, per_location, p_bank), p.stride(-2), p.stride(-1),
                           np + route::bank_offset(b, n, per_location, n_bank), M, C, 0, 1, float(eps), CastToFloat{},
                           OneThreadSum{}, best, best_m);
      dp[b * dist.stride(0) + n * dist.stride(1)] = best;
      ip[b * index.stride(0) + n * index.stride(1)] = best_m;
    }
  });
}

void route_nearest_cpu(const at::Tensor& x, const at::Tensor& p, bool per_location, double eps, at::Tensor dist,
                       at::Tensor index) {
  check_route_nearest(x, p, per_location, eps, dist, index, at::kCPU);
  with_cpu_element_type(x.scalar_type(),
                        [&](auto tag) { nearest_batch<decltype(tag)>(x, p, per_location, eps, dist, index); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) { m.impl("route_nearest", &route_nearest_cpu); }

}  // namespace fastproto
