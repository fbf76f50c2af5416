// Blockwise absmax 8-bit quantization of float32 data (activations and gradients on the wire).
//
// Each block of `block` values gets scale = absmax / 127 and q = round(x / scale) in [-127, 127], so
// |x - q * scale| <= absmax / 254 * (1 + 2^-13): half a step, plus three float32 roundings (the scale,
// x * (127 / absmax), and q * scale), which together stay under 2^-13 of half a step. The scale is
// rounded down where needed so that 127 * scale never overflows (absmax = FLT_MAX stays finite). A
// block whose absmax is below
// kTinyAbsmax (1e-30, where 127 / absmax would overflow float32 precision) is sent as zeros with scale 0,
// so its error is at most 1e-30.
#pragma once
#include <cstddef>
#include <cstdint>

namespace tl {

constexpr float kTinyAbsmax = 1e-30f;

// Writes ceil(n / block) scales and n values. Returns the index of the first block holding a NaN or an
// infinity (its values are left unwritten) or -1 when every value was finite.
int64_t quantize_int8(const float* x, size_t n, size_t block, float* scales, int8_t* q);

void dequantize_int8(const int8_t* q, const float* scales, size_t n, size_t block, float* out);

}  // namespace tl
