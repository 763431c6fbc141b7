// Log-domain Sinkhorn for one problem, written once for the CPU kernel (csrc/sinkhorn.cpp, one thread
// per problem) and the CUDA kernel (kernels/sinkhorn.cu, one thread block per problem).
//
// Math and iteration schedule: fastproto/reference/sinkhorn.py. Per iteration one sweep over the cost
// rows gives the f-update, the row-marginal error of the current plan and the column sums of the next
// g-update (one exponential per cost entry: exp((f_i - C_ik)/eps) = p_ik (a_i / r_i) exp(-g_k/eps) with
// p_ik = exp(x_ik - max_k x_ik), x_ik = (g_k - C_ik)/eps, r_i = sum_k p_ik). A column whose sum
// underflows (or is NaN) is recomputed by an exact online log-sum-exp pass. The same scheme as the
// Triton kernel (fastproto/triton/sinkhorn.py).
//
// A Team is the set of threads solving one problem; each owns the rows rank, rank + size, ... (so the f
// workspace is private to its owner: no barrier around it). Its reductions leave the same bits in every
// thread, so every thread takes the same branches, and every thread writes the same g values:
//   int rank() const; int size() const;
//   float* columns();        // kMaxK floats seen by the whole team: the g potential
//   void sync();             // barrier
//   template <int KB> void sum(float (&v)[KB], int K);             // v[k] <- team sum, k < K
//   float max(float x);                                           // team max (no NaN inputs)
//   double sum(double x);                                         // team sum
//   template <int KB> void merge_lse(float (&m)[KB], float (&s)[KB], int K);
//       // running (max, sum of exp(y - max)) pairs <- their combination over the team
// An Io reads the cost and writes the plan in the tensors' dtype:
//   float cost(int64_t i, int k) const; void plan(int64_t i, int k, float t) const;
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "host_device.h"


namespace fastproto {
namespace sinkhorn {

constexpr int kMaxK = 64;  // must equal fastproto.ops.sinkhorn.MAX_K

// Calls f(std::integral_constant<int, KB>) with the smallest register-array width KB that holds K
// columns (1 <= K <= kMaxK): the kernels are instantiated per width. Host code.
template <typename F>
inline void with_width(int K, F&& f) {
  if (K <= 2) f(std::integral_constant<int, 2>{});
  else if (K <= 8) f(std::integral_constant<int, 8>{});
  else if (K <= 16) f(std::integral_constant<int, 16>{});
  else if (K <= 32) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, 64>{});
}

// One problem's inputs and outputs (float32 marginals, workspace and results).
struct Problem {
  const float* log_a;  // [N]
  const float* log_b;  // [K]
  float* f;            // workspace [2][N], zero on entry: ping-pong buffers of the f potential
  float* loss;         // [1]
  int32_t* iters;      // [1]: g-updates made, as the reference counts them
  int64_t N;
  int K;
  float eps, tol;
  int64_t n_iters;
};

// Team-wide running log-sum-exp pair update with the value y (no-op for y = -inf).
FASTPROTO_HD void lse_push(float& m, float& s, float y) {
  if (y == -INFINITY) return;
  const float m_new = fmaxf(m, y);
  s = (m == -INFINITY ? 0.f : s * expf(m - m_new)) + expf(y - m_new);
  m = m_new;
}

// Combination of two running log-sum-exp pairs (m, s) <- (m, s) + (m2, s2).
FASTPROTO_HD void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float m_new = fmaxf(m, m2);
  s = s * expf(m - m_new) + s2 * expf(m2 - m_new);
  m = m_new;
}

// One sweep over this thread's rows: the f-update from g (read f_old, write f_new), the largest
// row-marginal error of the plan (f_old, g) (NaN counts as infinite: not converged) and the thread's
// share of the column sums sum_i p_ik a_i / r_i (into acc).
FASTPROTO_HD_TEMPLATE
template <int KB, typename Team, typename Io>
FASTPROTO_HD float sweep_rows(const Team& team, const Io& io, const Problem& pb, const float* g,
                              const float* f_old, float* f_new, float inv_eps, float (&acc)[KB]) {
  float err = 0.f;
FASTPROTO_UNROLL
  for (int k = 0; k < KB; ++k) acc[k] = 0.f;
  for (int64_t i = team.rank(); i < pb.N; i += team.size()) {
    float p[KB];
    float mx = -INFINITY;
FASTPROTO_UNROLL
    for (int k = 0; k < KB; ++k) {
      if (k < pb.K) {
        p[k] = (g[k] - io.cost(i, k)) * inv_eps;
        mx = fmaxf(mx, p[k]);
      }
    }
    float r = 0.f;
FASTPROTO_UNROLL
    for (int k = 0; k < KB; ++k) {
      if (k < pb.K) {
        p[k] = expf(p[k] - mx);
        r += p[k];
      }
    }
    const float la = pb.log_a[i];
    const float a = expf(la);
    const float fn = pb.eps * (la - mx - logf(r));
    float e = a * fabsf(expf((f_old[i] - fn) * inv_eps) - 1.f);
    e = e < INFINITY ? e : INFINITY;  // NaN -> not converged
    err = fmaxf(err, e);
    f_new[i] = fn;
    const float w = a / r;
FASTPROTO_UNROLL
    for (int k = 0; k < KB; ++k)
      if (k < pb.K) acc[k] += p[k] * w;
  }
  return err;
}

// g-update from the new f (already in f_new) and the sweep's column sums: g_new into acc.
FASTPROTO_HD_TEMPLATE
template <int KB, typename Team, typename Io>
FASTPROTO_HD void update_columns(Team& team, const Io& io, const Problem& pb, const float* g,
                                 const float* f_new, float inv_eps, float (&acc)[KB]) {
  team.template sum<KB>(acc, pb.K);
  bool exact = false;
FASTPROTO_UNROLL
  for (int k = 0; k < KB; ++k)
    if (k < pb.K && !(acc[k] > 1e-30f)) exact = true;  // underflow or NaN
  if (exact) {
    float m[KB];
FASTPROTO_UNROLL
    for (int k = 0; k < KB; ++k) {
      m[k] = -INFINITY;
      acc[k] = 0.f;
    }
    for (int64_t i = team.rank(); i < pb.N; i += team.size()) {
      const float fi = f_new[i];
FASTPROTO_UNROLL
      for (int k = 0; k < KB; ++k)
        if (k < pb.K) lse_push(m[k], acc[k], (fi - io.cost(i, k)) * inv_eps);
    }
    team.template merge_lse<KB>(m, acc, pb.K);
FASTPROTO_UNROLL
    for (int k = 0; k < KB; ++k)
      if (k < pb.K) acc[k] = pb.eps * (pb.log_b[k] - (m[k] + logf(acc[k])));
  } else {
FASTPROTO_UNROLL
    for (int k = 0; k < KB; ++k)
      if (k < pb.K) acc[k] = pb.eps * (pb.log_b[k] - logf(acc[k])) + g[k];
  }
}

// g <- g_new, once every thread has read the old g.
FASTPROTO_HD_TEMPLATE
template <int KB, typename Team>
FASTPROTO_HD void set_columns(Team& team, float* g, const float (&g_new)[KB], int K) {
  team.sync();
FASTPROTO_UNROLL
  for (int k = 0; k < KB; ++k)
    if (k < K) g[k] = g_new[k];
}

// Solves one problem: writes the plan through io, and loss / iters (by team rank 0).
FASTPROTO_HD_TEMPLATE
template <int KB, typename Team, typename Io>
FASTPROTO_HD void solve(Team& team, const Io& io, const Problem& pb) {
  const float inv_eps = 1.f / pb.eps;
  float* const g = team.columns();
  float acc[KB];
FASTPROTO_UNROLL
  for (int k = 0; k < KB; ++k) g[k] = 0.f;
  float* const f0 = pb.f;
  float* const f1 = pb.f + pb.N;
  // iteration 1: f1 from g0 = 0 into buffer 0 (its error against buffer 1 means nothing), g1 from f1
  sweep_rows<KB>(team, io, pb, g, f1, f0, inv_eps, acc);
  update_columns<KB>(team, io, pb, g, f0, inv_eps, acc);
  set_columns<KB>(team, g, acc, pb.K);
  int cur = 0;
  int64_t it = 1;
  // each sweep: the error of the current plan (f[cur], g), and f_new, g_new for the next iteration,
  // accepted only if the error does not stop the problem
  float err = team.max(sweep_rows<KB>(team, io, pb, g, f0, f1, inv_eps, acc));
  while (it < pb.n_iters && err >= pb.tol) {
    float* const f_new = cur ? f0 : f1;
    update_columns<KB>(team, io, pb, g, f_new, inv_eps, acc);
    set_columns<KB>(team, g, acc, pb.K);
    cur = 1 - cur;
    ++it;
    err = team.max(sweep_rows<KB>(team, io, pb, g, f_new, cur ? f0 : f1, inv_eps, acc));
  }
  // plan T = exp((f + g - C)/eps) and loss sum T C + eps T log T
  double part = 0.0;
  for (int64_t i = team.rank(); i < pb.N; i += team.size()) {
    const float fi = (cur ? f1 : f0)[i];
    float row = 0.f;
FASTPROTO_UNROLL
    for (int k = 0; k < KB; ++k) {
      if (k < pb.K) {
        const float c = io.cost(i, k);
        const float log_t = (fi + g[k] - c) * inv_eps;
        const float t = expf(log_t);
        io.plan(i, k, t);
        row += t * c + pb.eps * (t * log_t);
      }
    }
    part += row;
  }
  part = team.sum(part);
  if (team.rank() == 0) {
    *pb.loss = static_cast<float>(part);
    *pb.iters = static_cast<int32_t>(it);
  }
}

// The team of one thread (the CPU kernel).
struct SerialTeam {
  float g[kMaxK];
  FASTPROTO_HD int rank() const { return 0; }
  FASTPROTO_HD int size() const { return 1; }
  FASTPROTO_HD float* columns() { return g; }
  FASTPROTO_HD void sync() {}
  template <int KB>
  FASTPROTO_HD void sum(float (&)[KB], int) {}
  FASTPROTO_HD float max(float x) { return x; }
  FASTPROTO_HD double sum(double x) { return x; }
  template <int KB>
  FASTPROTO_HD void merge_lse(float (&)[KB], float (&)[KB], int) {}
};

}  // namespace sinkhorn
}  // namespace fastproto
