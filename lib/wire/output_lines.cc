#include "lib/wire/output_lines.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace procpool::internal {

OutputLines::OutputLines(UniqueFd fd)
    : fd_(std::move(fd)), buffer_(std::make_unique<char[]>(kMaxLineBytes)) {
  if (fd_.valid()) (void)set_nonblocking(fd_.get(), true);
}

void OutputLines::read(const LineSink& sink, int max_reads) {
  for (int i = 0; i < max_reads && fd_.valid(); ++i) {
    if (!read_once(sink)) return;
  }
}

void OutputLines::drain(const LineSink& sink) {
  while (fd_.valid() && read_once(sink)) {
  }
  finish(sink);
}

bool OutputLines::read_once(const LineSink& sink) {
  ssize_t got;
  do {
    got = ::read(fd_.get(), buffer_.get() + used_, kMaxLineBytes - used_);
  } while (got < 0 && errno == EINTR);
  if (got < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    finish(sink);  // a read error ends the pipe as an end of file would
    return false;
  }
  if (got == 0) {
    finish(sink);
    return false;
  }
  const size_t scanned = used_;
  used_ += static_cast<size_t>(got);
  size_t start = 0;
  for (size_t i = scanned; i < used_; ++i) {
    if (buffer_[i] == '\n') {
      sink(std::string_view(buffer_.get() + start, i - start));
      start = i + 1;
    }
  }
  if (start == 0 && used_ == kMaxLineBytes) {
    // A line longer than the buffer: this piece of it.
    sink(std::string_view(buffer_.get(), used_));
    used_ = 0;
  } else if (start > 0) {
    std::memmove(buffer_.get(), buffer_.get() + start, used_ - start);
    used_ -= start;
  }
  return true;
}

void OutputLines::finish(const LineSink& sink) {
  if (used_ > 0) sink(std::string_view(buffer_.get(), used_));
  used_ = 0;
  fd_.reset();
}

absl::StatusOr<OutputPipe> make_output_pipe() {
  int ends[2];
  if (::pipe2(ends, O_CLOEXEC) != 0) return absl::ErrnoToStatus(errno, "pipe2 for a worker's output");
  // Room for a millisecond of a flood between reads (fork_link.h: kOutputRestNs); the default
  // 64 KiB stays where the system allows no more.
  (void)::fcntl(ends[0], F_SETPIPE_SZ, 1 << 20);
  return OutputPipe{own_fd(ends[0]), own_fd(ends[1])};
}

}  // namespace procpool::internal
