// Frame I/O: Cap'n Proto messages in the standard stream framing over a stream socket.
//
// The parent drives many worker sockets from one poll loop, so its side is non-blocking: a
// FrameWriter queues whole messages and writes what the socket takes, a FrameReader collects bytes
// and hands out each complete frame as a zero-copy MessageReader over its own reused buffer. The
// worker has one socket and nothing else to do, so it uses the same reader on a blocking socket and
// `write_frame`. Sends use MSG_NOSIGNAL: a peer that died is an EPIPE status, never a SIGPIPE.
//
// Frames larger than the reader's limit are refused with kDataLoss before any of them is buffered,
// so a peer cannot make us allocate without bound. Not thread-safe; one owner per socket.

#ifndef PROCPOOL_LIB_WIRE_FRAME_IO_H_
#define PROCPOOL_LIB_WIRE_FRAME_IO_H_

#include <sys/uio.h>

#include <cstddef>
#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "capnp/message.h"
#include "capnp/serialize.h"

namespace procpool::internal {

// Writes one whole message to a blocking socket, retrying on EINTR and short writes.
absl::Status write_frame(int fd, capnp::MessageBuilder& message);

// A queue of outgoing messages for one non-blocking socket.
class FrameWriter {
 public:
  FrameWriter() = default;
  FrameWriter(FrameWriter&&) = default;
  FrameWriter& operator=(FrameWriter&&) = default;

  void push(std::unique_ptr<capnp::MessageBuilder> message);
  // Queues a copy of a whole frame (segment table included) as it was read: a relay passes
  // frames on without building them again.
  void push_copy(kj::ArrayPtr<const capnp::word> frame);
  void push_copy(kj::Array<capnp::word> frame);

  // Writes as much as the socket accepts without blocking. OK when it wrote what it could (check
  // `empty()`); an error status (EPIPE when the peer is gone) otherwise.
  absl::Status write_some(int fd);

  bool empty() const { return frames_.empty(); }
  size_t queued_bytes() const { return queued_bytes_; }
  void clear();

 private:
  struct Frame {
    std::unique_ptr<capnp::MessageBuilder> message;
    kj::Array<capnp::word> copy;  // for push_copy
    std::vector<uint32_t> table;  // the segment table that precedes the segments
    std::vector<iovec> pieces;    // table, then each segment; consumed from the front
    size_t next_piece = 0;
  };
  std::deque<Frame> frames_;
  size_t queued_bytes_ = 0;
};

// Collects bytes from a socket and yields complete frames.
class FrameReader {
 public:
  // `max_frame_bytes`: a frame that declares itself larger is a kDataLoss error.
  explicit FrameReader(size_t max_frame_bytes);

  enum class Fill { kData, kWouldBlock, kEndOfFile };
  // One read() into the buffer. Blocks only if the socket does.
  absl::StatusOr<Fill> fill(int fd);
  // Appends bytes that came some other way (a test, a fuzzer), as fill() would.
  void append(const void* data, size_t size);

  // The words of the next complete frame, or an empty array when more bytes are needed. Parse
  // them with `capnp::FlatArrayMessageReader(words, options())`. The words borrow the buffer: drop
  // every reader of them before the next call of `next()`, `fill()` or `read_blocking()`.
  // kDataLoss when the buffered bytes cannot be a valid frame (the stream is then unusable).
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> next();

  // Reads until one complete frame is buffered and returns it, as `next()` does (for blocking
  // sockets). kUnavailable at end of file.
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> read_blocking(int fd);

  const capnp::ReaderOptions& options() const { return options_; }
  // Changes the limit for frames not yet begun (a handshake's small limit, then the pool's).
  void set_max_frame_bytes(size_t max_frame_bytes);

  bool has_partial_frame() const { return end_ - begin_ > consume_; }

 private:
  void make_room(size_t bytes_needed);

  size_t max_frame_bytes_;
  capnp::ReaderOptions options_;
  std::unique_ptr<capnp::word[]> buffer_;
  size_t capacity_ = 0;   // bytes
  size_t begin_ = 0;      // first unconsumed byte; always word-aligned
  size_t end_ = 0;        // one past the last byte read
  size_t consume_ = 0;    // bytes the frame handed out last will free on the next call
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WIRE_FRAME_IO_H_
