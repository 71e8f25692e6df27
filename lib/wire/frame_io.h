// Frame I/O: Cap'n Proto messages in the standard stream framing over a stream socket.
//
// The parent drives many worker sockets from one poll loop, so its side is non-blocking: a
// FrameWriter queues whole messages and writes what the socket takes, a FrameReader collects bytes
// and hands out each complete frame as a zero-copy MessageReader over its own reused buffer. The
// worker has one socket and nothing else to do, so it uses the same reader on a blocking socket and
// `write_frame`. Sends use MSG_NOSIGNAL: a peer that died is an EPIPE status, never a SIGPIPE.
//
// Frames larger than the reader's limit are refused with kDataLoss before any of them is buffered,
// and a reader's buffer grows with the bytes that arrive (doubling), not to the size a frame's
// header announces, so a peer cannot make us allocate more than about twice what it sent. Not thread-safe; one owner per socket.

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

class TlsChannel;  // tls_channel.h

// Where a frame's bytes go and come from: a socket, or the TLS session over one (a remote
// worker's connection, tls_channel.h). Borrowed; made from either where a function takes one, so
// that callers with a plain descriptor write `fd` as before.
struct ByteStream {
  ByteStream(int fd) : fd(fd) {}  // NOLINT: a descriptor is a stream
  ByteStream(TlsChannel& channel);  // NOLINT: so is a channel (plaintext ones act as their socket)
  int fd;
  TlsChannel* tls = nullptr;  // null: plain reads and writes on `fd`
};

// A message whose segments may reference memory it does not own (Cap'n Proto external data, e.g. a
// caller's array of jobs sent in place), lent by `borrower`, which `keep_alive` (if any) keeps
// alive. A FrameWriter that queues it copies what it has not sent yet when
// release_borrowed(borrower) is called, so lent memory is never read after that returns.
class BorrowingMessageBuilder final : public capnp::MallocMessageBuilder {
 public:
  BorrowingMessageBuilder(unsigned first_segment_words, const void* borrower,
                          std::shared_ptr<const void> keep_alive)
      : capnp::MallocMessageBuilder(first_segment_words),
        borrower_(borrower),
        keep_alive_(std::move(keep_alive)) {}
  const void* borrower() const { return borrower_; }

 private:
  const void* borrower_;
  std::shared_ptr<const void> keep_alive_;
};

// Zeroed buffers for the first segments of large messages, reused: a fresh one of a megabyte costs
// hundreds of first-touch page faults, more than building the message in it. Cap'n Proto needs a
// first segment zeroed; a buffer given back is zeroed again only as far as it was used.
// Not thread-safe: one owner (the pool's lock guards the scheduler that uses it).
class SegmentPool : public std::enable_shared_from_this<SegmentPool> {
 public:
  // A zeroed buffer of at least `words` words.
  kj::Array<capnp::word> take(size_t words);
  // Takes `buffer` back, of which the first `used_words` words may be non-zero.
  void give(kj::Array<capnp::word> buffer, size_t used_words);

 private:
  static constexpr size_t kMaxKept = 8;
  std::vector<kj::Array<capnp::word>> kept_;
};

namespace frame_io_internal {
// Holds a pooled first segment; a base of PooledMessageBuilder so that it outlives the builder.
struct PooledSegment {
  PooledSegment(std::shared_ptr<SegmentPool> pool, kj::Array<capnp::word> segment)
      : pool(std::move(pool)), first(std::move(segment)), used(first.size()) {}
  ~PooledSegment() { pool->give(std::move(first), used); }
  std::shared_ptr<SegmentPool> pool;
  kj::Array<capnp::word> first;
  size_t used;
};
}  // namespace frame_io_internal

// A message whose first segment comes from a SegmentPool and goes back to it when the message is
// destroyed (for example once a FrameWriter has written it).
class PooledMessageBuilder final : private frame_io_internal::PooledSegment,
                                   public capnp::MallocMessageBuilder {
 public:
  PooledMessageBuilder(std::shared_ptr<SegmentPool> pool, kj::Array<capnp::word> first);
  ~PooledMessageBuilder() override;
};

// How a frame of at most `max_frame_bytes` is parsed: its traversal limit (the words a reader may
// visit) is the frame's size, at least 1024 words, so that pointers which alias each other cannot
// make one frame cost more work than its bytes allow. Every reader of a peer's frames uses this.
capnp::ReaderOptions frame_reader_options(size_t max_frame_bytes);

// Writes one whole message to a blocking socket (or any TLS channel, waiting in poll()), retrying
// on EINTR and short writes; with `prefix`, those bytes (whole frames held earlier) go first, in
// the same write.
absl::Status write_frame(ByteStream stream, capnp::MessageBuilder& message,
                         kj::ArrayPtr<const kj::byte> prefix = nullptr);

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
  absl::Status write_some(ByteStream stream);

  bool empty() const { return frames_.empty(); }
  size_t queued_bytes() const { return queued_bytes_; }
  void clear();

  // Frames of `borrower` (BorrowingMessageBuilder) still queued get a copy of their unsent bytes
  // and drop their message: nothing `borrower` lent is read after this returns.
  void release_borrowed(const void* borrower);

 private:
  struct Frame {
    std::unique_ptr<capnp::MessageBuilder> message;
    const void* borrower = nullptr;         // who lent memory its segments reference
    std::unique_ptr<char[]> unsent_copy;    // after release_borrowed: the bytes left to send
    kj::Array<capnp::word> copy;            // for push_copy
    std::vector<uint32_t> table;  // the segment table that precedes the segments
    std::vector<iovec> pieces;    // table, then each segment; consumed from the front
    size_t next_piece = 0;
  };
  std::deque<Frame> frames_;
  size_t queued_bytes_ = 0;
};

// Frees a FrameReader's buffer: from new[], or a mapping of `mapped` bytes.
struct ReadBufferRelease {
  size_t mapped = 0;
  void operator()(capnp::word* words) const;
};
using ReadBuffer = std::unique_ptr<capnp::word[], ReadBufferRelease>;

// Collects bytes from a socket and yields complete frames.
class FrameReader {
 public:
  // `max_frame_bytes`: a frame that declares itself larger is a kDataLoss error. With
  // `huge_buffers`, a buffer that grows to half a megabyte or more is a fresh mapping of whole
  // 2 MiB huge pages (where the system gives them): one page fault instead of hundreds, for a
  // process that keeps one large buffer for its life (a worker).
  explicit FrameReader(size_t max_frame_bytes, bool huge_buffers = false);

  enum class Fill { kData, kWouldBlock, kEndOfFile };
  // One read() into the buffer. Blocks only if the socket does, and `dont_wait` is false (a TLS
  // channel never blocks). kDataLoss when a TLS record fails its check.
  absl::StatusOr<Fill> fill(ByteStream stream, bool dont_wait = false);
  // The last fill() read less than the room it offered: the socket had no more then (over TLS:
  // nothing is left that poll() would not tell of).
  bool drained() const { return drained_; }
  // Appends bytes that came some other way (a test, a fuzzer), as fill() would.
  void append(const void* data, size_t size);

  // The words of the next complete frame, or an empty array when more bytes are needed. Parse
  // them with `capnp::FlatArrayMessageReader(words, options())`. The words borrow the buffer: drop
  // every reader of them before the next call of `next()`, `fill()` or `read_blocking()`.
  // kDataLoss when the buffered bytes cannot be a valid frame (the stream is then unusable).
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> next();

  // Reads until one complete frame is buffered and returns it, as `next()` does (for blocking
  // sockets). kUnavailable at end of file.
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> read_blocking(ByteStream stream);

  const capnp::ReaderOptions& options() const { return options_; }
  // Changes the limit for frames not yet begun (a handshake's small limit, then the pool's).
  void set_max_frame_bytes(size_t max_frame_bytes);

  bool has_partial_frame() const { return end_ - begin_ > consume_; }
  // Bytes buffered that belong to no frame handed out yet (a frame begun).
  size_t partial_bytes() const { return end_ - begin_ - consume_; }
  // True if next() would return a whole frame (or an error) without more bytes.
  bool has_complete_frame() const;

  // Frees the buffer and forgets what it held (a broken stream's bytes, which no one will read).
  void discard();

  // The buffer's size in bytes, and whether it is a huge-page mapping (for tests).
  size_t capacity() const { return capacity_; }
  bool buffer_is_mapped() const { return buffer_.get_deleter().mapped > 0; }

 private:
  void make_room(size_t bytes_needed);

  size_t max_frame_bytes_;
  capnp::ReaderOptions options_;
  // The buffer: from new[], or (huge_buffers_) a mapping (ReadBufferRelease).
  ReadBuffer buffer_;
  bool huge_buffers_ = false;
  size_t capacity_ = 0;   // bytes
  size_t begin_ = 0;      // first unconsumed byte; always word-aligned
  size_t end_ = 0;        // one past the last byte read
  size_t consume_ = 0;    // bytes the frame handed out last will free on the next call
  // The frame begun: its size as its header announces it (0: none, or not known yet). The buffer
  // grows towards it only as its bytes arrive, never to it at once: a peer that announces a huge
  // frame and sends little of it costs what it sent.
  size_t frame_bytes_ = 0;
  bool drained_ = false;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WIRE_FRAME_IO_H_
