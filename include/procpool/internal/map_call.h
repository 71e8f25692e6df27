// MapCall: a Call whose results are gathered into a vector, in job order (map, map_async,
// starmap). Jobs are read through a Span the caller keeps alive until the call is done, or owned
// by the call (map_async copies them).

#ifndef PROCPOOL_INTERNAL_MAP_CALL_H_
#define PROCPOOL_INTERNAL_MAP_CALL_H_

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "procpool/codec.h"
#include "procpool/internal/call.h"

namespace procpool::internal {

template <typename Job, typename Result>
class MapCall final : public Call {
 public:
  using Progress = std::function<void(size_t done, size_t total)>;

  MapCall(CallSettings settings, absl::Span<const Job> jobs, std::vector<Job> owned = {})
      : Call(settings), owned_(std::move(owned)), jobs_(owned_.empty() ? jobs : absl::MakeConstSpan(owned_)),
        slots_(jobs_.size()), remaining_(jobs_.size()) {}

  void encode_job(size_t index, wire::Value::Builder out) override { encode_value(jobs_[index], out); }

  void on_value(size_t index, wire::Value::Reader value) override {
    absl::StatusOr<Result> decoded = decode_value<Result>(value);
    if (!decoded.ok()) {
      on_error(index, absl::DataLossError(absl::StrCat("could not decode the result: ",
                                                       decoded.status().message())));
      return;
    }
    slots_[index].emplace(*std::move(decoded));
    finish_one();
  }

  void on_error(size_t index, absl::Status status) override {
    {
      std::lock_guard lock(mu_);
      if (index < first_error_index_) {
        first_error_index_ = index;
        first_error_ = std::move(status);
      }
    }
    finish_one();
  }

  void set_progress(Progress progress) { progress_ = std::move(progress); }

  // Blocks until every task has an outcome, or `timeout` passes (then false).
  bool wait(absl::Duration timeout = absl::InfiniteDuration()) {
    std::unique_lock lock(mu_);
    auto done = [this] { return remaining_ == 0; };
    if (timeout == absl::InfiniteDuration()) {
      cv_.wait(lock, done);
      return true;
    }
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), done);
  }

  bool ready() const {
    std::lock_guard lock(mu_);
    return remaining_ == 0;
  }

  // The results in job order, or the first failing job's status (in job order), naming its index.
  // Call once, after wait() returned true.
  absl::StatusOr<std::vector<Result>> take() {
    std::lock_guard lock(mu_);
    if (first_error_index_ != kNoError) {
      return absl::Status(first_error_.code(),
                          absl::StrCat("job ", first_error_index_, ": ", first_error_.message()));
    }
    std::vector<Result> results;
    results.reserve(slots_.size());
    for (std::optional<Result>& slot : slots_) results.push_back(*std::move(slot));
    return results;
  }

  size_t size() const { return jobs_.size(); }

 private:
  static constexpr size_t kNoError = std::numeric_limits<size_t>::max();

  void finish_one() {
    size_t done;
    {
      std::lock_guard lock(mu_);
      done = jobs_.size() - --remaining_;
      if (remaining_ == 0) cv_.notify_all();
    }
    if (progress_) progress_(done, jobs_.size());
  }

  std::vector<Job> owned_;
  absl::Span<const Job> jobs_;
  std::vector<std::optional<Result>> slots_;  // written by the pool thread only, before remaining_ drops
  mutable std::mutex mu_;
  std::condition_variable cv_;
  size_t remaining_;
  size_t first_error_index_ = kNoError;
  absl::Status first_error_;
  Progress progress_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_MAP_CALL_H_
