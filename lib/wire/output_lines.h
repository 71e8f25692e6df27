// OutputLines: one of a worker's output pipes (PoolOptions::worker_output), read and cut into
// lines. The pool reads a forked worker's, a relay its remote worker's (lib/link/fork_link.h).
//
// Bounded: it buffers at most kMaxLineBytes. A line is handed on as soon as its newline is read,
// and the reader takes at most what fits, so a worker that writes faster than lines are taken
// fills its pipe and blocks in write(): back-pressure on the worker, never growth here. A line
// longer than kMaxLineBytes goes in pieces of that size (one of 64 KiB exactly is one line, not a
// piece and an empty line). At end of file, or when the reader is
// told the worker is gone (drain), a last line without a newline is handed on as it is.
//
// The lines of one read go on together, in one call: a worker that prints a line per tiny task
// fills a read with thousands, and whoever takes them does its per-read work (the clock, the
// worker's identity, its task) once for all of them (bench/bench_output.cc).
//
// The bytes are the worker's: any bytes, passed on as they are (a sink that prints them decides
// how to escape them).

#ifndef PROCPOOL_LIB_WIRE_OUTPUT_LINES_H_
#define PROCPOOL_LIB_WIRE_OUTPUT_LINES_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {

class OutputLines {
 public:
  static constexpr size_t kMaxLineBytes = size_t{64} << 10;
  // At most this many lines go in one call (a read of 64 KiB of empty lines is 64 Ki of them).
  static constexpr size_t kLinesPerCall = 1024;
  // Lines (without their newlines) in the order written, at least one, borrowed for the call.
  using LineSink = std::function<void(std::span<const std::string_view> lines)>;

  // Takes the read end of a pipe (made non-blocking here).
  explicit OutputLines(UniqueFd fd);

  // The descriptor to poll for POLLIN; -1 once the pipe is closed.
  int fd() const { return fd_.get(); }
  bool open() const { return fd_.valid(); }

  // Reads what the pipe holds, at most `max_reads` reads (a flood from one worker must not starve
  // the others), handing on every whole line. At end of file hands on the rest and closes.
  // Returns how many bytes it read.
  size_t read(const LineSink& sink, int max_reads = 4);
  // The worker is gone: reads everything it left in the pipe, hands on the rest, and closes,
  // without waiting for an end of file that a process the worker forked may hold off.
  void drain(const LineSink& sink);

 private:
  // Reads once, adding what it read to `bytes`; false at end of file, when nothing is left, or on
  // an error.
  bool read_once(const LineSink& sink, size_t& bytes);
  void finish(const LineSink& sink);

  UniqueFd fd_;
  std::unique_ptr<char[]> buffer_;
  size_t used_ = 0;
  bool split_ = false;  // the last thing handed on was a piece of a line not yet ended
  std::vector<std::string_view> lines_;  // the whole lines of the last read, into buffer_
};

// A pipe for a worker's output: `read_end` stays here (CLOEXEC), `write_end` goes to the worker
// (CLOEXEC too: the worker moves it onto 1 or 2, which are not).
struct OutputPipe {
  UniqueFd read_end;
  UniqueFd write_end;
};
absl::StatusOr<OutputPipe> make_output_pipe();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WIRE_OUTPUT_LINES_H_
