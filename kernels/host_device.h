// Shared by the routines that both the CPU kernels (csrc/*.cpp, g++) and the CUDA kernels (kernels/*.cu,
// nvcc) run: the host/device qualifiers, and the one-thread helpers the CPU kernels pass to them.
#pragma once

#if defined(__CUDACC__)
#define FASTPROTO_HD __host__ __device__ __forceinline__
// before a host/device template that calls the device-only methods of its CUDA instantiation's arguments
#define FASTPROTO_HD_TEMPLATE _Pragma("nv_exec_check_disable")
// before a loop of compile-time trip count whose copies must index a register array by constants
#define FASTPROTO_UNROLL _Pragma("unroll")
#else
#define FASTPROTO_HD inline
#define FASTPROTO_HD_TEMPLATE
#define FASTPROTO_UNROLL
#endif

namespace fastproto {

// A group of one thread (the CPU kernels): its partial sums are the sums, its values need no broadcast,
// elements convert by casts.
struct OneThreadSum {
  float operator()(float v) const { return v; }
};
struct OneThreadBcast {
  float operator()(float v, int) const { return v; }
};
struct CastToFloat {
  template <typename T>
  float operator()(T v) const { return static_cast<float>(v); }
};
struct CastFromFloat {
  template <typename T>
  void operator()(T& dst, float v) const { dst = static_cast<T>(v); }
};

}  // namespace fastproto
