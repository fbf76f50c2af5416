// CRC32C (Castagnoli): the payload and header checksum of tensor frames.
#pragma once
#include <cstddef>
#include <cstdint>

namespace tl {

// Extends `crc` (the result of an earlier call, or 0 to start) over n bytes. Uses the SSE4.2 crc32
// instruction on three interleaved lanes where the CPU has it, slicing-by-8 tables otherwise.
uint32_t crc32c(uint32_t crc, const void* data, size_t n);

// Same result, always the portable table path: lets tests check both paths against each other.
uint32_t crc32c_portable(uint32_t crc, const void* data, size_t n);

bool crc32c_uses_hardware();

}  // namespace tl
