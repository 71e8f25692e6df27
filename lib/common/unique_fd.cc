#include "lib/common/unique_fd.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "absl/status/status.h"

namespace procpool::internal {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) {
    // close() may fail with EINTR, but on Linux the descriptor is released anyway: never retry.
    ::close(fd_);
  }
  fd_ = fd;
}

UniqueFd own_fd(int fd) {
  if (fd >= 0 && fd <= 2) {
    const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
    // Out of descriptors: keep the low one rather than lose it; the pool still works.
    if (moved >= 0) {
      ::close(fd);
      fd = moved;
    }
  }
  return UniqueFd(fd);
}

absl::StatusOr<SocketPair> make_socket_pair(int send_buffer_bytes) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    return absl::ErrnoToStatus(errno, "socketpair");
  }
  if (send_buffer_bytes > 0) {
    for (int fd : fds) {
      (void)::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &send_buffer_bytes, sizeof(send_buffer_bytes));
    }
  }
  return SocketPair{own_fd(fds[0]), own_fd(fds[1])};
}

absl::Status set_nonblocking(int fd, bool nonblocking) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return absl::ErrnoToStatus(errno, "fcntl(F_GETFL)");
  flags = nonblocking ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (::fcntl(fd, F_SETFL, flags) != 0) return absl::ErrnoToStatus(errno, "fcntl(F_SETFL)");
  return absl::OkStatus();
}

absl::StatusOr<UniqueFd> make_event_fd() {
  int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return absl::ErrnoToStatus(errno, "eventfd");
  return own_fd(fd);
}

}  // namespace procpool::internal
