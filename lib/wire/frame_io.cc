#include "lib/wire/frame_io.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"

namespace procpool::internal {
namespace {

constexpr size_t kInitialReadBuffer = 64 * 1024;
constexpr size_t kMaxPiecesPerSend = 64;

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

// Sends from `pieces` (at most kMaxPiecesPerSend of them), returning bytes sent, 0 when the socket
// would block, or an error.
absl::StatusOr<size_t> send_pieces(int fd, iovec* pieces, size_t count, int flags) {
  msghdr header{};
  header.msg_iov = pieces;
  header.msg_iovlen = std::min(count, kMaxPiecesPerSend);
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

absl::Status write_frame(int fd, capnp::MessageBuilder& message) {
  auto segments = message.getSegmentsForOutput();
  std::vector<uint32_t> table = segment_table(segments);
  std::vector<iovec> pieces = frame_pieces(table, segments);
  size_t next = 0;
  while (next < pieces.size()) {
    absl::StatusOr<size_t> sent = send_pieces(fd, &pieces[next], pieces.size() - next, 0);
    if (!sent.ok()) return sent.status();
    advance(pieces, next, *sent);
  }
  return absl::OkStatus();
}

void FrameWriter::push(std::unique_ptr<capnp::MessageBuilder> message) {
  Frame frame;
  auto segments = message->getSegmentsForOutput();
  frame.table = segment_table(segments);
  frame.pieces = frame_pieces(frame.table, segments);
  // The table vector's buffer does not move when `frame` is moved, so the first piece stays valid.
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

absl::Status FrameWriter::write_some(int fd) {
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
    absl::StatusOr<size_t> sent = send_pieces(fd, gathered.data(), gathered.size(), MSG_DONTWAIT);
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

void FrameWriter::clear() {
  frames_.clear();
  queued_bytes_ = 0;
}

FrameReader::FrameReader(size_t max_frame_bytes) : max_frame_bytes_(max_frame_bytes) {
  // Each frame gets its own reader, so the traversal limit bounds the work one frame can cause.
  options_.traversalLimitInWords = std::max<size_t>(max_frame_bytes / sizeof(capnp::word), 1024);
}

void FrameReader::set_max_frame_bytes(size_t max_frame_bytes) {
  max_frame_bytes_ = max_frame_bytes;
  options_.traversalLimitInWords = std::max<size_t>(max_frame_bytes / sizeof(capnp::word), 1024);
}

void FrameReader::make_room(size_t bytes_needed) {
  size_t pending = end_ - begin_;
  if (begin_ > 0 && (capacity_ - begin_ < bytes_needed || end_ == capacity_)) {
    std::memmove(buffer_.get(), reinterpret_cast<char*>(buffer_.get()) + begin_, pending);
    begin_ = 0;
    end_ = pending;
  }
  if (capacity_ < bytes_needed || end_ == capacity_) {
    size_t capacity = std::max({bytes_needed, capacity_ * 2, kInitialReadBuffer});
    capacity = (capacity + sizeof(capnp::word) - 1) / sizeof(capnp::word) * sizeof(capnp::word);
    auto bigger = std::make_unique_for_overwrite<capnp::word[]>(capacity / sizeof(capnp::word));
    if (pending > 0) std::memcpy(bigger.get(), reinterpret_cast<char*>(buffer_.get()) + begin_, pending);
    buffer_ = std::move(bigger);
    capacity_ = capacity;
    begin_ = 0;
    end_ = pending;
  }
}

absl::StatusOr<FrameReader::Fill> FrameReader::fill(int fd) {
  begin_ += std::exchange(consume_, 0);
  if (begin_ == end_) begin_ = end_ = 0;
  if (capacity_ == 0 || end_ == capacity_) make_room(kInitialReadBuffer);
  while (true) {
    ssize_t got = ::read(fd, reinterpret_cast<char*>(buffer_.get()) + end_, capacity_ - end_);
    if (got > 0) {
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
    make_room(expected_words * sizeof(capnp::word));
    return kj::ArrayPtr<const capnp::word>();
  }
  consume_ = expected_words * sizeof(capnp::word);
  return kj::ArrayPtr<const capnp::word>(start, expected_words);
}

absl::StatusOr<kj::ArrayPtr<const capnp::word>> FrameReader::read_blocking(int fd) {
  while (true) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = next();
    if (!frame.ok() || frame->size() > 0) return frame;
    absl::StatusOr<Fill> filled = fill(fd);
    if (!filled.ok()) return filled.status();
    if (*filled == Fill::kEndOfFile) return absl::UnavailableError("the peer closed the channel");
  }
}

}  // namespace procpool::internal
