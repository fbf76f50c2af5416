// Whole-frame socket I/O: gathered writes and scattered reads that loop until every byte is moved.
//
// Callers release the GIL around these. Each call uses non-blocking send/recv flags and poll(), so it
// works on blocking and non-blocking sockets alike and honours a deadline without touching the fd's
// flags. SIGPIPE is never raised: a closed peer is an error return.
#pragma once
#include <sys/uio.h>

#include <cstddef>
#include <functional>
#include <stdexcept>
#include <vector>

namespace tl {

// Called when a syscall was interrupted by a signal; throws to abort (Python: a pending KeyboardInterrupt).
using SignalCheck = std::function<void()>;

// timeout_s < 0 waits forever. Throws std::system_error (errno), ConnectionClosed or TimeoutExpired.
void send_all(int fd, std::vector<iovec> parts, double timeout_s, const SignalCheck& on_signal);
void recv_all(int fd, std::vector<iovec> parts, double timeout_s, const SignalCheck& on_signal);

struct ConnectionClosed : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct TimeoutExpired : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace tl
