// Prototype attention, the per-query forward and backward routines shared by the CPU kernels
// (csrc/prototype.cpp, one thread per query) and the CUDA kernels (kernels/prototype.cu, one warp per query,
// lanes splitting the head dims).
//
// Math (fastproto/reference/prototype.py), for a query q [D] of head h against prototypes k_m [D], v_m [Dv]:
//   relu_cos:    x_m = q̂·k̂_m (x̂ = x / max(||x||, eps)),  a_m = ReLU(s_h x_m),   out = sum_m a_m v_m
//   softmax:     x_m = q·k_m,                          a = softmax_m(s_h x),   out = sum_m a_m v_m
// and route's soft and linear modes (k = v = the prototypes, one head; the weights a may be written out):
//   cos_softmax: x_m = q̂·k̂_m,                          a = softmax_m(s_h x),   s_h = 1 / tau
//   linear:      x_m = q·k_m,                          a_m = s_h x_m,          s_h = 1
// Backward, with g = d(out) and g_m = g·v_m (+ d(a_m) when the weights were an output: the gradient of a_m):
//   dz_m = g_m [s_h x_m > 0] (relu_cos; 0 at NaN, as torch.relu's backward), a_m (g_m - sum_j a_j g_j)
//   (softmax kinds) or g_m (linear),
//   d(s_h) += sum_m dz_m x_m (softmax: centred, see attend_backward),   dv_m += a_m g,
//   normalised kinds (relu_cos, cos_softmax): d(q̂) = s_h sum_m dz_m k̂_m, d(k̂_m) += s_h dz_m q̂ (the caller
//             finishes k's normalisation on the small [M, D] side), dq = (d(q̂) - q̂ (q̂·d(q̂))) / ||q|| if
//             ||q|| > eps else d(q̂) / eps, where q̂·d(q̂) = s_h sum_m dz_m x_m needs no second pass over q;
//   softmax, linear:  dq = s_h sum_m dz_m k_m,  dk_m += s_h dz_m q.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "host_device.h"


namespace fastproto {
namespace proto {

constexpr int kMaxM = 64;  // must equal fastproto.ops.prototype._MAX_M
enum Kind : int { kReluCos = 0, kSoftmax = 1, kCosSoftmax = 2, kLinear = 3 };
FASTPROTO_HD bool normalised(int kind) { return kind == kReluCos || kind == kCosSoftmax; }

// The routines hold per-prototype values in arrays of MaxM floats. The forward takes MaxM a compile-time bucket
// of M and unrolls its loops over the prototypes (MaxM steps guarded by m < M), so on the GPU each element is a
// register (a run-time index puts the array in local memory). The backward keeps run-time loops over kMaxM
// arrays: its loops hold inner loops and adds, and unrolled they spill (seen in ptxas' report: 255 registers
// and spills from M = 16, 3 minutes of nvcc). f(std::integral_constant<int, MaxM>) for the smallest bucket
// holding M. Host code.
template <typename F>
inline void with_max_m(int M, F&& f) {
  if (M <= 8) return f(std::integral_constant<int, 8>{});
  if (M <= 16) return f(std::integral_constant<int, 16>{});
  if (M <= 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, kMaxM>{});
}

// A loop over the prototypes m < M: with Unroll, MaxM guarded steps that the compiler unrolls.
#define FASTPROTO_FOR_M(m) FASTPROTO_UNROLL for (int m = 0; m < (Unroll ? MaxM : M); ++m) if (!Unroll || m < M)

// Strided rows of one query's operands (element strides).
template <typename T>
struct Rows {
  const T* q;
  int64_t q_sd;
  const T* k;
  int64_t k_sm, k_sd;
  const T* v;
  int64_t v_sm, v_sd;
  T* out;
  int64_t o_sd;
  const float* inv_k;  // normalised kinds: the head's 1 / max(||k_m||, eps), computed once per bank (M floats)
  T* attn;             // the weights a [M] (forward: written when not null; backward: their gradient, read)
  int64_t a_sm;
};

// The scores x_m of one query (see the top), `inv_q` = 1 / max(||q||, eps) (normalised kinds) or 1.
FASTPROTO_HD_TEMPLATE
template <int MaxM, bool Unroll, typename T, typename Load, typename Sum>
FASTPROTO_HD void scores(const Rows<T>& r, int M, int64_t D, int kind, float eps, int lane, int lanes,
                         const Load& load, const Sum& sum, float* x, float& inv_q, float& q_norm) {
  inv_q = 1.f;
  q_norm = 0.f;
  if (normalised(kind)) {
    float qq = 0.f;
    for (int64_t d = lane; d < D; d += lanes) {
      const float v = load(r.q[d * r.q_sd]);
      qq += v * v;
    }
    q_norm = sqrtf(sum(qq));
    inv_q = 1.f / fmaxf(q_norm, eps);
  }
  FASTPROTO_FOR_M(m) {
    const T* km = r.k + m * r.k_sm;
    float dot = 0.f;
    for (int64_t d = lane; d < D; d += lanes) dot += load(r.q[d * r.q_sd]) * load(km[d * r.k_sd]);
    dot = sum(dot);
    x[m] = normalised(kind) ? dot * inv_q * r.inv_k[m] : dot;
  }
}

// The attention weights a_m from the scores, in place.
template <int MaxM, bool Unroll>
FASTPROTO_HD void weights(int M, int kind, float scale, float* a) {
  if (kind == kReluCos) {
    FASTPROTO_FOR_M(m) {
      const float c = scale * a[m];
      a[m] = (c > 0.f || c != c) ? c : 0.f;  // ReLU that keeps NaN, as torch.relu
    }
    return;
  }
  if (kind == kLinear) {
    FASTPROTO_FOR_M(m) a[m] *= scale;
    return;
  }
  float top = -INFINITY;
  FASTPROTO_FOR_M(m) {
    a[m] *= scale;
    top = fmaxf(top, a[m]);
  }
  float total = 0.f;
  FASTPROTO_FOR_M(m) {
    a[m] = expf(a[m] - top);
    total += a[m];
  }
  const float norm = 1.f / total;
  FASTPROTO_FOR_M(m) a[m] *= norm;
}

// One query's output, by `lanes` threads that take the dims lane, lane + lanes, ...; `sum` turns a thread's
// partial sum into the group's sum (identity for one thread), `load` / `store` convert to and from float.
FASTPROTO_HD_TEMPLATE
template <int MaxM, typename T, typename Load, typename Store, typename Sum>
FASTPROTO_HD void attend(const Rows<T>& r, int M, int64_t D, int64_t Dv, int kind, float scale, float eps, int lane,
                         int lanes, const Load& load, const Store& store, const Sum& sum) {
  constexpr bool Unroll = true;
  float a[MaxM];
  float inv_q, q_norm;
  scores<MaxM, Unroll>(r, M, D, kind, eps, lane, lanes, load, sum, a, inv_q, q_norm);
  weights<MaxM, Unroll>(M, kind, scale, a);
  if (r.attn) {
    FASTPROTO_FOR_M(m) if (m % lanes == lane) store(r.attn[m * r.a_sm], a[m]);
  }
  for (int64_t e = lane; e < Dv; e += lanes) {
    float o = 0.f;
    FASTPROTO_FOR_M(m) o += a[m] * load(r.v[m * r.v_sm + e * r.v_sd]);
    store(r.out[e * r.o_sd], o);
  }
}

// One query's backward (see the top): writes dq [D] (stride dq_sd) from g [Dv] (stride g_sd) and the weights'
// gradient r.attn (when not null), adds its shares of d(k̂) (normalised kinds) or dk into dk [M, D] and of dv
// into dv [M, Dv] (float32, contiguous) through `add(float* dst, float v)`, and returns its share of d(s_h)
// (the same in every thread of the group).
FASTPROTO_HD_TEMPLATE
template <typename T, typename Load, typename Store, typename Sum, typename Add>
FASTPROTO_HD float attend_backward(const Rows<T>& r, const T* g, int64_t g_sd, T* dq, int64_t dq_sd, int M, int64_t D,
                                   int64_t Dv, int kind, float scale, float eps, int lane, int lanes,
                                   const Load& load, const Store& store, const Sum& sum, const Add& add, float* dk,
                                   float* dv) {
  float x[kMaxM], a[kMaxM];
  float inv_q, q_norm;
  scores<kMaxM, false>(r, M, D, kind, eps, lane, lanes, load, sum, x, inv_q, q_norm);
  for (int m = 0; m < M; ++m) a[m] = x[m];
  weights<kMaxM, false>(M, kind, scale, a);
  // softmax kinds: d(s_h)'s share sum_m dz_m x_m is taken centred, as sum_m a_m g_m (x_m - x̄) with
  // x̄ = sum_m a_m x_m (the same value, as sum_m dz_m = 0), which cancels far less in float32
  const bool softmax = kind == kSoftmax || kind == kCosSoftmax;
  float xbar = 0.f;
  if (softmax)
    for (int m = 0; m < M; ++m) xbar += a[m] * x[m];
  // g_m = g·v_m, then x_m is replaced by dz_m (relu_cos, linear) or g_m (softmax kinds) once its share of
  // d(s_h) is taken
  float dscale = 0.f, ag = 0.f;
  for (int m = 0; m < M; ++m) {
    float gm = 0.f;
    for (int64_t e = lane; e < Dv; e += lanes) gm += load(g[e * g_sd]) * load(r.v[m * r.v_sm + e * r.v_sd]);
    gm = sum(gm);
    if (r.attn) gm += load(r.attn[m * r.a_sm]);
    if (softmax) {
      ag += a[m] * gm;
      dscale += a[m] * gm * (x[m] - xbar);
      x[m] = gm;
    } else {
      const float dz = kind == kLinear || scale * x[m] > 0.f ? gm : 0.f;
      dscale += dz * x[m];  // NaN scores make NaN here, as in the reference
      x[m] = dz;
    }
  }
  if (softmax)
    for (int m = 0; m < M; ++m) x[m] = a[m] * (x[m] - ag);
  // dq and the keys' shares: acc_d = sum_m dz_m k'_md with k' = k̂ (normalised kinds) or k
  const float qdq = scale * dscale;  // normalised kinds: q̂·d(q̂)
  for (int64_t d = lane; d < D; d += lanes) {
    const float qd = load(r.q[d * r.q_sd]);
    const float qk = normalised(kind) ? qd * inv_q : qd;  // q̂_d or q_d
    float acc = 0.f;
    for (int m = 0; m < M; ++m) {
      float km = load(r.k[m * r.k_sm + d * r.k_sd]);
      if (normalised(kind)) km *= r.inv_k[m];
      acc += x[m] * km;
      add(dk + m * D + d, scale * x[m] * qk);
    }
    float dqd = scale * acc;
    if (normalised(kind))
      dqd = !(q_norm <= eps) ? (dqd - qk * qdq) * inv_q : dqd / eps;  // a NaN norm gives NaN, as the reference
    store(dq[d * dq_sd], dqd);
  }
  for (int64_t e = lane; e < Dv; e += lanes) {
    const float ge = load(g[e * g_sd]);
    for (int m = 0; m < M; ++m) add(dv + m * Dv + e, a[m] * ge);
  }
  return dscale;
}

}  // namespace proto
}  // namespace fastproto
