// Linear attention, the per-row routines shared by the CPU kernels (csrc/linear_attention.cpp, one thread per
// row) and the CUDA kernels (kernels/linear_attention.cu, one warp per row, lanes splitting the head or value
// dims).
//
// Math (fastproto/reference/linear_attention.py), given the float32 kv state S [D][Dv] = sum_j phi(k_j)^T v_j
// and key sum z [D] = sum_j phi(k_j) of the row's (batch, head):
//   out_e = r sum_d f_d S[d][e],   f = phi(q),   r = 1 / (f·z + eps),   phi = elu + 1 or relu.
// Backward, for g = d(out) of a query (u = S g, and w = out·g = r f·u):
//   d(f)_d = r (u_d - w z_d),   dq = phi'(q) d(f);   and over the queries (by matrix products, in the host
//   code): dS = sum_i a_i^T g_i, dz = -sum_i w_i a_i with a_i = r_i f_i. Then for a key k_j with value v_j:
//   dk = phi'(k) (dS v_j + dz),   dv_j = phi(k_j) dS.
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

// dy·phi'(x), as torch's elu / relu backward: at x <= 0 elu+1 gives dy exp(x) and relu 0; elsewhere (NaN
// included) dy.
FASTPROTO_HD float phi_backward(float x, float dy, int kind) {
  if (!(x <= 0.f)) return dy;
  return kind == kElu ? dy * expf(x) : 0.f;
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

// One query's backward, by `lanes` threads: u_d = sum_e S[d][e] g_e is a group sum over the value dims (lanes
// read a row of S together, as the forward), kept by the thread of d (d % lanes == lane), which then writes dq_d
// and a_d. Writes dq and a = r phi(q) (float32 [D], contiguous; it holds u until the second pass) and returns
// w = out·g (the same in every thread).
FASTPROTO_HD_TEMPLATE
template <typename T, typename Load, typename Store, typename Sum>
FASTPROTO_HD float query_backward(const T* q, int64_t q_sd, const T* g, int64_t g_sd, const float* S, const float* z,
                                  T* dq, int64_t dq_sd, float* a, int64_t D, int64_t Dv, int kind, float eps, int lane,
                                  int lanes, const Load& load, const Store& store, const Sum& sum) {
  float den = 0.f, fu = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    float part = 0.f;
    for (int64_t e = lane; e < Dv; e += lanes) part += S[d * Dv + e] * load(g[e * g_sd]);
    const float u = sum(part);
    if (d % lanes == lane) {
      const float f = phi(load(q[d * q_sd]), kind);
      a[d] = u;
      den += f * z[d];
      fu += f * u;
    }
  }
  const float r = 1.f / (sum(den) + eps);
  const float w = r * sum(fu);
  for (int64_t d = lane; d < D; d += lanes) {
    const float x = load(q[d * q_sd]);
    store(dq[d * dq_sd], phi_backward(x, r * (a[d] - w * z[d]), kind));
    a[d] = r * phi(x, kind);
  }
  return w;
}

// One key's backward, by `lanes` threads: dk = phi'(k) (dS v + dz), with (dS v)_d a group sum over the value
// dims kept by the thread of d, and dv = phi(k) dS over e = lane, lane + lanes, ... (dS [D][Dv], dz [D]
// float32). Lanes read rows of dS together.
FASTPROTO_HD_TEMPLATE
template <typename T, typename Load, typename Store, typename Sum>
FASTPROTO_HD void key_backward(const T* k, int64_t k_sd, const T* v, int64_t v_sd, const float* dS, const float* dz,
                               T* dk, int64_t dk_sd, T* dv, int64_t dv_sd, int64_t D, int64_t Dv, int kind, int lane,
                               int lanes, const Load& load, const Store& store, const Sum& sum) {
  for (int64_t d = 0; d < D; ++d) {
    float part = 0.f;
    for (int64_t e = lane; e < Dv; e += lanes) part += dS[d * Dv + e] * load(v[e * v_sd]);
    const float acc = sum(part) + dz[d];
    if (d % lanes == lane) store(dk[d * dk_sd], phi_backward(load(k[d * k_sd]), acc, kind));
  }
  for (int64_t e = lane; e < Dv; e += lanes) {
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += phi(load(k[d * k_sd]), kind) * dS[d * Dv + e];
    store(dv[e * dv_sd], acc);
  }
}

}  // namespace linattn
}  // namespace fastproto
