// UniqueFd: the one owner of a file descriptor.
//
// Every descriptor procpool opens is held by exactly one UniqueFd, created with O_CLOEXEC (or
// SOCK_CLOEXEC), and closed when its owner goes away. A raw `int` taken from `get()` only borrows.
// Not thread-safe: share the owner, not the number.
//
// Descriptors procpool makes never take the numbers 0, 1 and 2 (see `own_fd`): a program that
// closed its standard streams would otherwise find its next printf written into a worker's channel.

#ifndef PROCPOOL_LIB_COMMON_UNIQUE_FD_H_
#define PROCPOOL_LIB_COMMON_UNIQUE_FD_H_

#include <utility>

#include "absl/status/statusor.h"

namespace procpool::internal {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Gives up ownership without closing.
  int release() { return std::exchange(fd_, -1); }
  // Closes the current descriptor (if any) and takes `fd`.
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Takes ownership of a descriptor procpool just made (CLOEXEC already set). One that landed on
// 0, 1 or 2 (the program had closed its standard streams) is moved to 3 or above first, so that
// the program's stdio can never reach it. A negative `fd` gives an invalid UniqueFd.
UniqueFd own_fd(int fd);

// A connected pair of SOCK_STREAM unix sockets, both CLOEXEC.
struct SocketPair {
  UniqueFd parent_end;
  UniqueFd child_end;
};
// A connected AF_UNIX stream pair, CLOEXEC. With `send_buffer_bytes` > 0, both ends ask for send
// buffers that large (best effort; the kernel caps them at net.core.wmem_max): on a Unix socket
// the sender's buffer bounds what may wait unread, so a bigger one lets a large frame cross in
// one write instead of several rounds of write, wake, read.
absl::StatusOr<SocketPair> make_socket_pair(int send_buffer_bytes = 0);

// Sets or clears O_NONBLOCK.
absl::Status set_nonblocking(int fd, bool nonblocking);

// An eventfd (CLOEXEC, non-blocking) used to wake a poll loop from another thread.
absl::StatusOr<UniqueFd> make_event_fd();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_UNIQUE_FD_H_
