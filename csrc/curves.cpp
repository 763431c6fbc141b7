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
  std::vector<uint32_t> keys;  // G keys, then sentinels (UINT32_MAX: above every finite score's key)
  std::vector<int32_t> start;  // start[t] = first key index with bucket >= t (int32: the table stays in cache)
  uint32_t lo = 0, hi = 0;
  int shift = 0;
  int64_t G = 0;

  explicit KeyIndex(const float* values, int64_t n) : keys(n + 2, UINT32_MAX), G(n) {
    for (int64_t i = 0; i < G; ++i) keys[i] = float_key(values[i]);
    if (G == 0) {
      start.assign(2, 0);
      return;
    }
    lo = keys.front();
    hi = keys[G - 1];
    const uint64_t range = uint64_t(hi - lo) + 1;
    // About eight buckets per key: nearly every bucket holds at most two keys, found without a search loop.
    const uint64_t target = std::max<uint64_t>(1024, std::min<uint64_t>(uint64_t(1) << 23, 8 * uint64_t(G)));
    while ((range >> shift) > target) ++shift;
    const int64_t T = int64_t((range - 1) >> shift) + 1;
    start.assign(T + 1, int32_t(G));
    int64_t i = 0;
    for (int64_t t = 0; t < T; ++t) {
      while (i < G && int64_t((keys[i] - lo) >> shift) < t) ++i;
      start[t] = int32_t(i);
    }
  }

  // Index of the first key >= k (G when none), times two, plus one when that key equals k: the counter slot.
  inline int64_t slot(uint32_t k) const {
    const uint32_t c = std::min(std::max(k, lo), hi);  // scores outside the keys' range land in the end buckets
    const int64_t t = int64_t((c - lo) >> shift);
    const int64_t first = start[t], n = start[t + 1] - first;
    int64_t idx;
    if (n <= 2) {  // branch-free for the common small bucket (sentinels make the reads safe)
      idx = first + int64_t(n > 0 && keys[first] < k) + int64_t(n > 1 && keys[first + 1] < k);
    } else {
      idx = std::lower_bound(keys.data() + first, keys.data() + first + n, k) - keys.data();
    }
    return 2 * idx + int64_t(keys[idx] == k);
  }
};

void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous 1-D float32 CPU tensor");
}

std::tuple<at::Tensor, at::Tensor> count_negatives_cpu(at::TensorList scores, const at::Tensor& values) {
  check_scores(values, "values");
  const int64_t G = values.numel();
  TORCH_CHECK(G < (int64_t(1) << 31) - 1, "too many distinct values: ", G);
  KeyIndex index(values.data_ptr<float>(), G);
  for (int64_t i = 1; i < G; ++i)
    TORCH_CHECK(index.keys[i - 1] < index.keys[i], "values must be distinct and ascending");
  TORCH_CHECK(G == 0 || index.keys[G - 1] != UINT32_MAX, "values must be finite");
  for (const auto& t : scores) check_scores(t, "scores");

  // Counters interleaved per gap: [gap 0, eq 0, gap 1, eq 1, ..., gap G]; 32-bit per thread, flushed to
  // the int64 totals after every slab of at most 2**31 scores.
  std::vector<int64_t> total(2 * G + 2, 0);
  const int64_t slab = int64_t(1) << 31;
#pragma omp parallel
  {
    std::vector<uint32_t> mine(2 * G + 2, 0);
    for (const auto& t : scores) {
      const float* p = t.data_ptr<float>();
      for (int64_t s0 = 0, n = t.numel(); s0 < n; s0 += slab) {
        const int64_t s1 = std::min(n, s0 + slab);
#pragma omp for schedule(static)
        for (int64_t i = s0; i < s1; ++i) {
          ++mine[index.slot(float_key(p[i]))];
        }
#pragma omp critical
        for (int64_t g = 0; g < 2 * G + 2; ++g) total[g] += mine[g];
        std::fill(mine.begin(), mine.end(), 0u);
      }
    }
  }
  auto opts = values.options().dtype(at::kLong);
  auto eq = at::empty({G}, opts);
  auto gap = at::empty({G + 1}, opts);
  int64_t* eqp = eq.data_ptr<int64_t>();
  int64_t* gapp = gap.data_ptr<int64_t>();
  for (int64_t g = 0; g <= G; ++g) gapp[g] = total[2 * g];
  for (int64_t g = 0; g < G; ++g) eqp[g] = total[2 * g + 1];
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
  const int threads = (n < (int64_t(1) << 16) || 2 * n < nb) ? 1 : omp_threads();
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
