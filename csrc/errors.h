// Exceptions raised by the native layer; module.cpp maps them to Python classes.
#pragma once
#include <stdexcept>
#include <string>

namespace tl {

// Malformed or hostile input: a bad header, a wrong length, an unknown code. Maps to WireError.
struct WireError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The payload does not match its checksum: corruption on the wire. Maps to ChecksumError(WireError).
struct ChecksumError : WireError {
  using WireError::WireError;
};

// The buffer pool stayed full for the whole timeout. Maps to PoolExhausted(TimeoutError).
struct PoolExhausted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace tl
