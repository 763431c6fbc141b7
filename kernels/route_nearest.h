// Nearest-prototype routing, the per-token routine shared by the CPU kernel (csrc/route.cpp, one thread per
// token) and the CUDA kernel (kernels/route.cu, one warp per token, lanes splitting the channels).
//
// Math (fastproto/reference/prototype.py): for a token x and its bank p_1 .. p_M,
//   d_m = 1 - x·p_m / (max(||x||, eps) max(||p_m||, eps)),   dist = min_m d_m,   index = argmin_m d_m
// with ties going to the lowest index and NaN winning (the first NaN), as torch.min.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"


namespace fastproto {
namespace route {

// Where a token's bank starts: shared [M,C] banks have bank_stride 0; per-sample [B,M,C] banks are indexed
// by the token's sample, per-location [N,M,C] banks by its location.
FASTPROTO_HD int64_t bank_offset(int64_t b, int64_t n, bool per_location, int64_t bank_stride) {
  return (per_location ? n : b) * bank_stride;
}


// Running argmin over m = 0, 1, ...: strict comparison keeps the lowest index on ties; a NaN is taken
// once and never replaced.
FASTPROTO_HD void take_nearest(float& best, int64_t& best_m, float d, int64_t m) {
  if (m == 0 || (best == best && (d != d || d < best))) {
    best = d;
    best_m = m;
  }
}

// The nearest prototype of one token, computed by `lanes` threads that each take the channels lane,
// lane + lanes, ... of the token row xr and of the prototype rows bank + m * p_sm; `inv_p` holds the bank's
// 1 / max(||p_m||, eps), computed once per bank rather than once per token; `sum` turns a thread's partial
// sum into the sum over the threads (the identity for one thread), `load` reads an element as float.
// Writes (best, best_m): the minimum distance and its index (valid in every thread of the group).
FASTPROTO_HD_TEMPLATE
template <typename T, typename Load, typename Sum>
FASTPROTO_HD void nearest_token(const T* xr, int64_t x_sc, const T* bank, int64_t p_sm, int64_t p_sc,
                                const float* inv_p, int64_t M, int64_t C, int lane, int lanes, float eps,
                                const Load& load, const Sum& sum, float& best, int64_t& best_m) {
  float xx = 0.f;
  for (int64_t c = lane; c < C; c += lanes) {
    const float v = load(xr[c * x_sc]);
    xx += v * v;
  }
  const float inv_x = 1.f / fmaxf(sqrtf(sum(xx)), eps);
  best = 0.f;
  best_m = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T* pr = bank + m * p_sm;
    float dot = 0.f;
    for (int64_t c = lane; c < C; c += lanes) dot += load(xr[c * x_sc]) * load(pr[c * p_sc]);
    take_nearest(best, best_m, 1.f - sum(dot) * inv_x * inv_p[m], m);
  }
}

}  // namespace route
}  // namespace fastproto
