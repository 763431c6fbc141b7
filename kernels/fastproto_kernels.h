// Launchers of the CUDA kernels in kernels/*.cu, called by the host wrappers in csrc/cuda/*.cpp.
// Plain pointers and sizes only (no torch types). Every launcher enqueues its kernels on `stream`,
// never synchronises, and returns the first error reported by cudaGetLastError() (cudaSuccess if none).
// Empty inputs launch nothing.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastproto {
namespace cuda {

// ---- Connected components of masks [B,H,W] (bool, contiguous), per image, 4- or 8-connectivity.
// Requires H*W < 2^31. `parent` is scratch of B*H*W int32; on return parent[b*H*W + i] holds, for every
// foreground pixel i of image b, the raster index (within image b) of the first pixel of its component.

// Union-find; writes root_flags[p] = 1 where p is the first pixel of its component, else 0.
cudaError_t launch_cc_roots(const bool* masks, int32_t* parent, int32_t* root_flags, int64_t B, int64_t H,
                            int64_t W, int connectivity, cudaStream_t stream);

// Final labels after launch_cc_roots: `ranks` is the inclusive prefix sum of root_flags over the whole
// batch (flattened), so a component's label is the number of roots of its image up to its own root.
cudaError_t launch_cc_relabel(const bool* masks, const int32_t* parent, const int32_t* ranks, int32_t* labels,
                              int64_t B, int64_t H, int64_t W, cudaStream_t stream);
cudaError_t launch_cc_relabel(const bool* masks, const int32_t* parent, const int64_t* ranks, int32_t* labels,
                              int64_t B, int64_t H, int64_t W, cudaStream_t stream);

// Union-find; adds each component's pixel count into area[b*H*W + root] and the number of components
// into *n_regions. `area` and `*n_regions` must be zero on entry.
cudaError_t launch_cc_areas(const bool* masks, int32_t* parent, int32_t* area, unsigned long long* n_regions,
                            int64_t B, int64_t H, int64_t W, int connectivity, cudaStream_t stream);

// split_pixels output after launch_cc_areas: `pos_rank` is the inclusive prefix sum of the flattened
// masks. Writes the scores of normal pixels to neg and of anomalous pixels to pos, each in image-major
// raster order, and the area of each anomalous pixel's component to sizes.
cudaError_t launch_split_scatter(const float* maps, const bool* masks, const int32_t* parent, const int32_t* area,
                                 const int32_t* pos_rank, float* neg, float* pos, int32_t* sizes, int64_t B,
                                 int64_t H, int64_t W, cudaStream_t stream);
cudaError_t launch_split_scatter(const float* maps, const bool* masks, const int32_t* parent, const int32_t* area,
                                 const int64_t* pos_rank, float* neg, float* pos, int32_t* sizes, int64_t B,
                                 int64_t H, int64_t W, cudaStream_t stream);

// ---- Curve passes over float32 scores. Scores are compared through the monotone uint32 key of
// csrc/common.h (-0.0 == +0.0), as the CPU kernels do.

// For G distinct ascending values (G < 2^31 - 1), adds to eq[g] the scores equal to values[g] and to
// gap[g] those strictly between values[g-1] and values[g] (gap[0]: below all, gap[G]: above all).
// The scores are num_chunks device arrays: chunks[c] (host array of device pointers) of sizes[c] floats.
cudaError_t launch_count_negatives(const float* const* chunks, const int64_t* sizes, int64_t num_chunks,
                                   const float* values, int64_t G, int64_t* eq, int64_t* gap, cudaStream_t stream);

// Adds scores into a paged histogram (see histogram_update in csrc/ops.cpp): page h = key >> (32 - prefix_bits),
// bin = page_base[h] + ((key & low bits) >> page_shift[h]), a valid index for every page (checked by the caller).
// neg_hist counts neg, pos_hist counts pos, weight_hist sums 1/pos_sizes. The float64 sums are atomic, so
// their summation order (hence last-bit rounding) varies from run to run.
cudaError_t launch_histogram_update(const float* neg, int64_t n_neg, const float* pos, const int32_t* pos_sizes,
                                    int64_t n_pos, const int64_t* page_base, const int64_t* page_shift,
                                    int prefix_bits, int64_t* neg_hist, int64_t* pos_hist, double* weight_hist,
                                    cudaStream_t stream);

// ---- Batched log-domain Sinkhorn (kernels/sinkhorn.cu; solver in kernels/sinkhorn_solver.h).
// One thread block per problem, all iterations in one launch. cost [B,N,K] float32 (1 <= K <= 64) read
// through c_strides (3 element strides); log_a [B,N], log_b [B,K] float32 contiguous; work: B*2*N float32,
// zero on entry; writes plan [B,N,K] (p_strides), loss [B] float32 and iters [B] int32.
cudaError_t launch_sinkhorn(const float* cost, const int64_t* c_strides, const float* log_a, const float* log_b,
                            float* work, float* plan, const int64_t* p_strides, float* loss, int32_t* iters,
                            int64_t B, int64_t N, int K, float eps, float tol, int64_t n_iters, cudaStream_t stream);

// ---- Nearest-prototype routing (kernels/route.cu; per-token math in kernels/route_nearest.h).
enum class ElementType { kFloat32, kHalf, kBFloat16 };

// One warp per token. x [B,N,C] and the bank in `dtype`, read through their strides: x_strides (3),
// p_strides = {bank stride (0 for a shared [M,C] bank), prototype stride, channel stride}; the bank of token
// (b, n) is indexed by n when per_location, else by b; inv_p: the bank's 1 / max(||p_m||, eps), float32
// contiguous [M] or [G,M]. Writes dist [B,N] float32 and index [B,N] int64
// through d_strides / i_strides (2 each). Requires B*N / 8 < 2^31 blocks.
cudaError_t launch_route_nearest(ElementType dtype, const void* x, const int64_t* x_strides, const void* p,
                                 const int64_t* p_strides, const float* inv_p, float* dist, const int64_t* d_strides,
                                 int64_t* index, const int64_t* i_strides, int64_t B, int64_t N, int64_t M, int64_t C,
                                 bool per_location, float eps, cudaStream_t stream);

// ---- Prototype attention forward (kernels/prototype.cu; per-query routine in kernels/prototype_attention.h).
// Element strides: q [B,H,N,D], k [B,H,M,D] and v [B,H,M,Dv] (batch stride 0 for shared [H,M,*] banks),
// out [B,H,N,Dv]; scale: H float32 (device); kind 0 = relu_cos, 1 = softmax; 1 <= M <= 64.
struct ProtoAttnArgs {
  const void* q;
  const void* k;
  const void* v;
  const float* scale;
  const float* inv_k;  // kinds 0, 2: the keys' 1 / max(||k_m||, eps), contiguous [H,M] (shared) or [B,H,M]
  int64_t inv_k_sb;    // its batch stride: 0 (shared) or H*M
  void* out;
  void* attn;          // the weights [B,H,N,M] (forward: written; backward: their gradient), or null
  int64_t q_strides[4], k_strides[4], v_strides[4], o_strides[4], a_strides[4];
  int64_t B, H, N, D, Dv;
  int M, kind;
  float eps;
};

// One warp per query row. Requires B*H*N / 8 < 2^31 blocks.
cudaError_t launch_prototype_attention(ElementType dtype, const ProtoAttnArgs& args, cudaStream_t stream);

// Its backward: `fwd` as for the forward with `out` / `o_strides` holding grad_out; dq like q (element strides);
// dk [B,H,M,D], dv [B,H,M,Dv] and ds [B,H] float32 contiguous and zeroed, added into.
struct ProtoAttnBwdArgs {
  ProtoAttnArgs fwd;
  void* dq;
  int64_t dq_strides[4];
  float* dk;
  float* dv;
  float* ds;
};

// One block per (sample * head, tile of kProtoBwdQueries queries), one warp per query; the block sums its
// prototype gradients in M*(D+Dv) floats of shared memory (proto_backward_shared_bytes), then adds them to
// global memory. Requires B*H < 2^31 and N / kProtoBwdQueries < 65536.
constexpr int kProtoBwdQueries = 128;
inline size_t proto_backward_shared_bytes(const ProtoAttnArgs& a) {
  return size_t(a.M) * size_t(a.D + a.Dv) * sizeof(float);
}
cudaError_t launch_prototype_attention_backward(ElementType dtype, const ProtoAttnBwdArgs& args, cudaStream_t stream);

// ---- Linear attention forward, output pass (kernels/linear_attention.cu; per-query routine in
// kernels/linear_attention_row.h). Element strides of q [B,H,N,D] and out [B,H,N,Dv]; state [B,H,D,Dv] and
// ksum [B,H,D] float32 contiguous; phi 0 = elu+1, 1 = relu.
struct LinAttnArgs {
  const void* q;
  void* out;
  const float* state;
  const float* ksum;
  int64_t q_strides[4], o_strides[4];
  int64_t B, H, N, D, Dv;
  int phi;
  float eps;
};

// One warp per query. Requires B*H*N / 8 < 2^31 blocks.
cudaError_t launch_linear_attention(ElementType dtype, const LinAttnArgs& args, cudaStream_t stream);

// ---- Linear attention backward (the per-row routines of kernels/linear_attention_row.h). Queries' pass:
// `fwd` as for the forward (q, state, ksum, sizes; `out` unused) with g [B,H,Nq,Dv] and dq (element strides),
// writing a = r phi(q) [B,H,Nq,D] and w = out·g [B,H,Nq] float32 contiguous.
struct LinAttnBwdQueryArgs {
  LinAttnArgs fwd;
  const void* g;
  void* dq;
  int64_t g_strides[4], dq_strides[4];
  float* a;
  float* w;
};
// One warp per query. Requires B*H*Nq / 8 < 2^31 blocks.
cudaError_t launch_linear_attention_backward_queries(ElementType dtype, const LinAttnBwdQueryArgs& args,
                                                     cudaStream_t stream);

// Keys' pass: from dS [B,H,D,Dv] and dz [B,H,D] float32 contiguous, dk [B,H,Nk,D] and dv [B,H,Nk,Dv] (element
// strides of k, v, dk, dv).
struct LinAttnBwdKeyArgs {
  const void* k;
  const void* v;
  void* dk;
  void* dv;
  const float* dstate;
  const float* dksum;
  int64_t k_strides[4], v_strides[4], dk_strides[4], dv_strides[4];
  int64_t B, H, N, D, Dv;
  int phi;
};
// One warp per key. Requires B*H*Nk / 8 < 2^31 blocks.
cudaError_t launch_linear_attention_backward_keys(ElementType dtype, const LinAttnBwdKeyArgs& args,
                                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace fastproto
