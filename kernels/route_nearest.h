// Nearest-prototype routing, the per-token math shared by the CPU kernel (csrc/route.cpp, one token per
// iteration) and the CUDA kernel (kernels/route.cu, one warp per token, lanes splitting the channels).
//
// Math (fastproto/reference/prototype.py): for a token x and its bank p_1 .. p_M,
//   d_m = 1 - x·p_m / (max(||x||, eps) max(||p_m||, eps)),   dist = min_m d_m,   index = argmin_m d_m
// with ties going to the lowest index and NaN winning (the first NaN), as torch.min.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPROTO_HD __host__ __device__ __forceinline__
#else
#define FASTPROTO_HD inline
#endif

namespace fastproto {
namespace route {

// Where a token's bank starts: shared [M,C] banks have bank_stride 0; per-sample [B,M,C] banks are indexed
// by the token's sample, per-location [N,M,C] banks by its location.
FASTPROTO_HD int64_t bank_offset(int64_t b, int64_t n, bool per_location, int64_t bank_stride) {
  return (per_location ? n : b) * bank_stride;
}

// The cosine distance from the token's squared norm xx, the prototype's pp and their dot product.
FASTPROTO_HD float cosine_distance(float dot, float xx, float pp, float eps) {
  return 1.f - dot / (fmaxf(sqrtf(xx), eps) * fmaxf(sqrtf(pp), eps));
}

// Running argmin over m = 0, 1, ...: strict comparison keeps the lowest index on ties; a NaN is taken
// once and never replaced.
FASTPROTO_HD void take_nearest(float& best, int64_t& best_m, float d, int64_t m) {
  if (m == 0 || (best == best && (d != d || d < best))) {
    best = d;
    best_m = m;
  }
}

}  // namespace route
}  // namespace fastproto
