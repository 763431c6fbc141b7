// Argument checks shared by the CPU and CUDA host code of the curve ops.
#pragma once
#include <ATen/ATen.h>

namespace fastproto {

// Binary masks [B,H,W] (bool, contiguous) on the kernel's device, with images addressable in 32 bits.
inline void check_masks(const at::Tensor& masks, at::DeviceType device) {
  TORCH_CHECK(masks.dim() == 3, "masks must be [B,H,W], got ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool, "masks must be bool, got ", masks.scalar_type());
  TORCH_CHECK(masks.is_contiguous(), "masks must be contiguous");
  TORCH_CHECK(masks.device().type() == device, "masks must be on ", device, " for this kernel, got ", masks.device());
  TORCH_CHECK(masks.size(1) * masks.size(2) < (int64_t(1) << 31), "an image of ", masks.size(1), "x",
              masks.size(2), " pixels is too large");
}

inline void check_connectivity(int64_t connectivity) {
  TORCH_CHECK(connectivity == 4 || connectivity == 8, "connectivity must be 4 or 8, got ", connectivity);
}

// Arguments of split_pixels: float32 maps matching the masks in shape and device.
inline void check_split(const at::Tensor& maps, const at::Tensor& masks, int64_t connectivity, at::DeviceType device) {
  check_masks(masks, device);
  TORCH_CHECK(maps.dim() == 3 && maps.scalar_type() == at::kFloat && maps.is_contiguous(),
              "anomaly maps must be contiguous float32 [B,H,W]");
  TORCH_CHECK(maps.device() == masks.device(), "anomaly maps must be on the same device as masks, got ",
              maps.device(), " and ", masks.device());
  TORCH_CHECK(maps.sizes() == masks.sizes(), "anomaly maps ", maps.sizes(), " and masks ", masks.sizes(),
              " differ in shape");
  check_connectivity(connectivity);
}

inline void check_histograms(const at::Tensor& neg_hist, const at::Tensor& pos_hist, const at::Tensor& weight_hist,
                             const at::Tensor& page_base, const at::Tensor& page_shift, int64_t prefix_bits) {
  TORCH_CHECK(prefix_bits >= 1 && prefix_bits <= 24, "prefix_bits must be in [1, 24], got ", prefix_bits);
  const int64_t nb = neg_hist.numel();
  TORCH_CHECK(neg_hist.scalar_type() == at::kLong && neg_hist.is_contiguous() && neg_hist.dim() == 1,
              "neg_hist must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(pos_hist.scalar_type() == at::kLong && pos_hist.is_contiguous() && pos_hist.numel() == nb,
              "pos_hist must be contiguous int64 with as many bins as neg_hist");
  TORCH_CHECK(weight_hist.scalar_type() == at::kDouble && weight_hist.is_contiguous() && weight_hist.numel() == nb,
              "weight_hist must be contiguous float64 with as many bins as neg_hist");
  const int64_t pages = int64_t(1) << prefix_bits;
  for (const auto* t : {&page_base, &page_shift})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == pages,
                "page_base and page_shift must be contiguous int64 with 2**prefix_bits entries");
  // Every page must map inside the histograms (checked on a host copy: 2**prefix_bits entries).
  auto base = page_base.cpu(), shift = page_shift.cpu();
  const int64_t* b = base.data_ptr<int64_t>();
  const int64_t* s = shift.data_ptr<int64_t>();
  const int64_t low_bits = 32 - prefix_bits;
  for (int64_t h = 0; h < pages; ++h) {
    TORCH_CHECK(s[h] >= 0 && s[h] <= low_bits, "page ", h, " has shift ", s[h], " outside [0, ", low_bits, "]");
    TORCH_CHECK(b[h] >= 0 && b[h] + (int64_t(1) << (low_bits - s[h])) <= nb, "page ", h, " maps outside the histograms");
  }
}

}  // namespace fastproto
