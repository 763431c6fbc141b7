// Connected components of binary masks (two-pass union-find, 4- or 8-connectivity) and the split of
// anomaly maps into normal scores and anomalous scores with their region sizes. CPU, OpenMP over images.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "common.h"

namespace fastproto {
namespace {

int32_t find_root(std::vector<int32_t>& parent, int32_t x) {
  int32_t root = x;
  while (parent[root] != root) root = parent[root];
  while (parent[x] != root) {  // path compression
    int32_t next = parent[x];
    parent[x] = root;
    x = next;
  }
  return root;
}

void unite(std::vector<int32_t>& parent, int32_t a, int32_t b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  if (a < b) parent[b] = a;
  else if (b < a) parent[a] = b;
}

// Labels one image: out[i] in 1..K for foreground, 0 for background; returns K.
// `parent` is scratch, resized as needed. Labels are numbered in raster order of first appearance.
int32_t label_image(const bool* mask, int64_t H, int64_t W, bool eight, int32_t* out, std::vector<int32_t>& parent) {
  parent.clear();
  parent.push_back(0);
  for (int64_t y = 0; y < H; ++y) {
    const bool* row = mask + y * W;
    const int32_t* up = out + (y - 1) * W;
    int32_t* cur = out + y * W;
    for (int64_t x = 0; x < W; ++x) {
      if (!row[x]) {
        cur[x] = 0;
        continue;
      }
      int32_t label = 0;
      auto take = [&](int32_t n) {
        if (n == 0) return;
        if (label == 0) label = n;
        else if (n != label) unite(parent, label, n);
      };
      if (x > 0) take(cur[x - 1]);
      if (y > 0) {
        take(up[x]);
        if (eight) {
          if (x > 0) take(up[x - 1]);
          if (x + 1 < W) take(up[x + 1]);
        }
      }
      if (label == 0) {
        label = static_cast<int32_t>(parent.size());
        parent.push_back(label);
      }
      cur[x] = label;
    }
  }
  // Final consecutive numbering of the roots.
  const int32_t n = static_cast<int32_t>(parent.size());
  std::vector<int32_t> final_id(n, 0);
  int32_t count = 0;
  for (int32_t i = 1; i < n; ++i) {
    int32_t r = find_root(parent, i);
    if (r == i) final_id[i] = ++count;
  }
  for (int32_t i = 1; i < n; ++i) final_id[i] = final_id[find_root(parent, i)];
  for (int64_t i = 0; i < H * W; ++i) out[i] = final_id[out[i]];
  return count;
}

at::Tensor connected_components_cpu(const at::Tensor& masks, int64_t connectivity) {
  check_masks(masks, at::kCPU);
  check_connectivity(connectivity);
  const int64_t B = masks.size(0), H = masks.size(1), W = masks.size(2);
  auto out = at::empty({B, H, W}, masks.options().dtype(at::kInt));
  const bool* m = masks.data_ptr<bool>();
  int32_t* o = out.data_ptr<int32_t>();
  const bool eight = connectivity == 8;
#pragma omp parallel
  {
    std::vector<int32_t> parent;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) label_image(m + b * H * W, H, W, eight, o + b * H * W, parent);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_pixels_cpu(const at::Tensor& maps,
                                                                               const at::Tensor& masks,
                                                                               int64_t connectivity) {
  check_split(maps, masks, connectivity, at::kCPU);
  const int64_t B = maps.size(0), HW = maps.size(1) * maps.size(2);
  const int64_t H = maps.size(1), W = maps.size(2);
  const bool* m = masks.data_ptr<bool>();
  const float* s = maps.data_ptr<float>();

  // Pass 1: anomalous pixels per image -> output offsets.
  std::vector<int64_t> pos_count(B + 1, 0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    int64_t c = 0;
    const bool* mb = m + b * HW;
    for (int64_t i = 0; i < HW; ++i) c += mb[i];
    pos_count[b + 1] = c;
  }
  for (int64_t b = 0; b < B; ++b) pos_count[b + 1] += pos_count[b];
  const int64_t P = pos_count[B];
  const int64_t N = B * HW - P;
  auto neg = at::empty({N}, maps.options());
  auto pos = at::empty({P}, maps.options());
  auto sizes = at::empty({P}, maps.options().dtype(at::kInt));
  std::vector<int32_t> regions(B, 0);
  float* negp = neg.data_ptr<float>();
  float* posp = pos.data_ptr<float>();
  int32_t* sizep = sizes.data_ptr<int32_t>();
  const bool eight = connectivity == 8;

#pragma omp parallel
  {
    std::vector<int32_t> parent, labels, area;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const bool* mb = m + b * HW;
      const float* sb = s + b * HW;
      int64_t po = pos_count[b];
      int64_t no = b * HW - pos_count[b];
      if (pos_count[b + 1] == po) {  // no anomalous pixel: copy the scores
        std::memcpy(negp + no, sb, sizeof(float) * HW);
        continue;
      }
      labels.resize(HW);
      int32_t K = label_image(mb, H, W, eight, labels.data(), parent);
      regions[b] = K;
      area.assign(K + 1, 0);
      for (int64_t i = 0; i < HW; ++i) area[labels[i]] += 1;
      for (int64_t i = 0; i < HW; ++i) {
        if (mb[i]) {
          posp[po] = sb[i];
          sizep[po] = area[labels[i]];
          ++po;
        } else {
          negp[no++] = sb[i];
        }
      }
    }
  }
  int64_t total_regions = 0;
  for (int32_t k : regions) total_regions += k;
  return {neg, pos, sizes, at::scalar_tensor(total_regions, maps.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CPU, m) {
  m.impl("connected_components", &connected_components_cpu);
  m.impl("split_pixels", &split_pixels_cpu);
}

}  // namespace fastproto
