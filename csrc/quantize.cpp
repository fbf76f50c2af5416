#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace tl {
namespace {

// The hot loops are compiled twice and picked at load time: AVX2 where the CPU has it, baseline
// x86-64 otherwise. Absmax works on the float bits: |x| as an unsigned integer orders like |x|, and any
// NaN or infinity compares at or above 0x7f800000, so one integer max finds both.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TL_CLONES
#endif

TL_CLONES uint32_t absmax_bits(const float* x, size_t n) {
  uint32_t m = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7FFFFFFFu;
    m = b > m ? b : m;
  }
  return m;
}

TL_CLONES void quantize_block(const float* x, size_t n, float inv, int8_t* q) {
  for (size_t i = 0; i < n; ++i) {
    float v = std::nearbyint(x[i] * inv);
    v = std::min(127.0f, std::max(-127.0f, v));
    q[i] = static_cast<int8_t>(v);
  }
}

TL_CLONES void dequantize_block(const int8_t* q, size_t n, float scale, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]) * scale;
}

}  // namespace

int64_t quantize_int8(const float* x, size_t n, size_t block, float* scales, int8_t* q) {
  size_t nblocks = n / block + (n % block != 0);
  for (size_t b = 0; b < nblocks; ++b) {
    size_t start = b * block, len = std::min(block, n - start);
    uint32_t bits = absmax_bits(x + start, len);
    if (bits >= 0x7F800000u) return static_cast<int64_t>(b);
    float absmax;
    std::memcpy(&absmax, &bits, 4);
    if (absmax < kTinyAbsmax) {
      scales[b] = 0.0f;
      std::memset(q + start, 0, len);
      continue;
    }
    float scale = absmax / 127.0f;
    if (std::isinf(scale * 127.0f)) scale = std::nextafter(scale, 0.0f);  // absmax near FLT_MAX
    scales[b] = scale;
    quantize_block(x + start, len, 127.0f / absmax, q + start);
  }
  return -1;
}

void dequantize_int8(const int8_t* q, const float* scales, size_t n, size_t block, float* out) {
  size_t nblocks = n / block + (n % block != 0);
  for (size_t b = 0; b < nblocks; ++b) {
    size_t start = b * block;
    dequantize_block(q + start, std::min(block, n - start), scales[b], out + start);
  }
}

}  // namespace tl
