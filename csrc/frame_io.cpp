#include "frame_io.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <string>
#include <system_error>

namespace tl {
namespace {

using Clock = std::chrono::steady_clock;

size_t total_bytes(const std::vector<iovec>& parts) {
  size_t n = 0;
  for (const auto& p : parts) n += p.iov_len;
  return n;
}

// Drops the first `n` bytes from the iovec list, starting at index *first.
void advance(std::vector<iovec>& parts, size_t* first, size_t n) {
  while (n > 0) {
    iovec& v = parts[*first];
    if (n >= v.iov_len) {
      n -= v.iov_len;
      v.iov_len = 0;
      ++*first;
    } else {
      v.iov_base = static_cast<char*>(v.iov_base) + n;
      v.iov_len -= n;
      n = 0;
    }
  }
  while (*first < parts.size() && parts[*first].iov_len == 0) ++*first;
}

void wait_ready(int fd, short events, Clock::time_point deadline, bool forever, const SignalCheck& on_signal,
                const char* what) {
  for (;;) {
    int ms = -1;
    if (!forever) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) throw TimeoutExpired(std::string(what) + " timed out");
      ms = left > INT_MAX ? INT_MAX : static_cast<int>(left);
    }
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, ms);
    if (r > 0) return;  // readable/writable, or an error that the next syscall reports
    if (r == 0) continue;  // loop re-checks the deadline
    if (errno == EINTR) {
      on_signal();
      continue;
    }
    throw std::system_error(errno, std::generic_category(), std::string(what) + ": poll");
  }
}

template <bool kSend>
void transfer(int fd, std::vector<iovec> parts, double timeout_s, const SignalCheck& on_signal) {
  const char* what = kSend ? "send" : "recv";
  const bool forever = timeout_s < 0;
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(forever ? 0.0 : timeout_s));
  const size_t want = total_bytes(parts);
  size_t done = 0, first = 0;
  while (first < parts.size() && parts[first].iov_len == 0) ++first;
  while (done < want) {
    msghdr msg{};
    msg.msg_iov = parts.data() + first;
    msg.msg_iovlen = std::min<size_t>(parts.size() - first, IOV_MAX);
    ssize_t r = kSend ? ::sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) : ::recvmsg(fd, &msg, MSG_DONTWAIT);
    if (r > 0) {
      done += static_cast<size_t>(r);
      advance(parts, &first, static_cast<size_t>(r));
      continue;
    }
    if (r == 0 && !kSend)
      throw ConnectionClosed("peer closed the connection after " + std::to_string(done) + " of " +
                             std::to_string(want) + " bytes");
    if (r < 0 && errno == EINTR) {
      on_signal();
      continue;
    }
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_ready(fd, kSend ? POLLOUT : POLLIN, deadline, forever, on_signal, what);
      continue;
    }
    if (r < 0 && (errno == EPIPE || errno == ECONNRESET))
      throw ConnectionClosed(std::string("peer closed the connection during ") + what + " after " +
                             std::to_string(done) + " of " + std::to_string(want) + " bytes");
    throw std::system_error(errno, std::generic_category(), what);
  }
}

}  // namespace

void send_all(int fd, std::vector<iovec> parts, double timeout_s, const SignalCheck& on_signal) {
  transfer<true>(fd, std::move(parts), timeout_s, on_signal);
}

void recv_all(int fd, std::vector<iovec> parts, double timeout_s, const SignalCheck& on_signal) {
  transfer<false>(fd, std::move(parts), timeout_s, on_signal);
}

}  // namespace tl
