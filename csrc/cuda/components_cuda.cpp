// CUDA implementations of connected_components and split_pixels: argument checks, scratch tensors,
// prefix sums (torch) and the launches of kernels/components.cu, all on the current stream. Outputs
// equal the CPU kernels' (csrc/components.cpp) exactly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "fastproto_kernels.h"

namespace fastproto {
namespace {

constexpr int64_t kInt32Limit = int64_t(1) << 31;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor connected_components_cuda(const at::Tensor& masks, int64_t connectivity) {
  check_masks(masks, at::kCUDA);
  check_connectivity(connectivity);
  const int64_t B = masks.size(0), H = masks.size(1), W = masks.size(2);
  const c10::cuda::CUDAGuard guard(masks.device());
  auto labels = at::empty({B, H, W}, masks.options().dtype(at::kInt));
  if (labels.numel() == 0) return labels;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool* m = masks.data_ptr<bool>();
  auto parent = at::empty({B, H, W}, labels.options());
  int32_t* par = parent.data_ptr<int32_t>();
  // The root flags go to `labels`, which the relabel kernel then overwrites.
  check_launch(cuda::launch_cc_roots(m, par, labels.data_ptr<int32_t>(), B, H, W, int(connectivity), stream),
               "connected_components");
  // One flat scan (CUB) over the batch; int32 unless the batch has 2^31 pixels or more.
  const bool narrow = labels.numel() < kInt32Limit;
  const auto ranks = at::cumsum(labels.view({-1}), 0, narrow ? at::kInt : at::kLong);
  check_launch(narrow ? cuda::launch_cc_relabel(m, par, ranks.data_ptr<int32_t>(), labels.data_ptr<int32_t>(), B, H,
                                                W, stream)
                      : cuda::launch_cc_relabel(m, par, ranks.data_ptr<int64_t>(), labels.data_ptr<int32_t>(), B, H,
                                                W, stream),
               "connected_components");
  return labels;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_pixels_cuda(const at::Tensor& maps,
                                                                                const at::Tensor& masks,
                                                                                int64_t connectivity) {
  check_split(maps, masks, connectivity, at::kCUDA);
  const int64_t B = maps.size(0), H = maps.size(1), W = maps.size(2);
  const int64_t total = B * H * W;
  const c10::cuda::CUDAGuard guard(masks.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Output positions of the anomalous pixels; their count is the one host sync (it sizes the outputs).
  const bool narrow = total < kInt32Limit;
  const auto pos_rank = at::cumsum(masks.view({-1}), 0, narrow ? at::kInt : at::kLong);
  const int64_t P = total > 0 ? pos_rank[total - 1].item<int64_t>() : 0;
  const auto opts = maps.options();
  auto n_regions = at::zeros({}, opts.dtype(at::kLong));
  if (P == 0) return {maps.reshape({-1}).clone(), at::empty({0}, opts), at::empty({0}, opts.dtype(at::kInt)), n_regions};

  auto neg = at::empty({total - P}, opts);
  auto pos = at::empty({P}, opts);
  auto sizes = at::empty({P}, opts.dtype(at::kInt));
  auto parent = at::empty({total}, opts.dtype(at::kInt));
  auto area = at::zeros({total}, opts.dtype(at::kInt));
  const bool* m = masks.data_ptr<bool>();
  int32_t* par = parent.data_ptr<int32_t>();
  check_launch(cuda::launch_cc_areas(m, par, area.data_ptr<int32_t>(),
                                     reinterpret_cast<unsigned long long*>(n_regions.data_ptr<int64_t>()), B, H, W,
                                     int(connectivity), stream),
               "split_pixels");
  const float* s = maps.data_ptr<float>();
  const int32_t* a = area.data_ptr<int32_t>();
  float* negp = neg.data_ptr<float>();
  float* posp = pos.data_ptr<float>();
  int32_t* sizep = sizes.data_ptr<int32_t>();
  check_launch(narrow ? cuda::launch_split_scatter(s, m, par, a, pos_rank.data_ptr<int32_t>(), negp, posp, sizep, B,
                                                   H, W, stream)
                      : cuda::launch_split_scatter(s, m, par, a, pos_rank.data_ptr<int64_t>(), negp, posp, sizep, B,
                                                   H, W, stream),
               "split_pixels");
  return {neg, pos, sizes, n_regions};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastproto, CUDA, m) {
  m.impl("connected_components", &connected_components_cuda);
  m.impl("split_pixels", &split_pixels_cuda);
}

}  // namespace fastproto
