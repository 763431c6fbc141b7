// Operator schemas of the fastproto extension and the Python module object.
// Kernels register themselves per dispatch key: CPU in csrc/*.cpp, CUDA in csrc/cuda/*.cpp.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastproto, m) {
  // Connected components of binary masks [B,H,W] (bool/uint8), per image, labels 1..K (0 = background).
  m.def("connected_components(Tensor masks, int connectivity) -> Tensor");
  // Splits maps [B,H,W] float32 by masks [B,H,W] bool into normal-pixel scores, anomalous-pixel scores
  // and the size of the connected region each anomalous pixel belongs to; also the number of regions.
  m.def("split_pixels(Tensor maps, Tensor masks, int connectivity) -> (Tensor, Tensor, Tensor, Tensor)");
  // For distinct ascending float32 values U[G], counts the normal scores equal to each U[g] (eq[G])
  // and those strictly inside each gap (gap[G+1]: gap[0] below U[0], gap[G] above U[G-1]).
  m.def("count_negatives(Tensor[] scores, Tensor values) -> (Tensor, Tensor)");
  // Adds scores into a paged histogram of the monotone float32 key: the top `prefix_bits` bits select a
  // page h, whose bins start at page_base[h]; the bin inside the page is the key's remaining low bits
  // shifted right by page_shift[h] (a page with shift 32 - prefix_bits is one bin). neg_hist/pos_hist count
  // normal/anomalous scores (int64), weight_hist sums 1/pos_size (float64).
  m.def("histogram_update(Tensor(a!) neg_hist, Tensor(b!) pos_hist, Tensor(c!) weight_hist, Tensor page_base, "
        "Tensor page_shift, Tensor neg_scores, Tensor pos_scores, Tensor pos_sizes, int prefix_bits) -> ()");
  // Batched log-domain Sinkhorn (fastproto/reference/sinkhorn.py, one problem per thread / thread block):
  // cost [B,N,K] (K <= 64), float32 log-marginals log_a [B,N] and log_b [B,K]; writes the plan (cost's
  // dtype), loss [B] float32 and the g-updates made, iters [B] int32.
  m.def("sinkhorn_solve(Tensor cost, Tensor log_a, Tensor log_b, float eps, int n_iters, float tol, "
        "Tensor(a!) plan, Tensor(b!) loss, Tensor(c!) iters) -> ()");
  // Nearest prototype by cosine distance (fastproto/reference/prototype.py): x [B,N,C], prototypes [M,C],
  // [B,M,C] or (per_location) [N,M,C]; writes min_m (1 - cos) into dist [B,N] float32 and the argmin
  // (ties: lowest index; NaN wins, as torch.min) into index [B,N] int64.
  m.def("route_nearest(Tensor x, Tensor prototypes, bool per_location, float eps, Tensor(a!) dist, "
        "Tensor(b!) index) -> ()");
  // Prototype attention forward (fastproto/reference/prototype.py): q [B,H,N,D], k [B,H,M,D] or shared
  // [H,M,D], v like k with Dv, per-head scale [H] float32, kind 0 = relu_cos, 1 = softmax, 2 = cos_softmax
  // (route soft), 3 = linear (route linear) (eps: the norm floor of kinds 0 and 2); writes out [B,H,N,Dv] in
  // q's dtype and, when given, the weights attn [B,H,N,M].
  m.def("prototype_attention_forward(Tensor q, Tensor k, Tensor v, Tensor scale, int kind, float eps, "
        "Tensor(a!) out, Tensor(b!)? attn) -> ()");
  // Its backward for grad_out [B,H,N,Dv] and, when the weights were an output, grad_attn [B,H,N,M] (q's
  // dtype): writes grad_q [B,H,N,D] (q's dtype) and float32 per-sample sums grad_k [B,H,M,D] (of
  // d(k / max(||k||, eps)) for kinds 0 and 2, whose normalisation backward is left to the caller; of dk
  // otherwise), grad_v [B,H,M,Dv] and grad_scale [B,H].
  m.def("prototype_attention_backward(Tensor q, Tensor k, Tensor v, Tensor scale, Tensor grad_out, "
        "Tensor? grad_attn, int kind, float eps, Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v, "
        "Tensor(d!) grad_scale) -> ()");
  // Linear attention forward (fastproto/reference/linear_attention.py): q [B,H,Nq,D], k [B,H,Nk,D],
  // v [B,H,Nk,Dv], phi 0 = elu+1, 1 = relu; writes out [B,H,Nq,Dv] (q's dtype), the float32 kv state
  // [B,H,D,Dv] and key sum [B,H,D].
  m.def("linear_attention_forward(Tensor q, Tensor k, Tensor v, int phi, float eps, Tensor(a!) out, "
        "Tensor(b!) state, Tensor(c!) ksum) -> ()");
  // Its backward from the forward's state and ksum and grad_out [B,H,Nq,Dv]: writes grad_q, grad_k, grad_v
  // (like q, k, v).
  m.def("linear_attention_backward(Tensor q, Tensor k, Tensor v, Tensor state, Tensor ksum, Tensor grad_out, "
        "int phi, float eps, Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef FASTPROTO_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
#ifdef _OPENMP
  m.attr("WITH_OPENMP") = true;
#else
  m.attr("WITH_OPENMP") = false;
#endif
}
