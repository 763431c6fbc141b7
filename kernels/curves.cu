// Streaming passes over float32 scores for the curve engines: count_negatives (exact engine) and
// histogram_update (binned engine). Grid-stride loops with 16-byte loads; trip counts are warp-uniform
// so that lanes can merge their atomics on the same counter with __match_any_sync.
#include "fastproto_kernels.h"

namespace fastproto {
namespace cuda {
namespace {

constexpr unsigned kAllLanes = 0xffffffffu;
constexpr int kThreads = 256;
// count_negatives keeps keys and per-block counters in shared memory up to this G (3G+1 words, 36 KiB).
constexpr int64_t kSharedMaxG = 3072;
// For larger G, each block caches this many evenly spaced keys to narrow the search in global memory.
constexpr int kSplitters = 2048;
constexpr int kMaxChunks = 32;  // chunk pointers passed by value per launch

struct Chunks {
  const float* ptr[kMaxChunks];
  int64_t n[kMaxChunks];
  int count;
};

// float_key of csrc/common.h on the bits. Integer operations only: under --use_fast_math, float
// compares flush denormals to zero, which the CPU does not.
__device__ __forceinline__ uint32_t float_key(float v) {
  uint32_t u = __float_as_uint(v);
  if ((u << 1) == 0) {
    u = 0;  // -0.0 -> +0.0
  } else if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
    u |= 0x00400000u;  // the CPU's x + 0.0f quietens a signalling NaN
  }
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Calls f(v, ok) for the n floats at p: the body as float4 over the grid, the unaligned head and the
// tail (6 floats at most) by the grid's first warp. All lanes of a warp make the same calls, with
// ok = false past the end, as the warp intrinsics in f require.
template <class F>
__device__ __forceinline__ void for_each_score(const float* p, int64_t n, F& f) {
  const unsigned lane = threadIdx.x & 31;
  const int64_t align = int64_t((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15) / 4;
  const int64_t head = n < align ? n : align;
  const int64_t n4 = (n - head) / 4;
  const float4* body = reinterpret_cast<const float4*>(p + head);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j0 = int64_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u); j0 < n4; j0 += stride) {
    const int64_t j = j0 + lane;
    const bool ok = j < n4;
    const float4 v = ok ? __ldcs(body + j) : make_float4(0.f, 0.f, 0.f, 0.f);  // read once: stream
    f(v.x, ok);
    f(v.y, ok);
    f(v.z, ok);
    f(v.w, ok);
  }
  if (blockIdx.x == 0 && threadIdx.x < 32) {
    const bool ok = lane < n - 4 * n4;  // lane k < head: float k; otherwise float 4 * n4 + k of the tail
    f(ok ? p[lane < head ? int64_t(lane) : 4 * n4 + lane] : 0.f, ok);
  }
}

// Index of the j-th splitter key: G >= kSplitters + 1, so the positions strictly increase.
__device__ __forceinline__ int64_t splitter_pos(int j, int64_t G) { return (int64_t(j) + 1) * G / (kSplitters + 1); }

// Small G: binary search in shared keys, per-block uint32 counters in shared memory (counts[2g]: gap[g],
// counts[2g + 1]: eq[g]) flushed once per block. A block sees about total / blocks scores, far below 2^32
// for any input that fits in device memory. `top` is the largest power of two <= G (0 if G = 0).
__global__ void count_shared_kernel(Chunks chunks, const float* values, int32_t G, int32_t top,
                                    unsigned long long* eq, unsigned long long* gap) {
  extern __shared__ uint32_t smem[];
  uint32_t* keys = smem;
  uint32_t* counts = smem + G;
  for (int32_t t = threadIdx.x; t < G; t += blockDim.x) keys[t] = float_key(values[t]);
  for (int32_t t = threadIdx.x; t <= 2 * G; t += blockDim.x) counts[t] = 0;
  __syncthreads();
  auto count = [&](float v, bool ok) {
    if (!ok) return;
    const uint32_t k = float_key(v);
    int32_t lo = 0;  // number of keys < k, in a fixed number of steps
    for (int32_t step = top; step > 0; step >>= 1)
      if (lo + step <= G && keys[lo + step - 1] < k) lo += step;
    atomicAdd(counts + 2 * lo + (lo < G && keys[lo] == k), 1u);
  };
  for (int c = 0; c < chunks.count; ++c) for_each_score(chunks.ptr[c], chunks.n[c], count);
  __syncthreads();
  for (int32_t t = threadIdx.x; t <= 2 * G; t += blockDim.x)
    if (counts[t]) atomicAdd(((t & 1) ? eq : gap) + (t >> 1), static_cast<unsigned long long>(counts[t]));
}

// Large G: the shared splitters bound the search to about G / kSplitters keys read from global memory;
// counters are global, and lanes hitting the same one (typically gap[0]: most normal scores lie below
// every anomalous one) add with one atomic.
__global__ void count_global_kernel(Chunks chunks, const float* values, int64_t G, unsigned long long* eq,
                                    unsigned long long* gap) {
  __shared__ uint32_t split[kSplitters];
  for (int j = threadIdx.x; j < kSplitters; j += blockDim.x) split[j] = float_key(values[splitter_pos(j, G)]);
  __syncthreads();
  const unsigned lane = threadIdx.x & 31;
  auto count = [&](float v, bool ok) {
    uint32_t slot = 0;  // 2 * index + (equal)
    if (ok) {
      const uint32_t k = float_key(v);
      int s = 0;  // splitters < k
      for (int step = kSplitters; step > 0; step >>= 1)
        if (s + step <= kSplitters && split[s + step - 1] < k) s += step;
      int64_t lo = s > 0 ? splitter_pos(s - 1, G) + 1 : 0;
      int64_t hi = s < kSplitters ? splitter_pos(s, G) : G;
      while (lo < hi) {
        const int64_t mid = (lo + hi) >> 1;
        if (float_key(__ldg(values + mid)) < k) lo = mid + 1;
        else hi = mid;
      }
      slot = uint32_t(2 * lo + (lo < G && float_key(__ldg(values + lo)) == k));
    }
    const unsigned active = __ballot_sync(kAllLanes, ok);
    if (ok) {
      const unsigned peers = __match_any_sync(active, slot);
      if (lane == unsigned(__ffs(peers) - 1))
        atomicAdd(((slot & 1) ? eq : gap) + (slot >> 1), static_cast<unsigned long long>(__popc(peers)));
    }
  };
  for (int c = 0; c < chunks.count; ++c) for_each_score(chunks.ptr[c], chunks.n[c], count);
}

__global__ void histogram_kernel(const float* neg, int64_t n_neg, const float* pos, const int32_t* sizes,
                                 int64_t n_pos, const int64_t* page_base, const int64_t* page_shift, int low_bits,
                                 unsigned long long* neg_hist, unsigned long long* pos_hist, double* weight_hist) {
  const unsigned lane = threadIdx.x & 31;
  const uint32_t low_mask = (uint32_t(1) << low_bits) - 1;
  const auto bin_of = [&](float v) {
    const uint32_t k = float_key(v);
    const uint32_t h = k >> low_bits;
    return __ldg(page_base + h) + int64_t((k & low_mask) >> __ldg(page_shift + h));
  };
  auto add_negative = [&](float v, bool ok) {  // normal scores crowd into few bins: merge lanes per bin
    const int64_t bin = ok ? bin_of(v) : 0;
    const unsigned active = __ballot_sync(kAllLanes, ok);
    if (ok) {
      const unsigned peers = __match_any_sync(active, static_cast<unsigned long long>(bin));
      if (lane == unsigned(__ffs(peers) - 1)) atomicAdd(neg_hist + bin, static_cast<unsigned long long>(__popc(peers)));
    }
  };
  for_each_score(neg, n_neg, add_negative);
  // Anomalous scores are few: one atomic pair each.
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_pos; i += stride) {
    const int64_t bin = bin_of(pos[i]);
    atomicAdd(pos_hist + bin, 1ull);
    atomicAdd(weight_hist + bin, 1.0 / double(sizes[i]));
  }
}

cudaError_t max_blocks(int per_sm, int& blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  blocks = sms * per_sm;
  return err;
}

int grid_for(int64_t work, int64_t per_block, int limit) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return int(blocks < 1 ? 1 : (blocks > limit ? limit : blocks));
}

}  // namespace

cudaError_t launch_count_negatives(const float* const* chunks, const int64_t* sizes, int64_t num_chunks,
                                   const float* values, int64_t G, int64_t* eq, int64_t* gap, cudaStream_t stream) {
  int limit = 0;
  cudaError_t err = max_blocks(4, limit);
  if (err != cudaSuccess) return err;
  auto* eq_u = reinterpret_cast<unsigned long long*>(eq);
  auto* gap_u = reinterpret_cast<unsigned long long*>(gap);
  int32_t top = 0;
  for (int64_t t = 1; t <= G && G <= kSharedMaxG; t *= 2) top = int32_t(t);
  for (int64_t c0 = 0; c0 < num_chunks; c0 += kMaxChunks) {
    Chunks batch{};
    int64_t total = 0;
    for (int64_t c = c0; c < num_chunks && c < c0 + kMaxChunks; ++c, ++batch.count) {
      batch.ptr[batch.count] = chunks[c];
      batch.n[batch.count] = sizes[c];
      total += sizes[c];
    }
    if (total == 0) continue;
    const int blocks = grid_for(total, int64_t(kThreads) * 16, limit);
    if (G <= kSharedMaxG) {
      const size_t smem = size_t(3 * G + 1) * sizeof(uint32_t);
      count_shared_kernel<<<blocks, kThreads, smem, stream>>>(batch, values, int32_t(G), top, eq_u, gap_u);
    } else {
      count_global_kernel<<<blocks, kThreads, 0, stream>>>(batch, values, G, eq_u, gap_u);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_histogram_update(const float* neg, int64_t n_neg, const float* pos, const int32_t* pos_sizes,
                                    int64_t n_pos, const int64_t* page_base, const int64_t* page_shift,
                                    int prefix_bits, int64_t* neg_hist, int64_t* pos_hist, double* weight_hist,
                                    cudaStream_t stream) {
  if (n_neg == 0 && n_pos == 0) return cudaSuccess;
  int limit = 0;
  cudaError_t err = max_blocks(8, limit);
  if (err != cudaSuccess) return err;
  const int blocks = grid_for(n_neg / 4 > n_pos ? n_neg / 4 : n_pos, kThreads * 4, limit);
  histogram_kernel<<<blocks, kThreads, 0, stream>>>(neg, n_neg, pos, pos_sizes, n_pos, page_base, page_shift,
                                                    32 - prefix_bits, reinterpret_cast<unsigned long long*>(neg_hist),
                                                    reinterpret_cast<unsigned long long*>(pos_hist), weight_hist);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastproto
