// The tensor frame header: a fixed 128-byte little-endian record in front of every payload.
//
//   off  size  field
//     0     4  magic "TLFR"
//     4     2  version (1)
//     6     1  dtype code (DType)
//     7     1  compression code (Compression)
//     8     1  ndim (0..8)
//     9     3  reserved, must be zero
//    12     4  block size of Int8Block compression, else 0
//    16     8  payload length in bytes
//    24    16  job id
//    40     8  step
//    48     4  micro-batch
//    52     4  stage
//    56     4  CRC32C of the payload
//    60     4  CRC32C of the header (bytes 0..59 and 64..127)
//    64    64  shape: 8 x int64, unused dims zero
//
// A fixed size means a receiver reads exactly one header before it knows how much payload follows, and
// the header's own checksum means no length is trusted before it has been checked.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace tl {

constexpr size_t kHeaderSize = 128;
constexpr int kMaxNdim = 8;
constexpr uint16_t kFrameVersion = 1;
constexpr uint32_t kMaxBlockSize = 1u << 24;
constexpr int64_t kMaxDim = int64_t{1} << 48;

enum class DType : uint8_t {
  Float32 = 1, Float16 = 2, BFloat16 = 3, Float64 = 4,
  Int64 = 5, Int32 = 6, Int16 = 7, Int8 = 8, UInt8 = 9, Bool = 10,
};
enum class Compression : uint8_t { None = 0, CastBF16 = 1, CastFP16 = 2, Int8Block = 3 };

struct DTypeInfo {
  DType code;
  const char* name;  // torch's name for it
  uint8_t itemsize;
  bool floating;
};
// The fixed table; a code not in it is refused.
const DTypeInfo* dtype_info(uint8_t code);
const DTypeInfo* dtype_table(size_t* count);
const char* compression_name(uint8_t code);

struct FrameHeader {
  uint8_t dtype = 0;
  uint8_t compression = 0;
  uint8_t ndim = 0;
  uint32_t block_size = 0;
  uint64_t payload_len = 0;
  uint8_t job[16] = {};
  uint64_t step = 0;
  uint32_t micro_batch = 0;
  uint32_t stage = 0;
  uint32_t payload_crc = 0;
  int64_t shape[kMaxNdim] = {};

  uint64_t numel() const;  // only valid after validate()
};

// Bytes of payload that a header with these fields must carry; throws WireError on overflow or on a
// compression that the dtype does not allow.
uint64_t expected_payload_len(uint8_t dtype, uint8_t compression, uint64_t numel, uint32_t block_size);

// Checks every field (codes from the tables, ndim, dims, reserved bits, exact payload length, cap).
void validate(const FrameHeader& h, uint64_t max_payload);

// Validates, then writes kHeaderSize bytes with the header checksum.
void encode_header(const FrameHeader& h, uint8_t* out, uint64_t max_payload);

// Checks magic, version, header checksum and every field; throws WireError naming the first problem.
FrameHeader decode_header(const uint8_t* p, size_t n, uint64_t max_payload);

}  // namespace tl
