// Connected components of a batch of binary masks [B,H,W] on the GPU, and the pixel scatter of
// split_pixels. Pixel-level union-find in the BKE launch pattern (init, compress, merge, compress),
// one set of launches for the whole batch, no convergence loop.
//
// Parents are raster indices local to each image, so links cannot cross image boundaries. A pixel only
// links to earlier (raster order) pixels and hooks always put the larger root under the smaller one,
// so parent[p] <= p at all times and every root is the first pixel of its component: numbering the
// roots of each image in raster order reproduces the CPU labels exactly.
#include "fastproto_kernels.h"

namespace fastproto {
namespace cuda {
namespace {

constexpr int kTileX = 32;  // a warp covers one row segment: loop trip counts are warp-uniform
constexpr int kTileY = 8;
constexpr unsigned kAllLanes = 0xffffffffu;

dim3 pixel_grid(int64_t B, int64_t H, int64_t W) {
  const auto cap = [](int64_t n, int64_t limit) { return static_cast<unsigned>(n < limit ? n : limit); };
  return dim3(cap((W + kTileX - 1) / kTileX, 1 << 16), cap((H + kTileY - 1) / kTileY, 65535), cap(B, 65535));
}

// Calls f(b, y, x) for every pixel; x runs past W to the end of the warp's segment so that all lanes
// reach the warp intrinsics, and f must ignore x >= W.
template <class F>
__device__ __forceinline__ void for_each_pixel(int64_t B, int64_t H, int64_t W, F&& f) {
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z)
    for (int64_t y = int64_t(blockIdx.y) * kTileY + threadIdx.y; y < H; y += int64_t(gridDim.y) * kTileY)
      for (int64_t x0 = int64_t(blockIdx.x) * kTileX; x0 < W; x0 += int64_t(gridDim.x) * kTileX)
        f(b, y, x0 + threadIdx.x);
}

// The earlier neighbours that foreground pixel i = (y, x) of mask m is linked to. Links to all of
// NW, N, NE, W are redundant: by induction over raster order, neighbours that are adjacent to each
// other are already connected by the links of earlier pixels, so with N in the foreground N alone
// suffices (NW, NE and W all touch N), and otherwise W covers NW. `first` becomes the initial parent,
// `second` (-1 if none) is united by the merge kernel.
template <bool kEight>
__device__ __forceinline__ void backward_links(const bool* m, int64_t W, int64_t y, int64_t x, int64_t i,
                                               int32_t& first, int32_t& second) {
  const bool n = y > 0 && m[i - W];
  const bool w = x > 0 && m[i - 1];
  const bool nw = y > 0 && x > 0 && m[i - W - 1];
  first = second = -1;
  if (kEight) {
    const bool ne = y > 0 && x + 1 < W && m[i - W + 1];
    if (n) {
      first = int32_t(i - W);
    } else if (w || nw) {
      first = int32_t(w ? i - 1 : i - W - 1);
      if (ne) second = int32_t(i - W + 1);
    } else if (ne) {
      first = int32_t(i - W + 1);
    }
  } else if (n) {
    first = int32_t(i - W);
    if (w && !nw) second = int32_t(i - 1);  // a foreground NW already connects N and W
  } else if (w) {
    first = int32_t(i - 1);
  }
}

// Root of x while other threads hook roots. Loads bypass L1, which is not coherent across SMs.
__device__ __forceinline__ int32_t find_root(const int32_t* parent, int32_t x) {
  for (int32_t p = __ldcg(parent + x); p != x; p = __ldcg(parent + x)) x = p;
  return x;
}

// Root of x with path halving, only while no hooks run (compress kernels): any ancestor is then a valid
// parent, and halving by all threads at once shortens the long init chains quickly. The halving write is
// an atomicMin so that a stale ancestor never overwrites the root its owner thread stored (the root is
// the smallest ancestor); the owners' plain stores of the root therefore stand.
__device__ __forceinline__ int32_t find_halving(int32_t* parent, int32_t x) {
  while (true) {
    const int32_t p = __ldcg(parent + x);
    if (p == x) return x;
    const int32_t g = __ldcg(parent + p);
    if (g == p) return p;
    atomicMin(parent + x, g);
    x = g;
  }
}

// Lock-free union: hook the larger root under the smaller with atomicMin, retry if it stopped being a root.
__device__ void unite(int32_t* parent, int32_t a, int32_t b) {
  while (true) {
    a = find_root(parent, a);
    b = find_root(parent, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomicMin(parent + b, a);
    if (old == b) return;  // b was still a root: now under a
    // b had been hooked under old < b; it now points to min(old, a), so old and a must still be united.
    b = old;
  }
}

template <bool kEight>
__global__ void init_kernel(const bool* masks, int32_t* parent, int64_t B, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  for_each_pixel(B, H, W, [&](int64_t b, int64_t y, int64_t x) {
    if (x >= W) return;
    const bool* m = masks + b * HW;
    const int64_t i = y * W + x;
    int32_t first = -1, second = -1;
    if (m[i]) backward_links<kEight>(m, W, y, x, i, first, second);
    parent[b * HW + i] = first >= 0 ? first : int32_t(i);
  });
}

// Points every foreground pixel straight at its current root, so that later finds are short.
__global__ void compress_kernel(const bool* masks, int32_t* parent, int64_t B, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  for_each_pixel(B, H, W, [&](int64_t b, int64_t y, int64_t x) {
    const int64_t i = y * W + x;
    if (x < W && masks[b * HW + i]) parent[b * HW + i] = find_halving(parent + b * HW, int32_t(i));
  });
}

template <bool kEight>
__global__ void merge_kernel(const bool* masks, int32_t* parent, int64_t B, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  for_each_pixel(B, H, W, [&](int64_t b, int64_t y, int64_t x) {
    if (x >= W) return;
    const bool* m = masks + b * HW;
    const int64_t i = y * W + x;
    if (!m[i]) return;
    int32_t first, second;
    backward_links<kEight>(m, W, y, x, i, first, second);
    if (second >= 0) unite(parent + b * HW, int32_t(i), second);
  });
}

// Final compression; flags the roots.
__global__ void roots_kernel(const bool* masks, int32_t* parent, int32_t* flags, int64_t B, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  for_each_pixel(B, H, W, [&](int64_t b, int64_t y, int64_t x) {
    if (x >= W) return;
    const int64_t i = y * W + x;
    int32_t flag = 0;
    if (masks[b * HW + i]) {
      const int32_t root = find_halving(parent + b * HW, int32_t(i));
      parent[b * HW + i] = root;
      flag = root == i;
    }
    flags[b * HW + i] = flag;
  });
}

// Final compression; component areas at the roots and the number of roots. Lanes with the same root
// (a warp spans 32 pixels of one row) add their count with a single atomic.
__global__ void areas_kernel(const bool* masks, int32_t* parent, int32_t* area, unsigned long long* n_regions,
                             int64_t B, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  const unsigned lane = threadIdx.x;
  for_each_pixel(B, H, W, [&](int64_t b, int64_t y, int64_t x) {
    const int64_t i = y * W + x;
    const bool fg = x < W && masks[b * HW + i];
    int32_t root = -1;
    if (fg) {
      root = find_halving(parent + b * HW, int32_t(i));
      parent[b * HW + i] = root;
    }
    const unsigned fg_lanes = __ballot_sync(kAllLanes, fg);
    if (fg) {
      const unsigned peers = __match_any_sync(fg_lanes, root);
      if (lane == unsigned(__ffs(peers) - 1)) atomicAdd(area + b * HW + root, __popc(peers));
    }
    const unsigned roots = __ballot_sync(kAllLanes, fg && root == i);
    if (lane == 0 && roots) atomicAdd(n_regions, static_cast<unsigned long long>(__popc(roots)));
  });
}

// ranks: batch-wide inclusive count of roots; subtracting the count at the end of the previous image
// gives the per-image label.
template <class Rank>
__global__ void relabel_kernel(const bool* masks, const int32_t* parent, const Rank* ranks, int32_t* labels,
                               int64_t B, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  for_each_pixel(B, H, W, [&](int64_t b, int64_t y, int64_t x) {
    if (x >= W) return;
    const int64_t g = b * HW + y * W + x;
    int32_t label = 0;
    if (masks[g]) label = int32_t(ranks[b * HW + parent[g]] - (b > 0 ? ranks[b * HW - 1] : Rank(0)));
    labels[g] = label;
  });
}

// pos_rank: inclusive count of anomalous pixels over the flattened batch, i.e. output positions.
template <class Rank>
__global__ void scatter_kernel(const float* maps, const bool* masks, const int32_t* parent, const int32_t* area,
                               const Rank* pos_rank, float* neg, float* pos, int32_t* sizes, int64_t B, int64_t H,
                               int64_t W) {
  const int64_t HW = H * W;
  for_each_pixel(B, H, W, [&](int64_t b, int64_t y, int64_t x) {
    if (x >= W) return;
    const int64_t g = b * HW + y * W + x;
    const float s = maps[g];
    const int64_t k = int64_t(pos_rank[g]);
    if (masks[g]) {
      pos[k - 1] = s;
      sizes[k - 1] = area[b * HW + parent[g]];
    } else {
      neg[g - k] = s;
    }
  });
}

// Init, compress, merge: afterwards every component is one tree rooted at its first pixel.
template <bool kEight>
cudaError_t union_find(const bool* masks, int32_t* parent, int64_t B, int64_t H, int64_t W, cudaStream_t stream) {
  const dim3 grid = pixel_grid(B, H, W), block(kTileX, kTileY);
  init_kernel<kEight><<<grid, block, 0, stream>>>(masks, parent, B, H, W);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  compress_kernel<<<grid, block, 0, stream>>>(masks, parent, B, H, W);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  merge_kernel<kEight><<<grid, block, 0, stream>>>(masks, parent, B, H, W);
  return cudaGetLastError();
}

cudaError_t union_find(const bool* masks, int32_t* parent, int64_t B, int64_t H, int64_t W, int connectivity,
                       cudaStream_t stream) {
  return connectivity == 8 ? union_find<true>(masks, parent, B, H, W, stream)
                           : union_find<false>(masks, parent, B, H, W, stream);
}

template <class Rank>
cudaError_t relabel(const bool* masks, const int32_t* parent, const Rank* ranks, int32_t* labels, int64_t B,
                    int64_t H, int64_t W, cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  relabel_kernel<Rank><<<pixel_grid(B, H, W), dim3(kTileX, kTileY), 0, stream>>>(masks, parent, ranks, labels, B, H, W);
  return cudaGetLastError();
}

template <class Rank>
cudaError_t split_scatter(const float* maps, const bool* masks, const int32_t* parent, const int32_t* area,
                          const Rank* pos_rank, float* neg, float* pos, int32_t* sizes, int64_t B, int64_t H,
                          int64_t W, cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  scatter_kernel<Rank><<<pixel_grid(B, H, W), dim3(kTileX, kTileY), 0, stream>>>(maps, masks, parent, area, pos_rank,
                                                                                 neg, pos, sizes, B, H, W);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cc_roots(const bool* masks, int32_t* parent, int32_t* root_flags, int64_t B, int64_t H,
                            int64_t W, int connectivity, cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  cudaError_t err = union_find(masks, parent, B, H, W, connectivity, stream);
  if (err != cudaSuccess) return err;
  roots_kernel<<<pixel_grid(B, H, W), dim3(kTileX, kTileY), 0, stream>>>(masks, parent, root_flags, B, H, W);
  return cudaGetLastError();
}

cudaError_t launch_cc_relabel(const bool* masks, const int32_t* parent, const int32_t* ranks, int32_t* labels,
                              int64_t B, int64_t H, int64_t W, cudaStream_t stream) {
  return relabel(masks, parent, ranks, labels, B, H, W, stream);
}

cudaError_t launch_cc_relabel(const bool* masks, const int32_t* parent, const int64_t* ranks, int32_t* labels,
                              int64_t B, int64_t H, int64_t W, cudaStream_t stream) {
  return relabel(masks, parent, ranks, labels, B, H, W, stream);
}

cudaError_t launch_cc_areas(const bool* masks, int32_t* parent, int32_t* area, unsigned long long* n_regions,
                            int64_t B, int64_t H, int64_t W, int connectivity, cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  cudaError_t err = union_find(masks, parent, B, H, W, connectivity, stream);
  if (err != cudaSuccess) return err;
  areas_kernel<<<pixel_grid(B, H, W), dim3(kTileX, kTileY), 0, stream>>>(masks, parent, area, n_regions, B, H, W);
  return cudaGetLastError();
}

cudaError_t launch_split_scatter(const float* maps, const bool* masks, const int32_t* parent, const int32_t* area,
                                 const int32_t* pos_rank, float* neg, float* pos, int32_t* sizes, int64_t B,
                                 int64_t H, int64_t W, cudaStream_t stream) {
  return split_scatter(maps, masks, parent, area, pos_rank, neg, pos, sizes, B, H, W, stream);
}

cudaError_t launch_split_scatter(const float* maps, const bool* masks, const int32_t* parent, const int32_t* area,
                                 const int64_t* pos_rank, float* neg, float* pos, int32_t* sizes, int64_t B,
                                 int64_t H, int64_t W, cudaStream_t stream) {
  return split_scatter(maps, masks, parent, area, pos_rank, neg, pos, sizes, B, H, W, stream);
}

}  // namespace cuda
}  // namespace fastproto
