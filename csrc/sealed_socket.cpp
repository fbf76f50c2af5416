#include "sealed_socket.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <system_error>

#include "checksum.h"

namespace tl {
namespace detail {

using Clock = std::chrono::steady_clock;

struct Deadline {
  explicit Deadline(double timeout_s)
      : forever(timeout_s < 0),
        end(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(forever ? 0.0 : timeout_s))) {}
  double seconds_left() const {
    if (forever) return -1.0;
    return std::max(0.0, std::chrono::duration<double>(end - Clock::now()).count());
  }
  int poll_ms(const char* what) const {
    if (forever) return -1;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now()).count();
    if (left <= 0) throw TimeoutExpired(std::string(what) + " timed out");
    return left > INT_MAX ? INT_MAX : static_cast<int>(left);
  }
  bool forever;
  Clock::time_point end;
};

}  // namespace detail

using detail::Clock;
using detail::Deadline;

namespace {

void wait_for(int fd, short events, const Deadline& deadline, const SignalCheck& on_signal, const char* what) {
  for (;;) {
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, deadline.poll_ms(what));
    if (r > 0) return;  // ready, or an error the next syscall reports
    if (r == 0) continue;
    if (errno == EINTR) {
      on_signal();
      continue;
    }
    throw std::system_error(errno, std::generic_category(), std::string(what) + ": poll");
  }
}

[[noreturn]] void openssl_failed(const char* what) { throw std::runtime_error(std::string("OpenSSL: ") + what); }

}  // namespace

Aead::Aead(const uint8_t* key, size_t key_len, bool encrypt) : ctx_(EVP_CIPHER_CTX_new()), encrypt_(encrypt) {
  if (!ctx_) openssl_failed("EVP_CIPHER_CTX_new");
  const EVP_CIPHER* cipher = key_len == kSealKey128 ? EVP_aes_128_gcm() : EVP_aes_256_gcm();
  if (key_len != kSealKey128 && key_len != kSealKey256) {
    EVP_CIPHER_CTX_free(ctx_);
    throw std::invalid_argument("AES-GCM keys are 16 or 32 bytes");
  }
  int ok = encrypt ? EVP_EncryptInit_ex(ctx_, cipher, nullptr, key, nullptr)
                   : EVP_DecryptInit_ex(ctx_, cipher, nullptr, key, nullptr);
  if (ok != 1) {
    EVP_CIPHER_CTX_free(ctx_);
    openssl_failed("AES-GCM key setup");
  }
}

Aead::~Aead() { EVP_CIPHER_CTX_free(ctx_); }

void Aead::next_nonce(uint8_t* iv) {
  if (counter_ == UINT64_MAX) throw ChannelBroken("record counter exhausted; open a new channel");
  std::memset(iv, 0, 4);
  for (int i = 0; i < 8; ++i) iv[4 + i] = static_cast<uint8_t>(counter_ >> (8 * i));
  ++counter_;
}

void Aead::seal(const uint8_t* in, size_t n, uint8_t* out, uint8_t* tag) {
  uint8_t iv[12];
  next_nonce(iv);
  int len = 0;
  if (EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) != 1) openssl_failed("set nonce");
  if (n > 0 && EVP_EncryptUpdate(ctx_, out, &len, in, static_cast<int>(n)) != 1) openssl_failed("encrypt");
  if (EVP_EncryptFinal_ex(ctx_, out + len, &len) != 1) openssl_failed("encrypt final");
  if (EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_GET_TAG, kSealTag, tag) != 1) openssl_failed("get tag");
}

bool Aead::open(uint8_t* data, size_t n, const uint8_t* tag) {
  uint8_t iv[12];
  next_nonce(iv);
  int len = 0;
  if (EVP_DecryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) != 1) openssl_failed("set nonce");
  if (n > 0 && EVP_DecryptUpdate(ctx_, data, &len, data, static_cast<int>(n)) != 1) openssl_failed("decrypt");
  if (EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_SET_TAG, kSealTag, const_cast<uint8_t*>(tag)) != 1)
    openssl_failed("set tag");
  return EVP_DecryptFinal_ex(ctx_, data + len, &len) == 1;
}

SealedSocket::SealedSocket(int fd, const uint8_t* send_key, const uint8_t* recv_key, size_t key_len,
                           std::shared_ptr<BufferPool> pool, uint64_t max_payload, bool verify_crc)
    : fd_(fd),
      pool_(std::move(pool)),
      max_payload_(max_payload),
      verify_crc_(verify_crc),
      sealer_(send_key, key_len, true),
      scratch_(kHeaderSize + kSealTag + kSealChunk + kSealTag),
      opener_(recv_key, key_len, false),
      ahead_(kReadAhead) {}

void SealedSocket::fail(const std::string& why) {
  std::lock_guard<std::mutex> lock(reason_mu_);
  if (broken_.load()) return;
  broken_reason_ = why;
  broken_.store(true);
  ::shutdown(fd_, SHUT_RDWR);
}

std::string SealedSocket::broken_reason() const {
  std::lock_guard<std::mutex> lock(reason_mu_);
  return broken_reason_;
}

void SealedSocket::check_usable() const {
  if (broken_.load()) throw ChannelBroken("channel is closed: " + broken_reason());
}

void SealedSocket::shutdown(const std::string& why) { fail(why); }

void SealedSocket::start_send(const uint8_t* header, const uint8_t* payload, size_t payload_len) {
  check_usable();
  if (send_active_) throw std::logic_error("a frame is already being sent on this channel");
  std::memcpy(send_header_, header, kHeaderSize);
  send_payload_ = payload;
  send_len_ = payload_len;
  send_next_ = 0;
  header_sent_ = false;
  rec_len_ = rec_off_ = 0;
  send_active_ = true;
}

// Seals the next records of the queued frame into scratch_ (the header with the first chunk, then one
// chunk at a time); false when the frame is complete.
bool SealedSocket::next_send_record() {
  rec_len_ = 0;
  if (!header_sent_) {
    sealer_.seal(send_header_, kHeaderSize, scratch_.data(), scratch_.data() + kHeaderSize);
    rec_len_ = kHeaderSize + kSealTag;
    header_sent_ = true;
  } else if (send_next_ >= send_len_) {
    return false;
  }
  // The first chunk rides with the header in one send, so a small frame reaches the receiver whole.
  if (send_next_ < send_len_) {
    size_t n = std::min(kSealChunk, send_len_ - send_next_);
    uint8_t* out = scratch_.data() + rec_len_;
    sealer_.seal(send_payload_ + send_next_, n, out, out + n);
    send_next_ += n;
    rec_len_ += n + kSealTag;
  }
  rec_off_ = 0;
  return true;
}

bool SealedSocket::pump_send(bool blocking, double timeout_s, const SignalCheck& on_signal) {
  check_usable();
  if (!send_active_) return true;
  Deadline deadline(timeout_s);
  try {
    for (;;) {
      if (rec_off_ == rec_len_ && !next_send_record()) {
        send_active_ = false;
        send_payload_ = nullptr;
        ++frames_sent_;
        return true;
      }
      ssize_t r = ::send(fd_, scratch_.data() + rec_off_, rec_len_ - rec_off_, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (r > 0) {
        rec_off_ += static_cast<size_t>(r);
        bytes_sent_ += static_cast<uint64_t>(r);
        continue;
      }
      if (r < 0 && errno == EINTR) {
        on_signal();
        continue;
      }
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!blocking) return false;
        wait_for(fd_, POLLOUT, deadline, on_signal, "send");
        continue;
      }
      if (r < 0 && (errno == EPIPE || errno == ECONNRESET))
        throw ConnectionClosed("peer closed the channel while a frame was being sent");
      throw std::system_error(errno, std::generic_category(), "send");
    }
  } catch (const TimeoutExpired&) {
    throw;  // the frame is still queued; the caller may pump again
  } catch (const std::exception& e) {
    if (broken_.load()) throw ChannelBroken("channel is closed: " + broken_reason());  // woken by shutdown()
    fail(e.what());
    throw;
  }
}

RecvStatus SealedSocket::pump_recv(bool blocking, double timeout_s, const SignalCheck& on_signal, uint64_t max_inline) {
  check_usable();
  if (recv_ready_) return RecvStatus::FrameReady;
  Deadline deadline(timeout_s);
  try {
    for (;;) {
      // Where the next bytes go: the header record, or the current payload chunk and then its tag.
      iovec iov[3];
      int n_iov = 0;
      if (!recv_have_header_) {
        iov[n_iov++] = {recv_hdr_ + recv_hdr_got_, sizeof(recv_hdr_) - recv_hdr_got_};
      } else {
        if (!recv_buf_) {
          recv_buf_ = acquire_payload_buffer(blocking, deadline);
          if (!recv_buf_) return RecvStatus::NeedPool;
        }
        size_t chunk = std::min(kSealChunk, static_cast<size_t>(recv_h_.payload_len) - recv_chunk_start_);
        uint8_t* base = static_cast<uint8_t*>(recv_buf_->data()) + recv_chunk_start_;
        if (recv_chunk_got_ < chunk) iov[n_iov++] = {base + recv_chunk_got_, chunk - recv_chunk_got_};
        size_t tag_got = recv_chunk_got_ > chunk ? recv_chunk_got_ - chunk : 0;
        iov[n_iov++] = {recv_tag_ + tag_got, kSealTag - tag_got};
      }
      size_t want = 0;
      for (int i = 0; i < n_iov; ++i) want += iov[i].iov_len;
      ssize_t r;
      if (ahead_pos_ < ahead_end_) {
        r = static_cast<ssize_t>(take_ahead(iov, n_iov));
      } else {
        // With no header yet, or on the frame's last chunk, the bytes after this frame (the next frame's
        // header, a small frame whole) come along into the read-ahead buffer: one recvmsg per small frame.
        bool last_chunk = recv_have_header_ && recv_h_.payload_len - recv_chunk_start_ <= kSealChunk;
        if (!recv_have_header_ || last_chunk) iov[n_iov++] = {ahead_.data(), ahead_.size()};
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = n_iov;
        r = ::recvmsg(fd_, &msg, MSG_DONTWAIT);
        if (r > 0) {
          bytes_received_ += static_cast<uint64_t>(r);
          if (static_cast<size_t>(r) > want) {
            ahead_pos_ = 0;
            ahead_end_ = static_cast<size_t>(r) - want;
            r = static_cast<ssize_t>(want);
          }
        }
      }
      if (r == 0) throw ConnectionClosed(receiving() ? "peer closed the channel in the middle of a frame"
                                                     : "peer closed the channel");
      if (r < 0) {
        if (errno == EINTR) {
          on_signal();
          continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          if (!blocking) return RecvStatus::NeedData;
          wait_for(fd_, POLLIN, deadline, on_signal, "recv");
          continue;
        }
        if (errno == ECONNRESET) throw ConnectionClosed("peer reset the channel");
        throw std::system_error(errno, std::generic_category(), "recv");
      }
      if (!recv_have_header_) {
        recv_hdr_got_ += static_cast<size_t>(r);
        if (recv_hdr_got_ < sizeof(recv_hdr_)) continue;
        if (!opener_.open(recv_hdr_, kHeaderSize, recv_hdr_ + kHeaderSize))
          throw AuthError("frame header failed authentication (tampered, replayed or wrong key)");
        recv_h_ = decode_header(recv_hdr_, kHeaderSize, max_payload_);  // validated before allocating
        recv_have_header_ = true;
        recv_chunk_start_ = recv_chunk_got_ = 0;
        recv_crc_ = 0;
        if (!blocking && recv_h_.payload_len > max_inline) return RecvStatus::NeedData;
      } else {
        recv_chunk_got_ += static_cast<size_t>(r);
        size_t chunk = std::min(kSealChunk, static_cast<size_t>(recv_h_.payload_len) - recv_chunk_start_);
        if (recv_chunk_got_ < chunk + kSealTag) continue;
        uint8_t* base = static_cast<uint8_t*>(recv_buf_->data()) + recv_chunk_start_;
        if (!opener_.open(base, chunk, recv_tag_))
          throw AuthError("payload chunk at offset " + std::to_string(recv_chunk_start_) +
                          " failed authentication (tampered, replayed or wrong key)");
        if (verify_crc_) recv_crc_ = crc32c(recv_crc_, base, chunk);  // while the chunk is in cache
        recv_chunk_start_ += chunk;
        recv_chunk_got_ = 0;
      }
      if (recv_have_header_ && recv_chunk_start_ == recv_h_.payload_len) {
        if (verify_crc_ && recv_crc_ != recv_h_.payload_crc)
          throw ChecksumError("payload checksum mismatch after decryption (the sender framed corrupt data)");
        recv_ready_ = true;
        ++frames_received_;
        return RecvStatus::FrameReady;
      }
    }
  } catch (const TimeoutExpired&) {
    throw;  // partial progress is kept; the caller may pump again
  } catch (const std::exception& e) {
    if (broken_.load()) throw ChannelBroken("channel is closed: " + broken_reason());  // woken by shutdown()
    fail(e.what());
    throw;
  }
}

// The pool buffer for the payload whose header just arrived. Without blocking: null when the pool is
// full. Blocking: waits in short slices so that shutdown() from another thread is noticed, and a timeout
// keeps the header (the caller may pump again). A payload that can never fit is an error at once.
std::unique_ptr<PooledBuffer> SealedSocket::acquire_payload_buffer(bool blocking, const Deadline& deadline) {
  size_t need = static_cast<size_t>(recv_h_.payload_len);
  if (BufferPool::size_class(need) > pool_->capacity())
    throw PoolExhausted("a frame of " + std::to_string(need) + " payload bytes can never fit this channel's " +
                        std::to_string(pool_->capacity()) + "-byte buffer pool; give the data plane more memory");
  for (;;) {
    double left = blocking ? deadline.seconds_left() : 0.0;
    double slice = left < 0 ? 0.05 : std::min(left, 0.05);
    try {
      return pool_->acquire(need, slice);
    } catch (const PoolExhausted&) {
      if (broken_.load()) throw ChannelBroken("channel is closed: " + broken_reason());
      if (!blocking) return nullptr;
      if (left >= 0 && left <= slice) throw TimeoutExpired("waiting for buffer pool space timed out");
    }
  }
}

// Moves read-ahead bytes into the targets a recvmsg would have filled, in order; returns how many.
size_t SealedSocket::take_ahead(const iovec* iov, int n_iov) {
  size_t got = 0;
  for (int i = 0; i < n_iov && ahead_pos_ < ahead_end_; ++i) {
    size_t k = std::min(iov[i].iov_len, ahead_end_ - ahead_pos_);
    std::memcpy(iov[i].iov_base, ahead_.data() + ahead_pos_, k);
    ahead_pos_ += k;
    got += k;
    if (k < iov[i].iov_len) break;
  }
  return got;
}

std::pair<FrameHeader, std::unique_ptr<PooledBuffer>> SealedSocket::take_frame() {
  if (!recv_ready_) throw std::logic_error("no complete frame to take");
  recv_ready_ = false;
  recv_have_header_ = false;
  recv_hdr_got_ = 0;
  return {recv_h_, std::move(recv_buf_)};
}

}  // namespace tl
