#include "lib/wire/frame_io.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"
#include "lib/wire/tls_channel.h"
#include "procpool/internal/memory.h"

namespace procpool::internal {
namespace {

constexpr size_t kInitialReadBuffer = 64 * 1024;
// FrameReader(huge_buffers): buffers of half a megabyte or more are whole 2 MiB huge pages.
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeReadBufferFrom = size_t{512} << 10;
constexpr size_t kMaxPiecesPerSend = 64;

// A read buffer of `bytes`. With `huge` and `bytes` of kHugeReadBufferFrom or more (a multiple of
// 2 MiB then): a fresh mapping aligned to huge pages and advised before it is touched (memory.h),
// so that the kernel faults it in as whole huge pages.
// Fresh, not the heap: heap memory may still be shared with the parent since the fork, and is then
// copied on write page by page whatever it is advised. Falls back to new[] if mmap() fails.
ReadBuffer allocate_read_buffer(size_t bytes, bool huge) {
  if (huge && bytes >= kHugeReadBufferFrom) {
    // Map one huge page more than needed and trim both ends, leaving an aligned mapping of exactly
    // `bytes`.
    void* mapped = ::mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped != MAP_FAILED) {
      const uintptr_t start = reinterpret_cast<uintptr_t>(mapped);
      const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
      if (aligned > start) ::munmap(mapped, aligned - start);
      if (start + kHugePage > aligned) {
        ::munmap(reinterpret_cast<void*>(aligned + bytes), start + kHugePage - aligned);
      }
      advise_huge_pages(reinterpret_cast<void*>(aligned), bytes, kHugePage);
      return ReadBuffer(reinterpret_cast<capnp::word*>(aligned), ReadBufferRelease{bytes});
    }
  }
  return ReadBuffer(new capnp::word[bytes / sizeof(capnp::word)], ReadBufferRelease{0});
}

// The stream framing: (segment count - 1), each segment's size in words, padded to a word.
std::vector<uint32_t> segment_table(kj::ArrayPtr<const kj::ArrayPtr<const capnp::word>> segments) {
  std::vector<uint32_t> table((segments.size() + 2) & ~size_t{1}, 0);
  table[0] = static_cast<uint32_t>(segments.size() - 1);
  for (size_t i = 0; i < segments.size(); ++i) table[i + 1] = segments[i].size();
  return table;
}

std::vector<iovec> frame_pieces(const std::vector<uint32_t>& table,
                                kj::ArrayPtr<const kj::ArrayPtr<const capnp::word>> segments) {
  std::vector<iovec> pieces;
  pieces.reserve(segments.size() + 1);
  pieces.push_back({const_cast<uint32_t*>(table.data()), table.size() * sizeof(uint32_t)});
  for (auto segment : segments) {
    pieces.push_back({const_cast<capnp::word*>(segment.begin()), segment.size() * sizeof(capnp::word)});
  }
  return pieces;
}

// Pieces this small in all are copied into one buffer and sent with send(): cheaper in the kernel
// than a scatter list (one copy-in check instead of one per piece), which counts for the small
// frames of a round trip.
constexpr size_t kCoalesceBytes = 4096;

// Sends from `pieces` (at most kMaxPiecesPerSend of them), returning bytes sent, 0 when the socket
// would block, or an error.
absl::StatusOr<size_t> send_pieces(ByteStream stream, iovec* pieces, size_t count, int flags) {
  count = std::min(count, kMaxPiecesPerSend);
  if (stream.tls != nullptr) return stream.tls->write(pieces, count);
  const int fd = stream.fd;
  size_t total = 0;
  for (size_t i = 0; i < count && total <= kCoalesceBytes; ++i) total += pieces[i].iov_len;
  if (count > 1 && total <= kCoalesceBytes) {
    alignas(8) char flat[kCoalesceBytes];
    char* at = flat;
    for (size_t i = 0; i < count; ++i) {
      std::memcpy(at, pieces[i].iov_base, pieces[i].iov_len);
      at += pieces[i].iov_len;
    }
    while (true) {
      ssize_t sent = ::send(fd, flat, total, flags | MSG_NOSIGNAL);
      if (sent >= 0) return static_cast<size_t>(sent);
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return absl::ErrnoToStatus(errno, "sending a frame");
    }
  }
  msghdr header{};
  header.msg_iov = pieces;
  header.msg_iovlen = count;
  while (true) {
    ssize_t sent = ::sendmsg(fd, &header, flags | MSG_NOSIGNAL);
    if (sent >= 0) return static_cast<size_t>(sent);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return absl::ErrnoToStatus(errno, "sending a frame");
  }
}

// Drops `bytes` from the front of `pieces`, starting at `*next`.
void advance(std::vector<iovec>& pieces, size_t& next, size_t bytes) {
  while (bytes > 0 && next < pieces.size()) {
    iovec& piece = pieces[next];
    size_t taken = std::min(bytes, piece.iov_len);
    piece.iov_base = static_cast<char*>(piece.iov_base) + taken;
    piece.iov_len -= taken;
    bytes -= taken;
    if (piece.iov_len == 0) ++next;
  }
  while (next < pieces.size() && pieces[next].iov_len == 0) ++next;
}

}  // namespace

ByteStream::ByteStream(TlsChannel& channel)
    : fd(channel.fd()), tls(channel.encrypted() ? &channel : nullptr) {}

absl::Status write_frame(ByteStream stream, capnp::MessageBuilder& message,
                         kj::ArrayPtr<const kj::byte> prefix) {
  auto segments = message.getSegmentsForOutput();
  std::vector<uint32_t> table = segment_table(segments);
  std::vector<iovec> pieces = frame_pieces(table, segments);
  if (prefix.size() > 0) {
    pieces.insert(pieces.begin(), iovec{const_cast<kj::byte*>(prefix.begin()), prefix.size()});
  }
  size_t next = 0;
  while (next < pieces.size()) {
    absl::StatusOr<size_t> sent = send_pieces(stream, &pieces[next], pieces.size() - next, 0);
    if (!sent.ok()) return sent.status();
    if (*sent == 0) {
      // A TLS channel's socket is non-blocking: wait for room as a blocking write would.
      pollfd room{stream.fd, POLLOUT, 0};
      if (::poll(&room, 1, -1) < 0 && errno != EINTR) return absl::ErrnoToStatus(errno, "sending a frame");
    }
    advance(pieces, next, *sent);
  }
  return absl::OkStatus();
}

kj::Array<capnp::word> SegmentPool::take(size_t words) {
  // Sizes in powers of two, so that buffers serve messages of similar sizes alike.
  size_t size = 512;
  while (size < words) size *= 2;
  for (size_t i = 0; i < kept_.size(); ++i) {
    if (kept_[i].size() == size) {
      kj::Array<capnp::word> buffer = std::move(kept_[i]);
      kept_.erase(kept_.begin() + static_cast<ptrdiff_t>(i));
      return buffer;
    }
  }
  kj::Array<capnp::word> fresh = kj::heapArray<capnp::word>(size);
  std::memset(fresh.begin(), 0, size * sizeof(capnp::word));
  return fresh;
}

void SegmentPool::give(kj::Array<capnp::word> buffer, size_t used_words) {
  std::memset(buffer.begin(), 0, std::min(used_words, buffer.size()) * sizeof(capnp::word));
  if (kept_.size() >= kMaxKept) kept_.erase(kept_.begin());  // the oldest goes
  kept_.push_back(std::move(buffer));
}

PooledMessageBuilder::PooledMessageBuilder(std::shared_ptr<SegmentPool> pool,
                                           kj::Array<capnp::word> first)
    : PooledSegment(std::move(pool), std::move(first)),
      capnp::MallocMessageBuilder(PooledSegment::first.asPtr()) {}

PooledMessageBuilder::~PooledMessageBuilder() {
  // How much of the first segment to zero again when it goes back (after this builder is gone).
  auto segments = getSegmentsForOutput();
  if (segments.size() > 0 && segments[0].begin() == PooledSegment::first.begin()) {
    used = segments[0].size();
  }
}

void FrameWriter::push(std::unique_ptr<capnp::MessageBuilder> message) {
  Frame frame;
  auto segments = message->getSegmentsForOutput();
  frame.table = segment_table(segments);
  frame.pieces = frame_pieces(frame.table, segments);
  // The table vector's buffer does not move when `frame` is moved, so the first piece stays valid.
  if (const auto* borrowing = dynamic_cast<const BorrowingMessageBuilder*>(message.get())) {
    frame.borrower = borrowing->borrower();
  }
  frame.message = std::move(message);
  for (const iovec& piece : frame.pieces) queued_bytes_ += piece.iov_len;
  frames_.push_back(std::move(frame));
}

void FrameWriter::push_copy(kj::ArrayPtr<const capnp::word> frame) {
  auto copy = kj::heapArray<capnp::word>(frame.size());
  std::memcpy(copy.begin(), frame.begin(), frame.size() * sizeof(capnp::word));
  push_copy(kj::mv(copy));
}

void FrameWriter::push_copy(kj::Array<capnp::word> frame) {
  Frame queued;
  queued.pieces.push_back({frame.begin(), frame.size() * sizeof(capnp::word)});
  queued.copy = kj::mv(frame);
  queued_bytes_ += queued.pieces.front().iov_len;
  frames_.push_back(std::move(queued));
}

absl::Status FrameWriter::write_some(ByteStream stream) {
  std::vector<iovec> gathered;
  while (!frames_.empty()) {
    // Gather the remaining pieces of several frames into one sendmsg.
    gathered.clear();
    for (Frame& frame : frames_) {
      for (size_t i = frame.next_piece; i < frame.pieces.size(); ++i) {
        gathered.push_back(frame.pieces[i]);
        if (gathered.size() == kMaxPiecesPerSend) break;
      }
      if (gathered.size() == kMaxPiecesPerSend) break;
    }
    absl::StatusOr<size_t> sent = send_pieces(stream, gathered.data(), gathered.size(), MSG_DONTWAIT);
    if (!sent.ok()) return sent.status();
    if (*sent == 0) return absl::OkStatus();
    queued_bytes_ -= *sent;
    size_t remaining = *sent;
    while (remaining > 0) {
      Frame& frame = frames_.front();
      size_t before = 0;
      for (size_t i = frame.next_piece; i < frame.pieces.size(); ++i) before += frame.pieces[i].iov_len;
      size_t taken = std::min(remaining, before);
      advance(frame.pieces, frame.next_piece, taken);
      remaining -= taken;
      if (frame.next_piece == frame.pieces.size()) frames_.pop_front();
    }
  }
  return absl::OkStatus();
}

void FrameWriter::release_borrowed(const void* borrower) {
  for (Frame& frame : frames_) {
    if (frame.borrower != borrower) continue;
    size_t unsent = 0;
    for (size_t i = frame.next_piece; i < frame.pieces.size(); ++i) unsent += frame.pieces[i].iov_len;
    auto copy = std::make_unique_for_overwrite<char[]>(unsent);
    char* at = copy.get();
    for (size_t i = frame.next_piece; i < frame.pieces.size(); ++i) {
      std::memcpy(at, frame.pieces[i].iov_base, frame.pieces[i].iov_len);
      at += frame.pieces[i].iov_len;
    }
    frame.pieces.assign(1, iovec{copy.get(), unsent});
    frame.next_piece = 0;
    frame.unsent_copy = std::move(copy);
    frame.message.reset();
    frame.table.clear();
    frame.borrower = nullptr;
  }
}

void FrameWriter::clear() {
  frames_.clear();
  queued_bytes_ = 0;
}

void ReadBufferRelease::operator()(capnp::word* words) const {
  if (mapped > 0) {
    ::munmap(words, mapped);
  } else {
    delete[] words;
  }
}

capnp::ReaderOptions frame_reader_options(size_t max_frame_bytes) {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = std::max<size_t>(max_frame_bytes / sizeof(capnp::word), 1024);
  return options;
}

FrameReader::FrameReader(size_t max_frame_bytes, bool huge_buffers)
    : max_frame_bytes_(max_frame_bytes),
      // Each frame gets its own reader, so the traversal limit bounds the work one frame can cause.
      options_(frame_reader_options(max_frame_bytes)),
      huge_buffers_(huge_buffers) {}

void FrameReader::set_max_frame_bytes(size_t max_frame_bytes) {
  max_frame_bytes_ = max_frame_bytes;
  options_ = frame_reader_options(max_frame_bytes);
}

void FrameReader::discard() {
  buffer_ = ReadBuffer();
  capacity_ = begin_ = end_ = consume_ = frame_bytes_ = 0;
}

void FrameReader::make_room(size_t bytes_needed) {
  size_t pending = end_ - begin_;
  if (begin_ > 0 && (capacity_ - begin_ < bytes_needed || end_ == capacity_)) {
    std::memmove(buffer_.get(), reinterpret_cast<char*>(buffer_.get()) + begin_, pending);
    begin_ = 0;
    end_ = pending;
  }
  if (capacity_ < bytes_needed || end_ == capacity_) {
    // Doubling as bytes arrive, and no further than the frame begun needs.
    size_t capacity = capacity_ * 2;
    if (frame_bytes_ > capacity_) capacity = std::min(capacity, frame_bytes_);
    capacity = std::max({capacity, bytes_needed, kInitialReadBuffer});
    capacity = (capacity + sizeof(capnp::word) - 1) / sizeof(capnp::word) * sizeof(capnp::word);
    if (huge_buffers_ && capacity >= kHugeReadBufferFrom) {
      capacity = (capacity + kHugePage - 1) / kHugePage * kHugePage;
    }
    ReadBuffer bigger = allocate_read_buffer(capacity, huge_buffers_);
    if (pending > 0) {
      std::memcpy(bigger.get(), reinterpret_cast<char*>(buffer_.get()) + begin_, pending);
    }
    buffer_ = std::move(bigger);
    capacity_ = capacity;
    begin_ = 0;
    end_ = pending;
  }
}

absl::StatusOr<FrameReader::Fill> FrameReader::fill(ByteStream stream, bool dont_wait) {
  begin_ += std::exchange(consume_, 0);
  if (begin_ == end_) begin_ = end_ = 0;
  if (capacity_ == 0 || end_ == capacity_) make_room(kInitialReadBuffer);
  if (stream.tls != nullptr) {
    absl::StatusOr<ssize_t> got =
        stream.tls->read(reinterpret_cast<char*>(buffer_.get()) + end_, capacity_ - end_);
    if (!got.ok()) return got.status();
    if (*got < 0) return Fill::kWouldBlock;
    if (*got == 0) return Fill::kEndOfFile;
    drained_ = stream.tls->starved();
    end_ += static_cast<size_t>(*got);
    return Fill::kData;
  }
  const int fd = stream.fd;
  while (true) {
    char* at = reinterpret_cast<char*>(buffer_.get()) + end_;
    ssize_t got = dont_wait ? ::recv(fd, at, capacity_ - end_, MSG_DONTWAIT)
                            : ::read(fd, at, capacity_ - end_);
    if (got > 0) {
      drained_ = static_cast<size_t>(got) < capacity_ - end_;
      end_ += static_cast<size_t>(got);
      return Fill::kData;
    }
    if (got == 0) return Fill::kEndOfFile;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Fill::kWouldBlock;
    return absl::ErrnoToStatus(errno, "reading a frame");
  }
}

void FrameReader::append(const void* data, size_t size) {
  begin_ += std::exchange(consume_, 0);
  if (begin_ == end_) begin_ = end_ = 0;
  make_room(end_ - begin_ + size);
  std::memcpy(reinterpret_cast<char*>(buffer_.get()) + end_, data, size);
  end_ += size;
}

absl::StatusOr<kj::ArrayPtr<const capnp::word>> FrameReader::next() {
  begin_ += std::exchange(consume_, 0);
  if (begin_ == end_) begin_ = end_ = 0;
  size_t available_words = (end_ - begin_) / sizeof(capnp::word);
  if (available_words == 0) return kj::ArrayPtr<const capnp::word>();
  const capnp::word* start = buffer_.get() + begin_ / sizeof(capnp::word);
  uint32_t segment_count_minus_one;
  std::memcpy(&segment_count_minus_one, start, sizeof(uint32_t));
  if (segment_count_minus_one >= 512) {
    return absl::DataLossError(
        absl::StrFormat("malformed frame: it declares %u segments", segment_count_minus_one + 1ull));
  }
  size_t expected_words = capnp::expectedSizeInWordsFromPrefix(
      kj::ArrayPtr<const capnp::word>(start, available_words));
  if (expected_words * sizeof(capnp::word) > max_frame_bytes_) {
    return absl::DataLossError(absl::StrFormat(
        "frame of at least %d bytes exceeds the limit of %d bytes (PoolOptions.max_frame_bytes)",
        expected_words * sizeof(capnp::word), max_frame_bytes_));
  }
  if (expected_words > available_words) {
    // Room comes as its bytes do (fill()): the header's word alone allocates nothing.
    frame_bytes_ = expected_words * sizeof(capnp::word);
    return kj::ArrayPtr<const capnp::word>();
  }
  frame_bytes_ = 0;
  consume_ = expected_words * sizeof(capnp::word);
  return kj::ArrayPtr<const capnp::word>(start, expected_words);
}

bool FrameReader::has_complete_frame() const {
  const size_t begin = begin_ + consume_;
  const size_t available_words = (end_ - begin) / sizeof(capnp::word);
  if (available_words == 0) return false;
  const capnp::word* start = buffer_.get() + begin / sizeof(capnp::word);
  return capnp::expectedSizeInWordsFromPrefix(
             kj::ArrayPtr<const capnp::word>(start, available_words)) <= available_words;
}

absl::StatusOr<kj::ArrayPtr<const capnp::word>> FrameReader::read_blocking(ByteStream stream) {
  while (true) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = next();
    if (!frame.ok() || frame->size() > 0) return frame;
    absl::StatusOr<Fill> filled = fill(stream);
    if (!filled.ok()) return filled.status();
    if (*filled == Fill::kEndOfFile) return absl::UnavailableError("the peer closed the channel");
    if (*filled == Fill::kWouldBlock) {
      // A TLS channel (or a non-blocking socket): wait as a blocking read would.
      pollfd ready{stream.fd, POLLIN, 0};
      (void)::poll(&ready, 1, -1);
    }
  }
}

}  // namespace procpool::internal
