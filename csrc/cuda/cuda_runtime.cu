// Host-side CUDA runtime calls: device discovery and page-locking of pool buffers.
#include <cuda_runtime.h>

#include "cuda_api.h"

namespace tl::cuda {

int device_count() {
  static const int count = [] {
    int n = 0;
    // Without a driver or a device this returns an error; that simply means "no GPU here".
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky error so later calls start clean
      return 0;
    }
    return n;
  }();
  return count;
}

bool available() { return device_count() > 0; }

bool host_register(void* ptr, size_t nbytes) {
  if (!available()) return false;
  if (cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

void host_unregister(void* ptr) {
  if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();
}

}  // namespace tl::cuda
