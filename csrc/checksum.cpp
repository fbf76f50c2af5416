#include "checksum.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define TL_X86 1
#endif

namespace tl {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// Portable path: slicing-by-8 tables. kTables[0] is the classic byte-at-a-time table.
struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};
const Tables& tables() {
  static const Tables tabs;
  return tabs;
}

// Raw register update (no pre/post inversion).
uint32_t raw_portable(uint32_t reg, const uint8_t* p, size_t n) {
  const auto& t = tables().t;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    reg = (reg >> 8) ^ t[0][(reg ^ *p++) & 0xFF];
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= reg;
    reg = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
          t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) reg = (reg >> 8) ^ t[0][(reg ^ *p++) & 0xFF];
  return reg;
}

#ifdef TL_X86
// Lane length for the interleaved hardware path. Three lanes hide the 3-cycle latency of crc32.
constexpr size_t kLane = 8192;

// "Append kLane zero bytes to a raw register" is linear over GF(2). It is built once by pushing each
// of the 32 basis registers through kLane zero bytes, then tabulated per input byte so that applying
// it costs four lookups.
struct LaneShift {
  uint32_t t[4][256];
  LaneShift() {
    uint32_t basis[32];
    static const uint8_t zeros[kLane] = {};
    for (int b = 0; b < 32; ++b) basis[b] = raw_portable(1u << b, zeros, kLane);
    for (int k = 0; k < 4; ++k)
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t acc = 0;
        for (int j = 0; j < 8; ++j)
          if (v & (1u << j)) acc ^= basis[8 * k + j];
        t[k][v] = acc;
      }
  }
  uint32_t apply(uint32_t reg) const {
    return t[0][reg & 0xFF] ^ t[1][(reg >> 8) & 0xFF] ^ t[2][(reg >> 16) & 0xFF] ^ t[3][reg >> 24];
  }
};
const LaneShift& lane_shift() {
  static const LaneShift s;
  return s;
}

__attribute__((target("sse4.2"))) uint32_t raw_hardware(uint32_t reg, const uint8_t* p, size_t n) {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    reg = _mm_crc32_u8(reg, *p++);
    --n;
  }
  if (n >= 3 * kLane) {
    const LaneShift& shift = lane_shift();
    while (n >= 3 * kLane) {
      uint64_t r0 = reg, r1 = 0, r2 = 0;
      for (size_t i = 0; i < kLane; i += 8) {
        uint64_t a, b, c;
        std::memcpy(&a, p + i, 8);
        std::memcpy(&b, p + kLane + i, 8);
        std::memcpy(&c, p + 2 * kLane + i, 8);
        r0 = _mm_crc32_u64(r0, a);
        r1 = _mm_crc32_u64(r1, b);
        r2 = _mm_crc32_u64(r2, c);
      }
      reg = shift.apply(static_cast<uint32_t>(r0)) ^ static_cast<uint32_t>(r1);
      reg = shift.apply(reg) ^ static_cast<uint32_t>(r2);
      p += 3 * kLane;
      n -= 3 * kLane;
    }
  }
  uint64_t r = reg;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    r = _mm_crc32_u64(r, w);
    p += 8;
    n -= 8;
  }
  reg = static_cast<uint32_t>(r);
  while (n--) reg = _mm_crc32_u8(reg, *p++);
  return reg;
}

bool detect_sse42() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}
#endif

}  // namespace

bool crc32c_uses_hardware() {
#ifdef TL_X86
  static const bool has = detect_sse42();
  return has;
#else
  return false;
#endif
}

uint32_t crc32c_portable(uint32_t crc, const void* data, size_t n) {
  return ~raw_portable(~crc, static_cast<const uint8_t*>(data), n);
}

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
#ifdef TL_X86
  if (crc32c_uses_hardware()) return ~raw_hardware(~crc, static_cast<const uint8_t*>(data), n);
#endif
  return crc32c_portable(crc, data, n);
}

}  // namespace tl
