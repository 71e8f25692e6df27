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

size_t OutputLines::read(const LineSink& sink, int max_reads) {
  size_t bytes = 0;
  for (int i = 0; i < max_reads && fd_.valid(); ++i) {
    if (!read_once(sink, bytes)) break;
  }
  return bytes;
}

void OutputLines::drain(const LineSink& sink) {
  size_t bytes = 0;
  while (fd_.valid() && read_once(sink, bytes)) {
  }
  finish(sink);
}

bool OutputLines::read_once(const LineSink& sink, size_t& bytes) {
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
  const char* const begin = buffer_.get();
  const char* const end = begin + used_ + static_cast<size_t>(got);
  // Only the bytes just read can hold a newline: those before were scanned by the last read.
  const char* scan = begin + used_;
  const char* line = begin;
  if (used_ == 0 && split_ && *begin == '\n') {
    // The newline of a line handed on in pieces, the last of them a whole 64 KiB: it ends that
    // line, it does not make an empty one.
    line = scan = begin + 1;
  }
  split_ = false;
  used_ += static_cast<size_t>(got);
  bytes += static_cast<size_t>(got);
  lines_.clear();
  while (const void* found = std::memchr(scan, '\n', static_cast<size_t>(end - scan))) {
    const char* const newline = static_cast<const char*>(found);
    lines_.emplace_back(line, static_cast<size_t>(newline - line));
    line = scan = newline + 1;
    if (lines_.size() == kLinesPerCall) {
      sink(lines_);
      lines_.clear();
    }
  }
  const size_t start = static_cast<size_t>(line - begin);
  if (!lines_.empty()) sink(lines_);
  if (start == 0 && used_ == kMaxLineBytes) {
    // A line longer than the buffer: this piece of it.
    const std::string_view piece(buffer_.get(), used_);
    sink({&piece, 1});
    used_ = 0;
    split_ = true;
  } else if (start > 0) {
    std::memmove(buffer_.get(), buffer_.get() + start, used_ - start);
    used_ -= start;
  }
  return true;
}

void OutputLines::finish(const LineSink& sink) {
  if (used_ > 0) {
    const std::string_view rest(buffer_.get(), used_);
    sink({&rest, 1});
  }
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
