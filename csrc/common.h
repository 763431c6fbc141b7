// Helpers shared by the CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>

namespace fastproto {

// Monotone unsigned image of a float32: a < b (as floats) <=> key(a) < key(b).
// -0.0 is mapped to +0.0 first, so the two zeros are one tie, as in a float comparison.
inline uint32_t float_key(float x) {
  x += 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace fastproto
