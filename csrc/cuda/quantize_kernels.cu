// Blockwise int8 (de)quantization on the GPU, the same arithmetic as quantize.cpp, so activations can
// be compressed before they cross PCIe. One thread block per quantization block.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_api.h"

namespace tl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kTinyAbsmax = 1e-30f;  // same rule as the host path (quantize.h)

__global__ void quantize_kernel(const float* __restrict__ x, size_t n, size_t block, float* __restrict__ scales,
                                int8_t* __restrict__ q) {
  const size_t start = blockIdx.x * block;
  const size_t len = min(block, n - start);
  // absmax over float bits: non-finite values compare >= 0x7f800000
  unsigned int m = 0;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) m = max(m, __float_as_uint(x[start + i]) & 0x7FFFFFFFu);
  for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_down_sync(0xFFFFFFFFu, m, off));
  __shared__ unsigned int warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int all = 0;
    for (int w = 0; w < kThreads / 32; ++w) all = max(all, warp_max[w]);
    warp_max[0] = all;
  }
  __syncthreads();
  const unsigned int bits = warp_max[0];
  if (bits >= 0x7F800000u) {
    if (threadIdx.x == 0) scales[blockIdx.x] = __uint_as_float(0x7FC00000u);  // NaN marks the bad block
    return;
  }
  const float absmax = __uint_as_float(bits);
  const bool tiny = absmax < kTinyAbsmax;
  if (threadIdx.x == 0) {
    float scale = tiny ? 0.0f : absmax / 127.0f;
    if (isinf(scale * 127.0f)) scale = nextafterf(scale, 0.0f);  // same rule as the host path
    scales[blockIdx.x] = scale;
  }
  const float inv = tiny ? 0.0f : 127.0f / absmax;
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
    float v = nearbyintf(x[start + i] * inv);
    q[start + i] = static_cast<int8_t>(fminf(127.0f, fmaxf(-127.0f, v)));
  }
}

__global__ void dequantize_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales, size_t n,
                                  size_t block, float* __restrict__ out) {
  const size_t start = blockIdx.x * block;
  const size_t len = min(block, n - start);
  const float s = scales[blockIdx.x];
  for (size_t i = threadIdx.x; i < len; i += blockDim.x) out[start + i] = static_cast<float>(q[start + i]) * s;
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

void quantize_int8(const float* x, size_t n, size_t block, float* scales, int8_t* q, uintptr_t stream) {
  if (n == 0) return;
  const size_t blocks = (n + block - 1) / block;
  quantize_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      x, n, block, scales, q);
  check_launch("int8 quantize kernel");
}

void dequantize_int8(const int8_t* q, const float* scales, size_t n, size_t block, float* out, uintptr_t stream) {
  if (n == 0) return;
  const size_t blocks = (n + block - 1) / block;
  dequantize_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      q, scales, n, block, out);
  check_launch("int8 dequantize kernel");
}

}  // namespace tl::cuda
