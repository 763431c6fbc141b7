// Streaming passes over normal-pixel scores for the exact curve engine (count_negatives) and the
// binned engine (histogram_update). CPU, OpenMP.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "checks.h"
#include "common.h"

namespace fastproto {
namespace {

#ifdef _OPENMP
int omp_threads() { return omp_get_max_threads(); }
#else
int omp_threads() { return 1; }
int omp_get_thread_num() { return 0; }
#endif

// Locates float keys among G distinct ascending keys through a direct-mapped table over the key
// range: bucket t holds the keys whose (key - lo) >> shift == t, so a lookup is one table read plus
// a binary search inside one bucket (a few entries on real data; log G at worst).
struct KeyIndex {
  std::vector<uint32_t> keys;
  std::vector<int64_t> start;  // start[t] = first key index with bucket >= t
  uint32_t lo = 0, hi = 0;
  int shift = 0;

  explicit KeyIndex(const float* values, int64_t G) : keys(G) {
    for (int64_t i = 0; i < G; ++i) keys[i] = float_key(values[i]);
    if (G == 0) return;
    lo = keys.front();
    hi = keys.back();
    const uint64_t range = uint64_t(hi - lo) + 1;
    const uint64_t target = std::max<uint64_t>(1024, std::min<uint64_t>(uint64_t(1) << 22, 4 * uint64_t(G)));
    while ((range >> shift) > target) ++shift;
    const int64_t T = int64_t((range - 1) >> shift) + 1;
    start.assign(T + 1, G);
    int64_t i = 0;
    for (int64_t t = 0; t < T; ++t) {
      while (i < G && int64_t((keys[i] - lo) >> shift) < t) ++i;
      start[t] = i;
    }
  }

  // Returns (index of the first key >= k, whether it equals k).
  inline std::pair<int64_t, bool> locate(uint32_t k) const {
    const int64_t G = int64_t(keys.size());
    if (G == 0 || k < lo) return {0, false};
    if (k > hi) return {G, false};
    const int64_t t = int64_t((k - lo) >> shift);
    const uint32_t* first = keys.data() + start[t];
    const uint32_t* last = keys.data() + start[t + 1];
    const uint32_t* it = std::lower_bound(first, last, k);
    const int64_t idx = it - keys.data();
    return {idx, idx < G && keys[idx] == k};
  }
};

void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous 1-D float32 CPU tensor");
}

std::tuple<at::Tensor, at::Tensor> count_negatives_cpu(at::TensorList scores, const at::Tensor& values) {
  check_scores(values, "values");
  const int64_t G = values.numel();
  KeyIndex index(values.data_ptr<float>(), G);
  for (int64_t i = 1; i < G; ++i)
    TORCH_CHECK(index.keys[i - 1] < index.keys[i], "values must be distinct and ascending");
  for (const auto& t : scores) check_scores(t, "scores");

  auto opts = values.options().dtype(at::kLong);
  auto eq = at::zeros({G}, opts);
  auto gap = at::zeros({G + 1}, opts);
  int64_t* eqp = eq.data_ptr<int64_t>();
  int64_t* gapp = gap.data_ptr<int64_t>();
#pragma omp parallel
  {
    std::vector<int64_t> my_eq(G, 0), my_gap(G + 1, 0);
    for (const auto& t : scores) {
      const float* p = t.data_ptr<float>();
      const int64_t n = t.numel();
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < n; ++i) {
        auto [idx, equal] = index.locate(float_key(p[i]));
        if (equal) ++my_eq[idx];
        else ++my_gap[idx];
      }
    }
#pragma omp critical
    {
      for (int64_t g = 0; g < G; ++g) eqp[g] += my_eq[g];
      for (int64_t g = 0; g <= G; ++g) gapp[g] += my_gap[g];
    }
  }
  return {eq, gap};
}

void histogram_update_cpu(at::Tensor neg_hist, at::Tensor pos_hist, at::Tensor weight_hist, const at::Tensor& page_base,
                          const at::Tensor& page_shift, const at::Tensor& neg, const at::Tensor& pos,
                          const at::Tensor& sizes, int64_t prefix_bits) {
  check_histograms(neg_hist, pos_hist, weight_hist, page_base, page_shift, prefix_bits);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&neg_hist, &pos_hist, &weight_hist, &page_base, &page_shift})
    TORCH_CHECK(t->device().is_cpu(), "histograms and page tables must be on the same device as the scores (CPU)");
  check_scores(neg, "neg_scores");
  check_scores(pos, "pos_scores");
  TORCH_CHECK(sizes.scalar_type() == at::kInt && sizes.numel() == pos.numel() && sizes.is_contiguous(),
              "pos_sizes must be contiguous int32 with one entry per anomalous score");
  const int page_shift_bits = int(32 - prefix_bits);
  const uint32_t low_mask = (uint32_t(1) << page_shift_bits) - 1;
  const int64_t* base = page_base.data_ptr<int64_t>();
  const int64_t* shift = page_shift.data_ptr<int64_t>();
  auto bin_of = [=](float x) {
    const uint32_t k = float_key(x);
    const uint32_t h = k >> page_shift_bits;
    return base[h] + int64_t((k & low_mask) >> shift[h]);
  };
  const int64_t nb = neg_hist.numel();
  int64_t* nh = neg_hist.data_ptr<int64_t>();
  const float* np_ = neg.data_ptr<float>();
  const int64_t n = neg.numel();
  // Few scores per bin: private copies per thread would cost more than the counting (and atomics cost
  // more than a second core gains), so count serially.
  const int threads = (n < (int64_t(1) << 16) || n < 4 * nb) ? 1 : omp_threads();
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) nh[bin_of(np_[i])] += 1;
  } else {
    // Private 32-bit counts per thread (no atomics), merged once; slabs keep each count below 2**32.
    const int64_t slab = int64_t(1) << 31;
    std::vector<std::vector<uint32_t>> priv(threads);
    for (int64_t s0 = 0; s0 < n; s0 += slab) {
      const int64_t s1 = std::min(n, s0 + slab);
#pragma omp parallel num_threads(threads)
      {
        auto& mine = priv[omp_get_thread_num()];
        mine.assign(nb, 0);
#pragma omp for schedule(static)
        for (int64_t i = s0; i < s1; ++i) mine[bin_of(np_[i])] += 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b)
          for (int t = 0; t < threads; ++t) nh[b] += priv[t][b];
      }
    }
  }
  int64_t* ph = pos_hist.data_ptr<int64_t>();
  double* wh = weight_hist.data_ptr<double>();
  const float* pp = pos.data_ptr<float>();
  const int32_t* sp = sizes.data_ptr<int32_t>();
  for (int64_t i = 0, m = pos.numel(); i < m; ++i) {  // anomalous pixels are few: serial keeps the sum order fixed
    const int64_t b = bin_of(pp[i]);
    ph[b] += 1;
    wh[b] += 1.0 / double(sp[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) {
  m.impl("count_negatives", &count_negatives_cpu);
  m.impl("histogram_update", &histogram_update_cpu);
}

}  // namespace fastproto
