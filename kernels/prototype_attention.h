// Prototype attention forward (inference), the per-query routine shared by the CPU kernel
// (csrc/prototype.cpp, one thread per query) and the CUDA kernel (kernels/prototype.cu, one warp per query,
// lanes splitting the head dims).
//
// Math (fastproto/reference/prototype.py), for a query q [D] of head h against prototypes k_m [D], v_m [Dv]:
//   relu_cos: a_m = ReLU(s_h q·k_m / (max(||q||, eps) max(||k_m||, eps))),   out = sum_m a_m v_m
//   softmax:  a = softmax_m(s_h q·k_m),                                       out = sum_m a_m v_m
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"


namespace fastproto {
namespace proto {

constexpr int kMaxM = 64;  // must equal fastproto.ops.prototype._MAX_M
enum Kind : int { kReluCos = 0, kSoftmax = 1 };

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
  const float* inv_k;  // relu_cos: the head's 1 / max(||k_m||, eps), computed once per bank (M floats)
};

// One query's output, by `lanes` threads that take the dims lane, lane + lanes, ...; `sum` turns a thread's
// partial sum into the group's sum (identity for one thread), `load` / `store` convert to and from float.
FASTPROTO_HD_TEMPLATE
template <typename T, typename Load, typename Store, typename Sum>
FASTPROTO_HD void attend(const Rows<T>& r, int M, int64_t D, int64_t Dv, int kind, float scale, float eps, int lane,
                         int lanes, const Load& load, const Store& store, const Sum& sum) {
  float a[kMaxM];
  float inv_q = 1.f;
  if (kind == kReluCos) {
    float qq = 0.f;
    for (int64_t d = lane; d < D; d += lanes) {
      const float x = load(r.q[d * r.q_sd]);
      qq += x * x;
    }
    inv_q = 1.f / fmaxf(sqrtf(sum(qq)), eps);
  }
  float top = -INFINITY;
  for (int m = 0; m < M; ++m) {
    const T* km = r.k + m * r.k_sm;
    float dot = 0.f;
    for (int64_t d = lane; d < D; d += lanes) dot += load(r.q[d * r.q_sd]) * load(km[d * r.k_sd]);
    dot = sum(dot);
    if (kind == kReluCos) {
      const float c = scale * dot * inv_q * r.inv_k[m];
      a[m] = (c > 0.f || c != c) ? c : 0.f;  // ReLU that keeps NaN, as torch.relu
    } else {
      a[m] = scale * dot;
      top = fmaxf(top, a[m]);
    }
  }
  float norm = 1.f;
  if (kind == kSoftmax) {
    float total = 0.f;
    for (int m = 0; m < M; ++m) {
      a[m] = expf(a[m] - top);
      total += a[m];
    }
    norm = 1.f / total;
  }
  for (int64_t e = lane; e < Dv; e += lanes) {
    float o = 0.f;
    for (int m = 0; m < M; ++m) o += a[m] * load(r.v[m * r.v_sm + e * r.v_sd]);
    store(r.out[e * r.o_sd], o * norm);
  }
}

}  // namespace proto
}  // namespace fastproto
