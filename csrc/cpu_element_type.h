// The CPU kernels' element-type dispatch (the CUDA host wrappers' counterpart is csrc/cuda/element_type.h).
#pragma once
#include <ATen/ATen.h>

namespace fastproto {

// f(T{}) with T the element type of a float32 / float16 / bfloat16 tensor: float, at::Half or at::BFloat16.
template <typename F>
void with_cpu_element_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      return f(float{});  // the callers checked: float32
  }
}

}  // namespace fastproto
