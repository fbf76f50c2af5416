#include "frame_header.h"

#include <cstring>

#include "checksum.h"
#include "errors.h"

namespace tl {
namespace {

constexpr DTypeInfo kDTypes[] = {
    {DType::Float32, "float32", 4, true}, {DType::Float16, "float16", 2, true},
    {DType::BFloat16, "bfloat16", 2, true}, {DType::Float64, "float64", 8, true},
    {DType::Int64, "int64", 8, false},     {DType::Int32, "int32", 4, false},
    {DType::Int16, "int16", 2, false},     {DType::Int8, "int8", 1, false},
    {DType::UInt8, "uint8", 1, false},     {DType::Bool, "bool", 1, false},
};
constexpr char kMagic[4] = {'T', 'L', 'F', 'R'};

template <typename T>
void put(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof v);  // x86-64 and aarch64 are little-endian, as is the format
}
template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

uint32_t header_crc(const uint8_t* p) {
  uint32_t c = crc32c(0, p, 60);
  return crc32c(c, p + 64, 64);
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the frame format is little-endian and this code assumes a little-endian host"
#endif

const DTypeInfo* dtype_info(uint8_t code) {
  for (const auto& d : kDTypes)
    if (static_cast<uint8_t>(d.code) == code) return &d;
  return nullptr;
}

const DTypeInfo* dtype_table(size_t* count) {
  *count = sizeof kDTypes / sizeof kDTypes[0];
  return kDTypes;
}

const char* compression_name(uint8_t code) {
  switch (static_cast<Compression>(code)) {
    case Compression::None: return "none";
    case Compression::CastBF16: return "bf16";
    case Compression::CastFP16: return "fp16";
    case Compression::Int8Block: return "int8";
  }
  return nullptr;
}

uint64_t FrameHeader::numel() const {
  uint64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= static_cast<uint64_t>(shape[i]);
  return n;
}

uint64_t expected_payload_len(uint8_t dtype, uint8_t compression, uint64_t numel, uint32_t block_size) {
  const DTypeInfo* d = dtype_info(dtype);
  if (!d) throw WireError("unknown dtype code " + std::to_string(dtype));
  const char* cname = compression_name(compression);
  if (!cname) throw WireError("unknown compression code " + std::to_string(compression));
  uint64_t len = 0;
  switch (static_cast<Compression>(compression)) {
    case Compression::None:
      if (block_size != 0) throw WireError("block size must be 0 without int8 compression");
      if (mul_overflows(numel, d->itemsize, &len)) throw WireError("payload length overflows");
      return len;
    case Compression::CastBF16:
    case Compression::CastFP16:
      if (!d->floating || d->itemsize <= 2)
        throw WireError(std::string(cname) + " compression needs a float32 or float64 tensor, not " + d->name);
      if (block_size != 0) throw WireError("block size must be 0 without int8 compression");
      if (mul_overflows(numel, 2, &len)) throw WireError("payload length overflows");
      return len;
    case Compression::Int8Block: {
      if (!d->floating) throw WireError(std::string("int8 compression needs a floating dtype, not ") + d->name);
      if (block_size == 0 || block_size > kMaxBlockSize)
        throw WireError("int8 block size " + std::to_string(block_size) + " is outside 1.." +
                        std::to_string(kMaxBlockSize));
      uint64_t blocks = numel / block_size + (numel % block_size != 0);
      // scales (float32, one per block) first, so they stay 4-byte aligned, then the int8 values
      return blocks * 4 + numel;  // numel <= 2^48: cannot overflow
    }
  }
  throw WireError("unknown compression code " + std::to_string(compression));
}

void validate(const FrameHeader& h, uint64_t max_payload) {
  if (h.ndim > kMaxNdim)
    throw WireError("ndim " + std::to_string(h.ndim) + " exceeds the maximum of " + std::to_string(kMaxNdim));
  // The extent (product of the non-zero dims) is bounded too, not just the element count: a shape like
  // (0, 2^48, 2^48) holds no elements but would overflow stride arithmetic in any tensor library.
  uint64_t numel = 1, extent = 1;
  for (int i = 0; i < kMaxNdim; ++i) {
    int64_t dim = h.shape[i];
    if (i >= h.ndim) {
      if (dim != 0) throw WireError("shape slot " + std::to_string(i) + " beyond ndim is not zero");
      continue;
    }
    if (dim < 0 || dim > kMaxDim)
      throw WireError("dimension " + std::to_string(i) + " has size " + std::to_string(dim) + ", outside 0..2^48");
    numel *= static_cast<uint64_t>(dim);  // <= extent, so it cannot overflow where extent did not
    if (dim != 0 && (mul_overflows(extent, static_cast<uint64_t>(dim), &extent) || extent > static_cast<uint64_t>(kMaxDim)))
      throw WireError("shape extent (product of the non-zero dimensions) exceeds 2^48");
  }
  uint64_t want = expected_payload_len(h.dtype, h.compression, numel, h.block_size);
  if (h.payload_len != want)
    throw WireError("payload length " + std::to_string(h.payload_len) + " does not match dtype, shape and compression (expected " +
                    std::to_string(want) + ")");
  if (h.payload_len > max_payload)
    throw WireError("payload of " + std::to_string(h.payload_len) + " bytes exceeds the cap of " +
                    std::to_string(max_payload) + " bytes");
}

void encode_header(const FrameHeader& h, uint8_t* out, uint64_t max_payload) {
  validate(h, max_payload);
  std::memset(out, 0, kHeaderSize);
  std::memcpy(out, kMagic, 4);
  put<uint16_t>(out + 4, kFrameVersion);
  out[6] = h.dtype;
  out[7] = h.compression;
  out[8] = h.ndim;
  put<uint32_t>(out + 12, h.block_size);
  put<uint64_t>(out + 16, h.payload_len);
  std::memcpy(out + 24, h.job, 16);
  put<uint64_t>(out + 40, h.step);
  put<uint32_t>(out + 48, h.micro_batch);
  put<uint32_t>(out + 52, h.stage);
  put<uint32_t>(out + 56, h.payload_crc);
  for (int i = 0; i < kMaxNdim; ++i) put<int64_t>(out + 64 + 8 * i, h.shape[i]);
  put<uint32_t>(out + 60, header_crc(out));
}

FrameHeader decode_header(const uint8_t* p, size_t n, uint64_t max_payload) {
  if (n < kHeaderSize)
    throw WireError("truncated frame header: " + std::to_string(n) + " of " + std::to_string(kHeaderSize) + " bytes");
  if (std::memcmp(p, kMagic, 4) != 0) throw WireError("bad frame magic (not a TensorLink tensor frame)");
  uint16_t version = get<uint16_t>(p + 4);
  if (version != kFrameVersion)
    throw WireError("unsupported frame version " + std::to_string(version) + " (this build reads version " +
                    std::to_string(kFrameVersion) + ")");
  uint32_t stored = get<uint32_t>(p + 60);
  if (stored != header_crc(p)) throw ChecksumError("frame header checksum mismatch (header corrupted)");
  if (p[9] != 0 || p[10] != 0 || p[11] != 0) throw WireError("reserved header bytes are not zero");
  FrameHeader h;
  h.dtype = p[6];
  h.compression = p[7];
  h.ndim = p[8];
  h.block_size = get<uint32_t>(p + 12);
  h.payload_len = get<uint64_t>(p + 16);
  std::memcpy(h.job, p + 24, 16);
  h.step = get<uint64_t>(p + 40);
  h.micro_batch = get<uint32_t>(p + 48);
  h.stage = get<uint32_t>(p + 52);
  h.payload_crc = get<uint32_t>(p + 56);
  for (int i = 0; i < kMaxNdim; ++i) h.shape[i] = get<int64_t>(p + 64 + 8 * i);
  validate(h, max_payload);
  return h;
}

}  // namespace tl
