// CUDA implementations of count_negatives and histogram_update: argument checks and the launches of
// kernels/curves.cu on the current stream. Counts equal the CPU kernels' (csrc/curves.cpp) exactly;
// histogram weights are float64 atomic sums, equal up to summation order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "fastproto_kernels.h"

namespace fastproto {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kFloat && t.is_contiguous() && t.is_cuda(), name,
              " must be a contiguous 1-D float32 CUDA tensor");
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, ", got ", t.device(),
              " and ", ref.device());
}

// Unlike the CPU kernel, this does not verify that `values` is distinct and ascending: that would
// cost a host sync. The callers pass torch.unique_consecutive of sorted scores.
std::tuple<at::Tensor, at::Tensor> count_negatives_cuda(at::TensorList scores, const at::Tensor& values) {
  check_scores(values, "values");
  const int64_t G = values.numel();
  TORCH_CHECK(G < (int64_t(1) << 31) - 1, "values must have fewer than 2^31 - 1 entries, got ", G);
  std::vector<const float*> chunks;
  std::vector<int64_t> sizes;
  for (const auto& t : scores) {
    check_scores(t, "scores");
    check_device(t, values, "scores", "values");
    if (t.numel() == 0) continue;
    chunks.push_back(t.data_ptr<float>());
    sizes.push_back(t.numel());
  }
  const c10::cuda::CUDAGuard guard(values.device());
  auto opts = values.options().dtype(at::kLong);
  auto eq = at::zeros({G}, opts);
  auto gap = at::zeros({G + 1}, opts);
  check_launch(cuda::launch_count_negatives(chunks.data(), sizes.data(), int64_t(chunks.size()),
                                            values.data_ptr<float>(), G, eq.data_ptr<int64_t>(),
                                            gap.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()),
               "count_negatives");
  return {eq, gap};
}

// check_histograms validates the page tables on a host copy (one sync): a page mapping outside the
// histograms would make the kernel write out of bounds.
void histogram_update_cuda(at::Tensor neg_hist, at::Tensor pos_hist, at::Tensor weight_hist,
                           const at::Tensor& page_base, const at::Tensor& page_shift, const at::Tensor& neg,
                           const at::Tensor& pos, const at::Tensor& sizes, int64_t prefix_bits) {
  check_histograms(neg_hist, pos_hist, weight_hist, page_base, page_shift, prefix_bits);
  check_scores(neg, "neg_scores");
  check_scores(pos, "pos_scores");
  TORCH_CHECK(sizes.scalar_type() == at::kInt && sizes.numel() == pos.numel() && sizes.is_contiguous(),
              "pos_sizes must be contiguous int32 with one entry per anomalous score");
  TORCH_CHECK(neg_hist.is_cuda(), "neg_hist must be on CUDA");
  check_device(pos_hist, neg_hist, "pos_hist", "neg_hist");
  check_device(weight_hist, neg_hist, "weight_hist", "neg_hist");
  check_device(page_base, neg_hist, "page_base", "neg_hist");
  check_device(page_shift, neg_hist, "page_shift", "neg_hist");
  check_device(neg, neg_hist, "neg_scores", "neg_hist");
  check_device(pos, neg_hist, "pos_scores", "neg_hist");
  check_device(sizes, neg_hist, "pos_sizes", "neg_hist");
  const c10::cuda::CUDAGuard guard(neg_hist.device());
  check_launch(cuda::launch_histogram_update(neg.data_ptr<float>(), neg.numel(), pos.data_ptr<float>(),
                                             sizes.data_ptr<int32_t>(), pos.numel(), page_base.data_ptr<int64_t>(),
                                             page_shift.data_ptr<int64_t>(), int(prefix_bits),
                                             neg_hist.data_ptr<int64_t>(), pos_hist.data_ptr<int64_t>(),
                                             weight_hist.data_ptr<double>(), at::cuda::getCurrentCUDAStream()),
               "histogram_update");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) {
  m.impl("count_negatives", &count_negatives_cuda);
  m.impl("histogram_update", &histogram_update_cuda);
}

}  // namespace fastproto
