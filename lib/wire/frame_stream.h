// FrameStream: a peer's byte stream on a non-blocking socket, read as whole frames.
//
// It owns what every reader of a peer's stream needs and must not get wrong: the FrameReader (its
// buffer and size limit, checked before anything is buffered), the order of reading (frames
// already buffered first, then a bounded number of reads, so that one peer's flood cannot starve
// the others), and the partial-frame clock: a frame the peer begins must be complete within
// frame_timeout, counted from the read that brought its first byte, or the stream is broken — a
// peer cannot hold a reader by sending half a frame. A ForkLink's channel, a TcpLink's data
// connection and a RemoteHost's control connection each hold one.
//
// Errors are phrased after the peer ("sent a bad frame: ..."): the holder puts its name first.
// Not thread-safe; one owner per socket.

#ifndef PROCPOOL_LIB_WIRE_FRAME_STREAM_H_
#define PROCPOOL_LIB_WIRE_FRAME_STREAM_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "lib/wire/frame_io.h"

namespace procpool::internal {

// Bytes held in unfinished frames (frames begun, not complete) over many streams at once, bounded
// together: a remote pool's connections share one, so that peers which begin frames and send
// them slowly, or not at all to the end, cannot together make the pool hold more than the budget.
// One frame is left out of the count, the largest, so that a single frame over the budget (up to
// max_frame_bytes) still arrives; the rest share the budget, and a stream whose read takes them
// over it breaks (FrameStream::read). Not thread-safe: the streams' owner's thread only.
class FrameBudget {
 public:
  explicit FrameBudget(size_t bytes) : budget_(bytes) {}
  size_t budget() const { return budget_; }
  // Bytes held by every stream now.
  size_t held() const { return total_; }

  // One stream's share. Move-only; gives back what it holds when destroyed.
  class Account {
   public:
    Account() = default;
    explicit Account(std::shared_ptr<FrameBudget> budget);
    Account(Account&& other) noexcept;
    Account& operator=(Account&& other) noexcept;
    ~Account();
    explicit operator bool() const { return budget_ != nullptr; }
    // Says that the stream now holds `bytes`; false (and holds nothing) when that takes what all
    // but the largest holder hold over the budget.
    bool hold(size_t bytes);
    size_t budget_bytes() const { return budget_ ? budget_->budget() : 0; }

   private:
    std::shared_ptr<FrameBudget> budget_;
    size_t id_ = 0;
  };

 private:
  size_t budget_;
  size_t total_ = 0;
  size_t next_id_ = 1;
  std::vector<std::pair<size_t, size_t>> holders_;  // (account id, bytes), for those holding any
};

class FrameStream {
 public:
  // Frames larger than `max_frame_bytes` break the stream (kDataLoss) before they are buffered.
  FrameStream(size_t max_frame_bytes, absl::Duration frame_timeout);
  // Goes on from `reader`, with what it has buffered (a connection whose first frames someone else
  // read, such as a worker's data connection after its attach frame).
  FrameStream(FrameReader reader, absl::Duration frame_timeout);

  FrameStream(FrameStream&&) = default;
  FrameStream& operator=(FrameStream&&) = default;

  // How read() left the stream.
  struct ReadResult {
    // The peer closed its end, or reading failed: nothing more will come. `why` is OK at a clean
    // end of file, the read's error otherwise (unless `broken` says more).
    bool closed = false;
    // The peer broke the stream: `why` is kDataLoss ("sent a bad frame: ...", "sent a truncated
    // frame before it closed its end", or the TLS channel's "TLS record authentication failed
    // ...": TlsChannel::record_failed()), or kResourceExhausted (it took the streams'
    // FrameBudget over). Read no more of it.
    bool broken = false;
    absl::Status why;
  };

  // Hands `on_frame` every complete frame already buffered, then reads from `stream` and hands on
  // what each read completes, until the socket would block or a read took all there was (poll()
  // tells of more), the peer closes or breaks the stream (a TLS record that fails its check breaks
  // it), or `max_reads` reads were made and TLS holds nothing poll() cannot see (0: no bound,
  // for a reader that must take everything the peer wrote, such as before a dead worker's held
  // frames). `on_frame`'s words borrow the buffer for the call; it returns false to stop (its
  // holder closed the stream, or must not read on). Never blocks.
  ReadResult read(ByteStream stream, int max_reads,
                  absl::FunctionRef<bool(kj::ArrayPtr<const capnp::word>)> on_frame);

  // The partial-frame clock. OK while no frame is begun or the one begun is still within
  // frame_timeout (then `next_ns` is lowered to its deadline); kDataLoss ("began a frame and did
  // not finish it within frame_timeout (...)") once it is past that.
  absl::Status check(int64_t now_ns, int64_t& next_ns) const;

  // CLOCK_MONOTONIC of the last read that brought bytes (0 before any): a heartbeat's clock.
  int64_t last_read_ns() const { return last_read_ns_; }
  // When the frame now begun started to arrive; 0 when none is.
  int64_t partial_since_ns() const { return partial_since_ns_; }
  bool has_partial_frame() const { return reader_.has_partial_frame(); }

  // The reader: its parsing options, its limit (a handshake's small one, then the pool's), or the
  // reader itself for whoever goes on reading this connection.
  FrameReader& reader() { return reader_; }
  const capnp::ReaderOptions& options() const { return reader_.options(); }

  // From now on, what this stream holds in a frame begun counts against `budget` (FrameBudget);
  // a read that takes it over breaks the stream (kResourceExhausted).
  void share_budget(std::shared_ptr<FrameBudget> budget) { account_ = FrameBudget::Account(std::move(budget)); }

 private:
  // Hands out the frames buffered, and sets the clock of a frame left begun (`read_ns`: the read
  // that brought the bytes; 0: none, they were buffered before). False when the stream broke or
  // `on_frame` said stop.
  bool drain(absl::FunctionRef<bool(kj::ArrayPtr<const capnp::word>)> on_frame, int64_t read_ns,
             ReadResult& result);

  FrameReader reader_;
  absl::Duration frame_timeout_;
  int64_t partial_since_ns_ = 0;  // a frame has begun and not ended since then; 0: none
  bool partial_record_ = false;   // over TLS: part of a record is in hand (it starts the clock too)
  int64_t last_read_ns_ = 0;
  absl::Status broken_;  // once the peer broke the stream: why; nothing more is read
  FrameBudget::Account account_;

};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WIRE_FRAME_STREAM_H_
