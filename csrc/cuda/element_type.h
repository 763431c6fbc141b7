// The kernels' element type of a float32 / float16 / bfloat16 tensor (host wrappers of the CUDA kernels).
#pragma once
#include <ATen/core/Tensor.h>

#include "fastproto_kernels.h"

namespace fastproto {

inline cuda::ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::ElementType::kHalf;
    case at::kBFloat16:
      return cuda::ElementType::kBFloat16;
    default:
      return cuda::ElementType::kFloat32;  // the callers checked: float32
  }
}

}  // namespace fastproto
