// An encrypted, authenticated tensor-frame connection over a TCP socket: the data plane's direct path.
//
// Each direction has its own AES-GCM key (128 or 256 bits, by key length; derived by the Python handshake,
// which agrees on the size) and a 64-bit record
// counter that is the nonce: nonce = 4 zero bytes || counter (little endian). The counter starts at 1
// (record 0 is the handshake's hello), never repeats and is never sent, so a replayed, reordered,
// dropped or forged record fails authentication and the connection is closed.
//
// A frame on the wire is a sealed header record (128 bytes of ciphertext + 16-byte tag) followed by the
// payload in sealed chunks of kSealChunk bytes (the last one shorter), each with its own tag. The
// receiver learns the payload length only from an authenticated, validated header, and decrypts each
// chunk in place inside a pool buffer, so a frame is never copied after the kernel hands it over.
//
// Both directions are resumable state machines: a pump call moves as many bytes as the socket takes
// without blocking (or, blocking, until the frame is done), and the next call continues where the last
// one stopped. That lets the Python side move small frames on its event loop without a thread hop and
// hand large frames to a worker thread, with one implementation of the record format.
#pragma once
#include <openssl/evp.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "errors.h"
#include "frame_header.h"
#include "frame_io.h"

namespace tl {

// Key sizes: 16 bytes selects AES-128-GCM, 32 bytes AES-256-GCM.
constexpr size_t kSealKey128 = 16;
constexpr size_t kSealKey256 = 32;
constexpr size_t kSealTag = 16;
constexpr size_t kSealChunk = 256 * 1024;  // part of the protocol: both ends must agree
// Receive-side read-ahead: bytes that arrive past the record being read wait here (local, not protocol).
constexpr size_t kReadAhead = 64 * 1024;

// A record failed AEAD authentication: tampering, a replay, a dropped record or the wrong key.
struct AuthError : WireError {
  using WireError::WireError;
};

// The connection was closed or failed earlier; nothing more can be sent or received on it.
struct ChannelBroken : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
struct Deadline;  // one deadline over the several waits of a pump call
}

// AES-GCM in one direction with counter nonces. The key schedule is set up once.
class Aead {
 public:
  Aead(const uint8_t* key, size_t key_len, bool encrypt);
  ~Aead();
  Aead(const Aead&) = delete;
  Aead& operator=(const Aead&) = delete;
  // out may equal in. Uses and advances the counter.
  void seal(const uint8_t* in, size_t n, uint8_t* out, uint8_t* tag);
  // Decrypts data in place; false when the tag does not match (the counter still advances).
  bool open(uint8_t* data, size_t n, const uint8_t* tag);
  uint64_t counter() const { return counter_; }

 private:
  void next_nonce(uint8_t* iv);
  EVP_CIPHER_CTX* ctx_;
  bool encrypt_;
  uint64_t counter_ = 1;
};

enum class RecvStatus : int { NeedData = 0, FrameReady = 1, NeedPool = 2 };

class SealedSocket {
 public:
  SealedSocket(int fd, const uint8_t* send_key, const uint8_t* recv_key, size_t key_len,
               std::shared_ptr<BufferPool> pool, uint64_t max_payload, bool verify_crc);

  // Queues one frame: an encoded header (kHeaderSize bytes) and its payload, which must stay valid until
  // pump_send reports it done.
  void start_send(const uint8_t* header, const uint8_t* payload, size_t payload_len);
  // Moves bytes of the queued frame. blocking=false returns when the socket would block; blocking=true
  // waits (timeout_s < 0: forever). True once the whole frame is on the socket.
  bool pump_send(bool blocking, double timeout_s, const SignalCheck& on_signal);
  // sending/receiving/incoming: read them only while no pump runs on that side.
  bool sending() const { return send_active_; }

  // Moves bytes of the incoming frame; FrameReady leaves it for take_frame() (a null buffer for an empty
  // payload). NeedPool (non-blocking
  // only) means the pool is full and a blocking pump must wait for space.
  // max_inline (non-blocking only): once a header announces a larger payload, return NeedData at once so
  // the caller can move the payload off its event loop.
  RecvStatus pump_recv(bool blocking, double timeout_s, const SignalCheck& on_signal, uint64_t max_inline = UINT64_MAX);
  // Payload bytes of the frame being received once its header is in, else 0.
  uint64_t incoming() const { return recv_have_header_ ? recv_h_.payload_len : 0; }
  // The validated header of the frame being received once it is in (its payload may be unread), else null:
  // with max_inline = 0 the caller sees every header before a payload buffer is taken for it.
  const FrameHeader* header() const { return recv_have_header_ ? &recv_h_ : nullptr; }
  bool receiving() const { return recv_hdr_got_ > 0 || recv_buf_ != nullptr || ahead_pos_ < ahead_end_; }
  std::pair<FrameHeader, std::unique_ptr<PooledBuffer>> take_frame();

  // Wakes any blocked pump with an error; the owner closes the fd afterwards.
  void shutdown(const std::string& why);
  std::string broken_reason() const;
  bool broken() const { return broken_.load(); }

  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t bytes_received() const { return bytes_received_; }
  uint64_t frames_sent() const { return frames_sent_; }
  uint64_t frames_received() const { return frames_received_; }

 private:
  bool next_send_record();
  size_t take_ahead(const struct iovec* iov, int n_iov);
  std::unique_ptr<PooledBuffer> acquire_payload_buffer(bool blocking, const detail::Deadline& deadline);
  void fail(const std::string& why);
  void check_usable() const;

  int fd_;
  std::shared_ptr<BufferPool> pool_;
  uint64_t max_payload_;
  bool verify_crc_;
  std::atomic<bool> broken_{false};
  mutable std::mutex reason_mu_;
  std::string broken_reason_;

  // send side
  Aead sealer_;
  bool send_active_ = false, header_sent_ = false;
  uint8_t send_header_[kHeaderSize];
  const uint8_t* send_payload_ = nullptr;
  size_t send_len_ = 0, send_next_ = 0;  // payload bytes already sealed
  std::vector<uint8_t> scratch_;          // the records on their way out: ciphertext then tag, each
  size_t rec_len_ = 0, rec_off_ = 0;

  // receive side
  Aead opener_;
  uint8_t recv_hdr_[kHeaderSize + kSealTag];
  size_t recv_hdr_got_ = 0;
  FrameHeader recv_h_{};
  bool recv_have_header_ = false;
  std::unique_ptr<PooledBuffer> recv_buf_;
  size_t recv_chunk_start_ = 0, recv_chunk_got_ = 0;  // chunk offset in the payload; bytes of it (+tag) in
  uint8_t recv_tag_[kSealTag];
  uint32_t recv_crc_ = 0;
  bool recv_ready_ = false;
  std::vector<uint8_t> ahead_;  // read-ahead: [ahead_pos_, ahead_end_) not yet consumed
  size_t ahead_pos_ = 0, ahead_end_ = 0;

  // read by status calls on other threads while a pump runs
  std::atomic<uint64_t> bytes_sent_{0}, bytes_received_{0}, frames_sent_{0}, frames_received_{0};
};

}  // namespace tl
