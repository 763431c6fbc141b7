// Runs the host/device routines that the CUDA kernels execute with many threads per row (kernels/*.h) on the
// CPU with 32 emulated lanes (std::thread), and compares each result with the same routine run by one thread
// (the extension's CPU kernels, tested against float64 elsewhere). So the lane logic that only the GPU runs
// (lane-split loops, per-dim ownership, broadcasts, the Sinkhorn team's row split and shared g) is tested here.
//
// Every collective (warp sum, broadcast, team reduction) is an exchange in which all lanes must take part in the
// same order: a lane that skips one, or calls another kind, makes the run fail (as it would hang or be undefined
// on the GPU). The warp sum adds in the xor-butterfly order of kernels/warp.cuh's WarpSum.
//
// Usage: warp_emulation SEED. Prints one line per case, "name max_error", the error being
// max |lanes32 - lanes1| / max(1, max |lanes1|) (NaN where one side is NaN and the other is not); exits 3 on a
// collective mismatch.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "linear_attention_row.h"
#include "prototype_attention.h"
#include "route_nearest.h"
#include "sinkhorn_solver.h"

using namespace fastproto;

namespace {

constexpr int kLanes = 32;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "collective mismatch: %s\n", what.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

// kLanes threads running one body; exchange() is their only way to communicate.
class Warp {
 public:
  void run(const std::function<void(int)>& body) {
    calls_.assign(kLanes, 0);
    std::vector<std::thread> threads;
    for (int lane = 0; lane < kLanes; ++lane) threads.emplace_back(body, lane);
    for (auto& t : threads) t.join();
  }

  // Every lane posts v under `kind` and gets every lane's value once all have posted.
  std::vector<double> exchange(int lane, double v, int kind) {
    std::unique_lock<std::mutex> lock(mu_);
    const long tag = long(kind) * 1000000000L + calls_[lane]++;
    posted_[lane] = v;
    tags_[lane] = tag;
    const long generation = generation_;
    if (++arrived_ == kLanes) {
      arrived_ = 0;
      values_ = posted_;
      seen_ = tags_;
      ++generation_;
      cv_.notify_all();
    } else if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      fail("lane " + std::to_string(lane) + " waited 60 s: another lane skipped a collective");
    }
    for (int l = 0; l < kLanes; ++l)
      if (seen_[l] != tag)
        fail("lanes " + std::to_string(lane) + " and " + std::to_string(l) + " are at different collectives");
    return values_;
  }

  float sum(int lane, float v) {  // as WarpSum: v += shfl_xor(v, o) for o = 16, 8, 4, 2, 1
    for (int o = kLanes / 2; o > 0; o >>= 1) v = v + float(exchange(lane, v, 1)[lane ^ o]);
    return v;
  }
  float bcast(int lane, float v, int from) { return float(exchange(lane, v, 2)[from]); }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  long generation_ = 0;
  std::vector<long> calls_ = std::vector<long>(kLanes), tags_ = std::vector<long>(kLanes),
                    seen_ = std::vector<long>(kLanes);
  std::vector<double> posted_ = std::vector<double>(kLanes), values_ = std::vector<double>(kLanes);
};

struct LaneSum {
  Warp* warp;
  int lane;
  float operator()(float v) const { return warp->sum(lane, v); }
};
struct LaneBcast {
  Warp* warp;
  int lane;
  float operator()(float v, int from) const { return warp->bcast(lane, v, from); }
};
struct SerialAdd {
  void operator()(float* dst, float v) const { *dst += v; }
};
struct LockedAdd {  // the kernels' shared-memory atomicAdd
  std::mutex* mu;
  void operator()(float* dst, float v) const {
    std::lock_guard<std::mutex> lock(*mu);
    *dst += v;
  }
};

std::mt19937 rng;

std::vector<float> randn(size_t n, float shift = 0.f) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> out(n);
  for (auto& x : out) x = dist(rng) + shift;
  return out;
}
std::vector<float> nans(size_t n) { return std::vector<float>(n, NAN); }

// max |got - want| / max(1, max |want|), NaN when the NaN patterns differ.
double error(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0.0, scale = 1.0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) return NAN;
    if (std::isnan(want[i])) continue;
    diff = std::max(diff, std::fabs(double(got[i]) - want[i]));
    scale = std::max(scale, std::fabs(double(want[i])));
  }
  return diff / scale;
}

void report(const std::string& name, std::initializer_list<double> errors) {
  double worst = 0.0;
  for (double e : errors) worst = std::isnan(e) || std::isnan(worst) ? NAN : std::max(worst, e);
  std::printf("%s %.3e\n", name.c_str(), worst);
  std::fflush(stdout);
}

// ---- prototype attention: 3 queries of one head against M prototypes, D = 70, Dv = 40 (lanes wrap twice)
struct ProtoCase {
  int M, kind;
  int64_t D = 70, Dv = 40, Q = 3;
  std::vector<float> q, k, v, g, inv_k;
  ProtoCase(int M_, int kind_) : M(M_), kind(kind_) {
    q = randn(Q * D * 2);  // queries with element stride 2
    k = randn(M * D);
    v = randn(M * Dv);
    g = randn(Q * Dv);
    inv_k.resize(M);
    for (int m = 0; m < M; ++m) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += double(k[m * D + d]) * k[m * D + d];
      inv_k[m] = float(1.0 / std::max(std::sqrt(s), 1e-12));
    }
  }
  // attn: the weights [Q, M] (forward output or backward input), or null
  proto::Rows<float> rows(int64_t n, float* out, float* attn = nullptr) const {
    return {q.data() + n * D * 2, 2, k.data(), D, 1, v.data(), Dv, 1, out + n * Dv, 1,
            proto::normalised(kind) ? inv_k.data() : nullptr, attn ? attn + n * M : nullptr, 1};
  }
};

// relu_cos: INP-Former's learnt scale is O(1); softmax: the default D^-1/2 (logits of O(1), as in the models)
// (cos_softmax: route's 1 / tau; linear: 1)
float proto_scale(const ProtoCase& c) {
  switch (c.kind) {
    case proto::kReluCos:
      return 1.3f;
    case proto::kCosSoftmax:
      return 5.f;
    case proto::kLinear:
      return 1.f;
    default:
      return 1.f / std::sqrt(float(c.D));
  }
}

void proto_forward(int M, int kind) {
  ProtoCase c(M, kind);
  std::vector<float> one = nans(c.Q * c.Dv), many = nans(c.Q * c.Dv);
  // cos_softmax (route's soft mode) also writes the weights
  const bool weights = kind == proto::kCosSoftmax;
  std::vector<float> w_one = nans(c.Q * M), w_many = nans(c.Q * M);
  proto::with_max_m(M, [&](auto max_m) {
    for (int64_t n = 0; n < c.Q; ++n)
      proto::attend<max_m()>(c.rows(n, one.data(), weights ? w_one.data() : nullptr), M, c.D, c.Dv, kind, proto_scale(c), 1e-12f, 0, 1, CastToFloat{},
                             CastFromFloat{}, OneThreadSum{});
    Warp warp;
    warp.run([&](int lane) {
      for (int64_t n = 0; n < c.Q; ++n)
        proto::attend<max_m()>(c.rows(n, many.data(), weights ? w_many.data() : nullptr), M, c.D, c.Dv, kind, proto_scale(c), 1e-12f, lane, kLanes,
                               CastToFloat{}, CastFromFloat{}, LaneSum{&warp, lane});
    });
  });
  report("proto_forward kind=" + std::to_string(kind) + " M=" + std::to_string(M),
         {error(many, one), weights ? error(w_many, w_one) : 0.0});
}

void proto_backward(int M, int kind) {
  ProtoCase c(M, kind);
  struct Out {
    std::vector<float> dq, dk, dv;
    std::vector<float> ds;
  };
  auto fresh = [&] { return Out{nans(c.Q * c.D), std::vector<float>(M * c.D), std::vector<float>(M * c.Dv), {0.f}}; };
  Out one = fresh(), many = fresh();
  std::vector<float> unused(c.Q * c.Dv);
  // cos_softmax (route's soft mode): the weights' gradient comes in too
  std::vector<float> dattn = randn(c.Q * M);
  float* const dw = kind == proto::kCosSoftmax ? dattn.data() : nullptr;
  for (int64_t n = 0; n < c.Q; ++n) {
    const auto r = c.rows(n, unused.data(), dw);
    one.ds[0] += proto::attend_backward(r, c.g.data() + n * c.Dv, 1, one.dq.data() + n * c.D, 1, M, c.D, c.Dv, kind,
                                        proto_scale(c), 1e-12f, 0, 1, CastToFloat{}, CastFromFloat{}, OneThreadSum{},
                                        SerialAdd{}, one.dk.data(), one.dv.data());
  }
  std::mutex mu;
  std::vector<float> ds_lanes(kLanes);
  Warp warp;
  warp.run([&](int lane) {
    for (int64_t n = 0; n < c.Q; ++n) {
      const auto r = c.rows(n, unused.data(), dw);
      ds_lanes[lane] += proto::attend_backward(r, c.g.data() + n * c.Dv, 1, many.dq.data() + n * c.D, 1, M, c.D,
                                               c.Dv, kind, proto_scale(c), 1e-12f, lane, kLanes, CastToFloat{}, CastFromFloat{},
                                               LaneSum{&warp, lane}, LockedAdd{&mu}, many.dk.data(), many.dv.data());
    }
  });
  // the share of d(scale) must be the same in every lane (the kernel adds lane 0's)
  double lanes_agree = 0.0;
  for (float s : ds_lanes) lanes_agree = std::max(lanes_agree, double(s != ds_lanes[0]));
  many.ds[0] = ds_lanes[0];
  const std::string name = "proto_backward kind=" + std::to_string(kind) + " M=" + std::to_string(M);
  report(name, {error(many.dq, one.dq), error(many.dk, one.dk), error(many.dv, one.dv), lanes_agree});
  // d(scale) sums Q x M terms that cancel (an O(1) result of larger terms), so another summation order moves it
  // more than the other outputs: reported apart, for its own bound
  report(name + " d_scale", {error(many.ds, one.ds)});
}

// ---- linear attention: one head, D = 70, Dv = 40; 3 rows
void linear_attention(int phi) {
  const int64_t D = 70, Dv = 40, Q = 3;
  std::vector<float> q = randn(Q * D), g = randn(Q * Dv), S = randn(D * Dv), z = randn(D), k = randn(Q * D),
                     v = randn(Q * Dv), dS = randn(D * Dv), dz = randn(D);
  for (auto& x : z) x = std::fabs(x) + 0.5f;  // a key sum of positive features: denominators away from 0
  const float eps = 1e-6f;
  struct Out {
    std::vector<float> out, dq, a, w, dk, dv;
  };
  auto fresh = [&] { return Out{nans(Q * Dv), nans(Q * D), nans(Q * D), nans(Q), nans(Q * D), nans(Q * Dv)}; };
  Out one = fresh(), many = fresh();
  auto rows = [&](Out& o, int lane, int lanes, auto sum, auto bcast) {
    for (int64_t n = 0; n < Q; ++n) {
      linattn::attend(q.data() + n * D, 1, S.data(), z.data(), o.out.data() + n * Dv, 1, D, Dv, phi, eps, lane, lanes,
                      CastToFloat{}, CastFromFloat{}, sum, bcast);
      const float w = linattn::query_backward(q.data() + n * D, 1, g.data() + n * Dv, 1, S.data(), z.data(),
                                              o.dq.data() + n * D, 1, o.a.data() + n * D, D, Dv, phi, eps, lane,
                                              lanes, CastToFloat{}, CastFromFloat{}, sum);
      if (lane == 0) o.w[n] = w;
      linattn::key_backward(k.data() + n * D, 1, v.data() + n * Dv, 1, dS.data(), dz.data(), o.dk.data() + n * D, 1,
                            o.dv.data() + n * Dv, 1, D, Dv, phi, lane, lanes, CastToFloat{}, CastFromFloat{}, sum);
    }
  };
  rows(one, 0, 1, OneThreadSum{}, OneThreadBcast{});
  Warp warp;
  warp.run([&](int lane) { rows(many, lane, kLanes, LaneSum{&warp, lane}, LaneBcast{&warp, lane}); });
  report("linear_attention phi=" + std::to_string(phi),
         {error(many.out, one.out), error(many.dq, one.dq), error(many.a, one.a), error(many.w, one.w),
          error(many.dk, one.dk), error(many.dv, one.dv)});
}

// ---- nearest routing: 3 tokens of C = 100 channels against M prototypes; the index must be the same
void route_nearest(int M) {
  const int64_t C = 100, T = 3;
  std::vector<float> x = randn(T * C), p = randn(M * C), inv_p(M);
  for (int m = 0; m < M; ++m) {
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += double(p[m * C + c]) * p[m * C + c];
    inv_p[m] = float(1.0 / std::max(std::sqrt(s), 1e-8));
  }
  std::vector<float> d_one(T), d_many(T);
  std::vector<int64_t> i_one(T), i_many(T);
  for (int64_t t = 0; t < T; ++t)
    route::nearest_token(x.data() + t * C, 1, p.data(), C, 1, inv_p.data(), M, C, 0, 1, 1e-8f, CastToFloat{},
                         OneThreadSum{}, d_one[t], i_one[t]);
  std::mutex mu;
  Warp warp;
  warp.run([&](int lane) {
    for (int64_t t = 0; t < T; ++t) {
      float best;
      int64_t best_m;
      route::nearest_token(x.data() + t * C, 1, p.data(), C, 1, inv_p.data(), M, C, lane, kLanes, 1e-8f,
                           CastToFloat{}, LaneSum{&warp, lane}, best, best_m);
      std::lock_guard<std::mutex> lock(mu);
      if (lane == 0) {
        d_many[t] = best;
        i_many[t] = best_m;
      }
    }
  });
  // the index may differ from the one-thread run only on a near-tie (the sums' order differs): the float64
  // distance of the one taken must be within 1e-5 of the least
  double excess = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> d64(M);
    double xx = 0.0;
    for (int64_t c = 0; c < C; ++c) xx += double(x[t * C + c]) * x[t * C + c];
    for (int m = 0; m < M; ++m) {
      double dot = 0.0, pp = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        dot += double(x[t * C + c]) * p[m * C + c];
        pp += double(p[m * C + c]) * p[m * C + c];
      }
      d64[m] = 1.0 - dot / (std::sqrt(xx) * std::sqrt(pp));
    }
    excess = std::max(excess, d64[i_many[t]] - *std::min_element(d64.begin(), d64.end()));
  }
  report("route_nearest M=" + std::to_string(M), {error(d_many, d_one), excess > 1e-5 ? 1.0 : 0.0});
}

// ---- Sinkhorn: one problem solved by a team of 32 threads (the CUDA block's row split and shared g; its
// reductions combine the lanes in lane order, the same bits for every lane as the block's) vs one thread
struct EmulatedTeam {
  Warp* warp;
  float* g;  // shared
  int lane;
  int rank() const { return lane; }
  int size() const { return kLanes; }
  float* columns() { return g; }
  void sync() { warp->exchange(lane, 0.0, 3); }
  template <int KB>
  void sum(float (&v)[KB], int K) {
    for (int k = 0; k < K; ++k) {
      const auto all = warp->exchange(lane, v[k], 4);
      float t = 0.f;
      for (double x : all) t += float(x);
      v[k] = t;
    }
  }
  float max(float x) {
    float t = -INFINITY;
    for (double y : warp->exchange(lane, x, 5)) t = fmaxf(t, float(y));
    return t;
  }
  double sum(double x) {
    double t = 0.0;
    for (double y : warp->exchange(lane, x, 6)) t += y;
    return t;
  }
  template <int KB>
  void merge_lse(float (&m)[KB], float (&s)[KB], int K) {
    for (int k = 0; k < K; ++k) {
      const auto ms = warp->exchange(lane, m[k], 7);
      const auto ss = warp->exchange(lane, s[k], 7);
      float mk = -INFINITY, sk = 0.f;
      for (int l = 0; l < kLanes; ++l) sinkhorn::lse_merge(mk, sk, float(ms[l]), float(ss[l]));
      m[k] = mk;
      s[k] = sk;
    }
  }
};

struct VecIo {
  const float* c;
  float* p;
  int K;
  float cost(int64_t i, int k) const { return c[i * K + k]; }
  void plan(int64_t i, int k, float t) const { p[i * K + k] = t; }
};

// far: column 0's costs raised by `far`, so its first column sum underflows and the exact pass runs
void sinkhorn_problem(int K, float far) {
  const int64_t N = 77;  // rows: 2 to 3 per lane
  std::vector<float> cost = randn(N * K), log_a(N, -std::log(float(N))), log_b(K, -std::log(float(K)));
  for (int64_t i = 0; i < N; ++i) cost[i * K] += far;
  struct Out {
    std::vector<float> plan, f, loss;
    int32_t iters = -1;
  };
  auto fresh = [&] { return Out{nans(N * K), std::vector<float>(2 * N), nans(1)}; };
  Out one = fresh(), many = fresh();
  auto problem = [&](Out& o) {
    return sinkhorn::Problem{log_a.data(), log_b.data(), o.f.data(), o.loss.data(), &o.iters, N, K, 0.05f, 0.f, 40};
  };
  sinkhorn::with_width(K, [&](auto kb) {
    sinkhorn::SerialTeam serial;
    sinkhorn::solve<kb()>(serial, VecIo{cost.data(), one.plan.data(), K}, problem(one));
    Warp warp;
    float g[sinkhorn::kMaxK];
    warp.run([&](int lane) {
      EmulatedTeam team{&warp, g, lane};
      sinkhorn::solve<kb()>(team, VecIo{cost.data(), many.plan.data(), K}, problem(many));
    });
  });
  double mass = 0.0;  // a plan's total mass is 1: NaN or zero plans on both sides must not pass as equal
  for (float t : one.plan) mass += t;
  report("sinkhorn K=" + std::to_string(K) + " far=" + std::to_string(int(far)),
         {error(many.plan, one.plan), error(many.loss, one.loss), double(many.iters != one.iters),
          std::fabs(mass - 1.0) < 1e-3 ? 0.0 : NAN});
}

}  // namespace

int main(int argc, char** argv) {
  rng.seed(argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 0u);
  for (int kind : {proto::kReluCos, proto::kSoftmax, proto::kCosSoftmax, proto::kLinear}) {
    for (int M : {1, 6, 13, 33, 64}) proto_forward(M, kind);
    for (int M : {1, 13, 64}) proto_backward(M, kind);
  }
  for (int phi : {linattn::kElu, linattn::kRelu}) linear_attention(phi);
  for (int M : {1, 7, 40}) route_nearest(M);
  for (int K : {2, 8, 64}) sinkhorn_problem(K, 0.f);
  sinkhorn_problem(8, 6.f);  // exp(-6 / eps) = e^-120: column 0's sum underflows
  return 0;
}
