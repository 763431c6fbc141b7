// Linear attention forward (inference), the per-query routine shared by the CPU kernel
// (csrc/linear_attention.cpp, one thread per query) and the CUDA kernel (kernels/linear_attention.cu, one warp
// per query, lanes splitting the value dims).
//
// Math (fastproto/reference/linear_attention.py), given the float32 kv state S [D][Dv] = sum_j phi(k_j)^T v_j
// and key sum z [D] = sum_j phi(k_j) of the query's (batch, head):
//   out_e = sum_d phi(q_d) S[d][e] / (sum_d phi(q_d) z_d + eps),   phi = elu + 1 or relu.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fastproto {
namespace linattn {

enum Phi : int { kElu = 0, kRelu = 1 };

// phi(x): elu(x) + 1 = (x > 0 ? x + 1 : exp(x)), or relu(x); NaN stays NaN.
FASTPROTO_HD float phi(float x, int kind) {
  if (kind == kElu) return x > 0.f ? x + 1.f : (x == x ? expf(x) : x);
  return (x > 0.f || x != x) ? x : 0.f;
}

// One query's output, by `lanes` threads: thread `lane` holds phi(q_d) for d = lane, lane + lanes, ... and
// `bcast(v, l)` hands thread l's value to every thread (identity for one thread); `sum` turns a partial sum
// into the group's sum. Each thread writes the outputs e = lane, lane + lanes, ...; every thread makes the
// same bcast / sum calls (the loops' trip counts do not depend on the lane).
FASTPROTO_HD_TEMPLATE
template <typename T, typename Load, typename Store, typename Sum, typename Bcast>
FASTPROTO_HD void attend(const T* q, int64_t q_sd, const float* S, const float* z, T* out, int64_t o_sd, int64_t D,
                         int64_t Dv, int kind, float eps, int lane, int lanes, const Load& load, const Store& store,
                         const Sum& sum, const Bcast& bcast) {
  float den = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += lanes) {
    const int64_t d = d0 + lane;
    if (d < D) den += phi(load(q[d * q_sd]), kind) * z[d];
  }
  const float inv_den = 1.f / (sum(den) + eps);  // one reciprocal per query, as the reference
  for (int64_t e0 = 0; e0 < Dv; e0 += lanes) {
    const int64_t e = e0 + lane;
    float num = 0.f;
    for (int64_t d0 = 0; d0 < D; d0 += lanes) {
      const int64_t mine = d0 + lane;
      const float fq = mine < D ? phi(load(q[mine * q_sd]), kind) : 0.f;
      for (int l = 0; l < lanes && d0 + l < D; ++l) {
        const float qd = bcast(fq, l);
        if (e < Dv) num += qd * S[(d0 + l) * Dv + e];
      }
    }
    if (e < Dv) store(out[e * o_sd], num * inv_den);
  }
}

}  // namespace linattn
}  // namespace fastproto
