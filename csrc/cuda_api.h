// The small CUDA runtime surface the host code uses. In a build without CUDA every call reports "no GPU",
// so callers need no #ifdefs of their own.
#pragma once
#include <cstddef>
#include <cstdint>

namespace tl::cuda {

#ifdef TENSORLINK_WITH_CUDA
constexpr bool kCompiled = true;
// Asks the driver once; false on machines without a driver or a device.
bool available();
int device_count();
// Page-locks host memory for fast, asynchronous copies; false if that failed.
bool host_register(void* ptr, size_t nbytes);
void host_unregister(void* ptr);
// Blockwise int8 (de)quantization of device memory on `stream` (a cudaStream_t as an integer).
// Non-finite blocks get a NaN scale; the caller checks the scales.
void quantize_int8(const float* x, size_t n, size_t block, float* scales, int8_t* q, uintptr_t stream);
void dequantize_int8(const int8_t* q, const float* scales, size_t n, size_t block, float* out, uintptr_t stream);
#else
constexpr bool kCompiled = false;
inline bool available() { return false; }
inline int device_count() { return 0; }
inline bool host_register(void*, size_t) { return false; }
inline void host_unregister(void*) {}
#endif

}  // namespace tl::cuda
