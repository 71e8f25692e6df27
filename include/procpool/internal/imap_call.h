// ImapCall: the Call behind imap (ordered) and imap_unordered. The consumer's thread adds jobs as
// it pulls them from the input and takes outcomes as they come; the pool thread encodes jobs and
// delivers outcomes. A job is kept until its outcome arrives: a worker's death may need it again.

#ifndef PROCPOOL_INTERNAL_IMAP_CALL_H_
#define PROCPOOL_INTERNAL_IMAP_CALL_H_

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <map>
#include <mutex>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "procpool/codec.h"
#include "procpool/internal/call.h"

namespace procpool::internal {

template <typename Job, typename Result>
class ImapCall final : public Call {
 public:
  ImapCall(CallSettings settings, bool ordered) : Call(settings), ordered_(ordered) {}

  // Consumer thread: stores the job under the next index and returns that index.
  size_t add_job(Job job) {
    std::lock_guard lock(mu_);
    jobs_.emplace(next_index_, std::move(job));
    return next_index_++;
  }

  // Consumer thread: the next outcome (in input order if ordered, else as they complete). Blocks
  // until there is one; the caller makes sure one is owed.
  absl::StatusOr<Result> next() {
    std::unique_lock lock(mu_);
    if (ordered_) {
      cv_.wait(lock, [this] { return done_.count(next_out_) > 0; });
      auto node = done_.extract(next_out_++);
      return std::move(node.mapped());
    }
    cv_.wait(lock, [this] { return !done_.empty(); });
    auto node = done_.extract(done_.begin());
    return std::move(node.mapped());
  }

  void encode_job(size_t index, wire::Value::Builder out) override {
    std::lock_guard lock(mu_);
    encode_value(jobs_.at(index), out);
  }

  bool on_value(size_t index, wire::Value::Reader value) override {
    absl::StatusOr<Result> decoded = decode_value<Result>(value);
    const bool ok = decoded.ok();
    if (!ok) {
      decoded = absl::DataLossError(
          absl::StrCat("could not decode the result: ", decoded.status().message()));
    }
    finish(index, std::move(decoded));
    return ok;
  }

  void on_error(size_t index, absl::Status status) override { finish(index, std::move(status)); }

 private:
  void finish(size_t index, absl::StatusOr<Result> outcome) {
    {
      std::lock_guard lock(mu_);
      jobs_.erase(index);
      // Unordered outcomes are keyed by arrival, so begin() is the oldest.
      done_.emplace(ordered_ ? index : arrivals_++, std::move(outcome));
    }
    cv_.notify_all();
  }

  const bool ordered_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<size_t, Job> jobs_;                       // added, outcome not yet in
  std::map<size_t, absl::StatusOr<Result>> done_;    // outcome in, not yet taken
  size_t next_index_ = 0;
  size_t next_out_ = 0;
  size_t arrivals_ = 0;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_IMAP_CALL_H_
