// ImapCall: the Call behind imap (ordered) and imap_unordered. The consumer's thread adds jobs as
// it pulls them from the input and takes outcomes as they come; the pool thread encodes jobs and
// delivers outcomes. A job is kept until its outcome arrives: a worker's death may need it again.
//
// Storage is index-addressed, never a node per item: jobs and outcomes live in a fixed set of
// blocks of `chunksize` slots, one block per chunk the consumer submits. A block is taken by the
// consumer, filled with jobs, submitted (its slots are the call's task indices), and given back
// when every outcome in it has been consumed; with at most max_in_flight jobs taken and not yet
// consumed, twice that many slots are always enough to keep the input flowing even while a few
// stragglers hold their blocks (imap_unordered). Outcomes are published under one lock per piece
// of results the pool thread receives, and the consumer takes every outcome that is in at once
// under one lock, then reads them without it; it is woken only when it waits.

#ifndef PROCPOOL_INTERNAL_IMAP_CALL_H_
#define PROCPOOL_INTERNAL_IMAP_CALL_H_

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "procpool/codec.h"
#include "procpool/internal/call.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {

// Result is what a task's value is stored as (std::monostate for a void task).
template <typename Job, typename Result>
class ImapCall final : public Call {
 public:
  // `chunksize` jobs per block; at most `max_in_flight` (>= chunksize) taken and not consumed.
  ImapCall(CallSettings settings, bool ordered, size_t chunksize, size_t max_in_flight)
      : Call(settings),
        ordered_(ordered),
        chunk_(std::max<size_t>(1, chunksize)),
        blocks_(2 * ((std::max(max_in_flight, chunk_) + chunk_ - 1) / chunk_) + 1),
        jobs_(std::make_unique<Job[]>(blocks_ * chunk_)),
        values_(std::make_unique<Result[]>(blocks_ * chunk_)),
        errors_(std::make_unique<absl::Status[]>(blocks_ * chunk_)),
        state_(std::make_unique<uint8_t[]>(blocks_ * chunk_)),
        block_count_(blocks_, 0),
        block_consumed_(blocks_, 0),
        done_ring_(ordered ? 0 : blocks_ * chunk_) {
    free_blocks_.reserve(blocks_);
    for (size_t b = blocks_; b > 0; --b) free_blocks_.push_back(b - 1);
  }

  // --- The consumer's thread ---------------------------------------------------------------

  // A free block's first slot (its task index), or nullopt if every block still holds outcomes
  // not consumed. Fill it with job(first + i), then submit and call submitted().
  std::optional<size_t> take_block() {
    if (free_blocks_.empty()) return std::nullopt;
    const size_t block = free_blocks_.back();
    free_blocks_.pop_back();
    return block * chunk_;
  }
  Job& job(size_t slot) { return jobs_[slot]; }
  // The block at `first` holds `count` (> 0) jobs, now submitted.
  void submitted(size_t first, size_t count) {
    const size_t block = first / chunk_;
    block_count_[block] = count;
    block_consumed_[block] = 0;
    if (ordered_) order_.push_back(block);
  }
  // A block taken and not submitted after all.
  void give_back(size_t first) { free_blocks_.push_back(first / chunk_); }

  // The next outcome (in input order if ordered, else as they complete). Blocks until there is
  // one; the caller makes sure one is owed.
  absl::StatusOr<Result> next() {
    const size_t slot = ordered_ ? next_in_order() : next_completed();
    absl::StatusOr<Result> outcome = state_[slot] == kValue
                                         ? absl::StatusOr<Result>(std::move(values_[slot]))
                                         : absl::StatusOr<Result>(std::move(errors_[slot]));
    state_[slot] = kPending;
    const size_t block = slot / chunk_;
    if (++block_consumed_[block] == block_count_[block]) {
      free_blocks_.push_back(block);
      if (ordered_) order_.pop_front();
    }
    return outcome;
  }

  // --- The pool thread (Call) ----------------------------------------------------------------

  void encode_job(size_t index, wire::Value::Builder out) override {
    encode_value(jobs_[index], out);
  }

  bool on_value(size_t index, wire::Value::Reader value) override {
    // The slot is read by the consumer only after publish() says it is in.
    absl::Status decoded = decode_value(value, values_[index]);
    if (!decoded.ok()) {
      errors_[index] = absl::DataLossError(
          absl::StrCat("could not decode the result: ", decoded.message()));
    }
    publish(index, 1, decoded.ok() ? kValue : kError);
    return decoded.ok();
  }

  void on_error(size_t index, absl::Status status) override {
    errors_[index] = std::move(status);
    publish(index, 1, kError);
  }

  bool packs_jobs() const override {
    return Scalar<Job> && Scalar<Result> && settings().trampoline == 0;
  }

  void encode_job_words(size_t first, size_t count, wire::TaskBatch::Builder tasks,
                        capnp::Orphanage, bool) override {
    if constexpr (Scalar<Job>) {
      // Copied, never borrowed: a block's slots are reused once consumed.
      tasks.setWordKind(word_kind<Job>());
      auto blob = tasks.initWordJobs(static_cast<unsigned>(count * sizeof(uint64_t)));
      auto* words = reinterpret_cast<uint64_t*>(blob.begin());
      for (size_t i = 0; i < count; ++i) words[i] = to_word<Job>(jobs_[first + i]);
    }
  }

  size_t on_word_results(size_t first, uint32_t count, const uint64_t* words, wire::WordKind kind,
                         absl::Span<const WordFailure> errors) override {
    if constexpr (Scalar<Result>) {
      // A whole piece under one lock: converting words costs little next to a lock per item.
      size_t cursor = 0;
      size_t decoded = 0;
      bool wake = false;
      {
        std::lock_guard lock(mu_);
        for (uint32_t i = 0; i < count; ++i) {
          const size_t slot = first + i;
          while (cursor < errors.size() && errors[cursor].index < i) ++cursor;
          if (cursor < errors.size() && errors[cursor].index == i) {
            errors_[slot] = errors[cursor].status;
            state_[slot] = kError;
          } else if (from_word(words[i], kind, values_[slot])) {
            ++decoded;
            state_[slot] = kValue;
          } else {
            errors_[slot] = absl::DataLossError(absl::StrCat(
                "could not decode the result: ", word_error<Result>(words[i], kind).message()));
            state_[slot] = kError;
          }
          if (!ordered_) done_ring_[done_tail_++ % done_ring_.size()] = slot;
        }
        wake = waiting_;
      }
      if (wake) cv_.notify_one();
      return decoded;
    } else {
      return Call::on_word_results(first, count, words, kind, errors);
    }
  }

 private:
  static constexpr uint8_t kPending = 0;
  static constexpr uint8_t kValue = 1;
  static constexpr uint8_t kError = 2;

  // Makes slots [first, first + count) in, with `state`, and wakes the consumer if it waits.
  void publish(size_t first, size_t count, uint8_t state) {
    bool wake = false;
    {
      std::lock_guard lock(mu_);
      for (size_t i = 0; i < count; ++i) {
        const size_t slot = first + i;
        state_[slot] = state;
        if (!ordered_) done_ring_[done_tail_++ % done_ring_.size()] = slot;
      }
      wake = waiting_;
    }
    if (wake) cv_.notify_one();
  }

  // Ordered: the slot of the next item in input order, once its outcome is in. Under the lock
  // only when no outcome taken earlier is left: it then takes every outcome in the head block
  // that is in, in order.
  size_t next_in_order() {
    const size_t block = order_.front();
    const size_t slot = block * chunk_ + block_consumed_[block];
    if (ready_ == 0) {
      std::unique_lock lock(mu_);
      if (state_[slot] == kPending) {
        waiting_ = true;
        cv_.wait(lock, [&] { return state_[slot] != kPending; });
        waiting_ = false;
      }
      const size_t end = block * chunk_ + block_count_[block];
      size_t s = slot;
      while (s < end && state_[s] != kPending) ++s;
      ready_ = s - slot;
    }
    --ready_;
    return slot;
  }

  // Unordered: the slot of the oldest outcome not yet taken.
  size_t next_completed() {
    if (taken_ == seen_) {
      std::unique_lock lock(mu_);
      if (done_tail_ == taken_) {
        waiting_ = true;
        cv_.wait(lock, [&] { return done_tail_ != taken_; });
        waiting_ = false;
      }
      seen_ = done_tail_;
    }
    return done_ring_[taken_++ % done_ring_.size()];
  }

  const bool ordered_;
  const size_t chunk_;
  const size_t blocks_;
  // Slot i: the job, and its outcome once state_[i] says it is in. Written by the consumer
  // (jobs, before submitting) and the pool thread (outcomes, then state_ under mu_); read by the
  // other side only after that.
  // Arrays, not vectors: a std::vector<bool> has no bool& to hand out.
  std::unique_ptr<Job[]> jobs_;
  std::unique_ptr<Result[]> values_;
  std::unique_ptr<absl::Status[]> errors_;
  std::unique_ptr<uint8_t[]> state_;

  // The consumer's own.
  std::vector<size_t> free_blocks_;
  std::vector<size_t> block_count_;
  std::vector<size_t> block_consumed_;
  std::deque<size_t> order_;  // ordered: blocks in submission order
  size_t ready_ = 0;          // ordered: outcomes of the head block known to be in
  size_t taken_ = 0;          // unordered: entries of done_ring_ taken
  size_t seen_ = 0;           // unordered: entries known to be in

  std::mutex mu_;
  std::condition_variable cv_;
  bool waiting_ = false;            // guarded by mu_
  std::vector<size_t> done_ring_;   // unordered: slots in the order their outcomes came
  size_t done_tail_ = 0;            // guarded by mu_
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_IMAP_CALL_H_
