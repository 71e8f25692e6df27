#include "lib/wire/frame_stream.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "lib/common/clock.h"
#include "lib/wire/tls_channel.h"

namespace procpool::internal {

FrameBudget::Account::Account(std::shared_ptr<FrameBudget> budget) : budget_(std::move(budget)) {
  if (budget_) id_ = budget_->next_id_++;
}

FrameBudget::Account::Account(Account&& other) noexcept
    : budget_(std::move(other.budget_)), id_(std::exchange(other.id_, 0)) {}

FrameBudget::Account& FrameBudget::Account::operator=(Account&& other) noexcept {
  if (this != &other) {
    if (budget_) hold(0);
    budget_ = std::move(other.budget_);
    id_ = std::exchange(other.id_, 0);
  }
  return *this;
}

FrameBudget::Account::~Account() {
  if (budget_) hold(0);
}

bool FrameBudget::Account::hold(size_t bytes) {
  if (!budget_) return true;
  FrameBudget& shared = *budget_;
  auto mine = std::find_if(shared.holders_.begin(), shared.holders_.end(),
                           [this](const auto& holder) { return holder.first == id_; });
  if (mine != shared.holders_.end()) {
    shared.total_ -= mine->second;
    shared.holders_.erase(mine);
  }
  if (bytes == 0) return true;
  shared.holders_.emplace_back(id_, bytes);
  shared.total_ += bytes;
  if (shared.total_ <= shared.budget_) return true;
  // Over the budget in all: what matters is the rest beside the largest frame. Holding the budget
  // before, the others cannot have taken it over: only this stream can have, and it lets go.
  size_t largest = 0;
  for (const auto& holder : shared.holders_) largest = std::max(largest, holder.second);
  if (shared.total_ - largest <= shared.budget_) return true;
  shared.total_ -= bytes;
  shared.holders_.pop_back();
  return false;
}

FrameStream::FrameStream(size_t max_frame_bytes, absl::Duration frame_timeout)
    : reader_(max_frame_bytes), frame_timeout_(frame_timeout) {}

FrameStream::FrameStream(FrameReader reader, absl::Duration frame_timeout)
    : reader_(std::move(reader)), frame_timeout_(frame_timeout) {}

FrameStream::ReadResult FrameStream::read(
    ByteStream stream, int max_reads,
    absl::FunctionRef<bool(kj::ArrayPtr<const capnp::word>)> on_frame) {
  ReadResult result;
  if (!broken_.ok()) {
    result.broken = true;
    result.why = broken_;
    return result;
  }
  // Frames buffered already go first (those that came with bytes someone else read, or that a
  // holder which stopped early left): poll() will not tell of them.
  if (!drain(on_frame, /*read_ns=*/0, result)) return result;
  // Past max_reads, what TLS decrypted or read ahead is still taken: poll() would not tell of it.
  for (int reads = 0;
       max_reads == 0 || reads < max_reads || (stream.tls != nullptr && stream.tls->buffered());
       ++reads) {
    absl::StatusOr<FrameReader::Fill> filled = reader_.fill(stream);
    if (filled.ok() && *filled == FrameReader::Fill::kWouldBlock) break;
    if (!filled.ok() && filled.status().code() == absl::StatusCode::kDataLoss) {
      // A TLS record that failed its check: someone on the path (or the peer) broke the stream.
      // Its status says so itself; the holder asks the channel (record_failed()) whose doing.
      result.closed = true;
      result.broken = true;
      result.why = broken_ = filled.status();
      partial_since_ns_ = 0;
      return result;
    }
    if (!filled.ok() || *filled == FrameReader::Fill::kEndOfFile) {
      result.closed = true;
      // Part of a frame left over means the peer wrote garbage, not that it merely went away.
      if (reader_.has_partial_frame()) {
        result.broken = true;
        result.why = broken_ =
            absl::DataLossError("sent a truncated frame before it closed its end");
        reader_.discard();
      } else {
        result.why = filled.ok() ? absl::OkStatus() : filled.status();
      }
      partial_since_ns_ = 0;
      if (account_) account_.hold(0);
      return result;
    }
    last_read_ns_ = monotonic_now_ns();
    if (!drain(on_frame, last_read_ns_, result)) return result;
    if (account_ && !account_.hold(reader_.partial_bytes())) {
      result.broken = true;
      result.why = broken_ = absl::ResourceExhaustedError(absl::StrCat(
          "sent part of a frame while its pool held ", account_.budget_bytes() >> 20,
          " MiB of unfinished frames from its remote connections (their budget): dropped"));
      reader_.discard();  // the memory goes too, not only its count
      partial_since_ns_ = 0;
      return result;
    }
    // A short read took all there was: another would only say EAGAIN (poll tells of more).
    if (reader_.drained()) break;
  }
  // Half a TLS record holds a reader as half a frame would: the same clock.
  partial_record_ = stream.tls != nullptr && stream.tls->has_partial_record();
  if (partial_record_ && partial_since_ns_ == 0) partial_since_ns_ = monotonic_now_ns();
  if (!partial_record_ && !reader_.has_partial_frame()) partial_since_ns_ = 0;
  return result;
}

bool FrameStream::drain(absl::FunctionRef<bool(kj::ArrayPtr<const capnp::word>)> on_frame,
                        int64_t read_ns, ReadResult& result) {
  bool completed = false;
  bool go_on = true;
  while (go_on) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader_.next();
    if (!frame.ok()) {
      result.broken = true;
      result.why = broken_ =
          absl::DataLossError(absl::StrCat("sent a bad frame: ", frame.status().message()));
      reader_.discard();
      if (account_) account_.hold(0);
      partial_since_ns_ = 0;
      return false;
    }
    if (frame->size() == 0) break;
    completed = true;
    go_on = on_frame(*frame);
  }
  // The clock of the frame now begun starts with the read that brought its first byte: that read
  // completed the frame before it, or no frame was begun before it.
  if (!reader_.has_partial_frame() && !partial_record_) {
    partial_since_ns_ = 0;
  } else if (partial_since_ns_ == 0 || (completed && read_ns != 0)) {
    partial_since_ns_ = read_ns != 0 ? read_ns : monotonic_now_ns();
  }
  return go_on;
}

absl::Status FrameStream::check(int64_t now_ns, int64_t& next_ns) const {
  if (partial_since_ns_ == 0 || !broken_.ok()) return absl::OkStatus();
  const int64_t deadline = partial_since_ns_ + to_ns(frame_timeout_);
  if (now_ns < deadline) {
    next_ns = std::min(next_ns, deadline);
    return absl::OkStatus();
  }
  return absl::DataLossError(absl::StrCat("began a frame and did not finish it within frame_timeout (",
                                          absl::FormatDuration(frame_timeout_), ")"));
}

}  // namespace procpool::internal
