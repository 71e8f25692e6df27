// MapCall: a Call whose results are gathered into a vector, in job order (map, map_async,
// starmap). Jobs are read through a Span the caller keeps alive until the call is done, or owned
// by the call (map_async, and inputs that are not a contiguous range of Job, are copied).

#ifndef PROCPOOL_INTERNAL_MAP_CALL_H_
#define PROCPOOL_INTERNAL_MAP_CALL_H_

#include <cstddef>
#include <functional>
#include <limits>
#include <mutex>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "procpool/codec.h"
#include "procpool/internal/call.h"
#include "procpool/internal/completion.h"
#include "procpool/internal/memory.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/reworded.h"
#include "procpool/internal/worker_body.h"
#include "procpool/internal/worker_traits.h"

namespace procpool::internal {

// The jobs of a MapCall: borrowed through a Span the caller keeps alive until the call is done,
// or owned. Owned bools live in a std::vector<bool>, so element access returns bool by value.
template <typename Job>
class JobList {
 public:
  using Ref = std::conditional_t<std::is_same_v<Job, bool>, bool, const Job&>;

  explicit JobList(absl::Span<const Job> borrowed) : borrowed_(borrowed), size_(borrowed.size()) {}
  explicit JobList(std::vector<Job> owned)
      : owned_(std::move(owned)), owns_(true), size_(owned_.size()) {}

  size_t size() const { return size_; }
  Ref operator[](size_t i) const { return owns_ ? Ref(owned_[i]) : Ref(borrowed_[i]); }
  // The jobs as one array (not for bool, whose owned jobs are bits).
  const Job* data() const
    requires(!std::is_same_v<Job, bool>)
  {
    return owns_ ? owned_.data() : borrowed_.data();
  }

 private:
  absl::Span<const Job> borrowed_;
  std::vector<Job> owned_;
  bool owns_ = false;
  size_t size_ = 0;
};

// What a map gathers: the results in job order, or nothing (std::monostate) for a void Result.
template <typename Result>
using Gathered = std::conditional_t<std::is_void_v<Result>, std::monostate, std::vector<Result>>;

// Cancels `call` through its pool (PoolCore::cancel_call): `settle` runs under the core's lock and
// returns false if the call's outcome was already in. False too once the pool is gone (it settles
// every call before it goes).
template <typename T>
bool cancel_call_through_core(Call* call, const Completion<T>& completion,
                              const std::function<bool()>& settle) {
  const std::shared_ptr<CoreLink>& link = completion.link();
  if (link == nullptr) return false;
  bool cancelled = false;
  link->with_core([&](PoolCore& core) {
    cancelled = core.cancel_call(call, absl::CancelledError("cancelled"), settle);
  });
  return cancelled;
}

inline absl::Status cancelled_by_user() {
  return absl::CancelledError("cancelled by AsyncResult::cancel()");
}

// Result may be void: then each task's value is `none` and the call gathers nothing.
template <typename Job, typename Result>
class MapCall final : public Call, public Completion<Gathered<Result>> {
 public:
  using Value = Stored<Result>;
  using Progress = std::function<void(size_t done, size_t total)>;

  MapCall(CallSettings settings, JobList<Job> jobs)
      : Call(settings), jobs_(std::move(jobs)), remaining_(jobs_.size()) {
    if constexpr (!std::is_void_v<Result>) {
      // Reserved, advised, then filled: a large result vector is faulted in as huge pages (a
      // first-touch fault per 4 KiB page costs more than the map's own work).
      slots_.reserve(jobs_.size());
      advise_huge_pages(slots_.data(), jobs_.size() * sizeof(slots_[0]));
      slots_.resize(jobs_.size());
    }
  }

  // An empty call has no task to finish it: completes it (after callbacks were set).
  void complete_if_empty() {
    if (jobs_.size() == 0) this->complete(Gathered<Result>());
  }

  void set_progress(Progress progress) { progress_ = std::move(progress); }

 protected:
  std::function<void()> take_user_closures() override {
    if (!progress_) return nullptr;
    return [progress = std::move(progress_)] {};
  }

 public:

  // The pool refused the call: it completes with that status, without any task.
  void fail_unsubmitted(absl::Status status) { this->complete(std::move(status)); }

  // Every unfinished task is cancelled and the call's result becomes kCancelled; outcomes that
  // still arrive are dropped. False if the result was already in.
  bool cancel() override {
    return cancel_call_through_core<Gathered<Result>>(this, *this, [this] {
      if (!this->complete(cancelled_by_user())) return false;
      cancelled_ = true;
      return true;
    });
  }

  void encode_job(size_t index, wire::Value::Builder out) override {
    encode_value(jobs_[index], out);
  }

  bool on_value(size_t index, wire::Value::Reader value) override {
    if (cancelled_) return true;
    absl::StatusOr<Value> decoded = decode_value<Value>(value);
    if (!decoded.ok()) {
      on_error(index, absl::DataLossError(absl::StrCat("could not decode the result: ",
                                                       decoded.status().message())));
      return false;
    }
    if constexpr (!std::is_void_v<Result>) slots_[index] = *std::move(decoded);
    finish_one();
    return true;
  }

  // Scalars go as words, unless a plain function (whose trampoline has no word form) runs them.
  bool packs_jobs() const override {
    return Scalar<Job> && Scalar<Value> && settings().trampoline == 0;
  }

  void encode_job_words(size_t first, size_t count, wire::TaskBatch::Builder tasks,
                        capnp::Orphanage orphanage, bool borrow) override {
    if constexpr (Scalar<Job>) {
      tasks.setWordKind(word_kind<Job>());
      if constexpr (kWordIsNative<Job>) {
        if (borrow) {
          // The jobs as they lie: no copy here; the kernel reads them from here.
          tasks.adoptWordJobs(orphanage.referenceExternalData(capnp::Data::Reader(
              reinterpret_cast<const kj::byte*>(jobs_.data() + first), count * sizeof(uint64_t))));
          return;
        }
      }
      auto blob = tasks.initWordJobs(static_cast<unsigned>(count * sizeof(uint64_t)));
      auto* words = reinterpret_cast<uint64_t*>(blob.begin());  // a blob starts on a word
      for (size_t i = 0; i < count; ++i) words[i] = to_word<Job>(jobs_[first + i]);
    }
  }

  size_t on_word_results(size_t first, uint32_t count, const uint64_t* words, wire::WordKind kind,
                         absl::Span<const WordFailure> errors) override {
    if (cancelled_) return count;
    if constexpr (Scalar<Value>) {
      Value* out = slots_.data() + first;
      if (errors.size() == 0 && !progress_) {
        // Every task of the piece has its value: settle them at once.
        bool all = true;
        if constexpr (kWordIsNative<Value>) {
          if (kind == word_kind<Value>()) {
            std::memcpy(out, words, size_t{count} * sizeof(uint64_t));
          } else {
            all = false;
          }
        } else {
          for (uint32_t i = 0; i < count && all; ++i) all = from_word(words[i], kind, out[i]);
        }
        if (all) {
          remaining_ -= count;
          if (remaining_ == 0) this->complete(gather());
          return count;
        }
      }
      // `errors` is ascending by index: step through it beside the values.
      size_t cursor = 0;
      size_t decoded = 0;
      for (uint32_t i = 0; i < count; ++i) {
        while (cursor < errors.size() && errors[cursor].index < i) ++cursor;
        if (cursor < errors.size() && errors[cursor].index == i) {
          on_error(first + i, errors[cursor].status);
        } else if (from_word(words[i], kind, out[i])) {
          ++decoded;
          finish_one();
        } else {
          on_error(first + i, absl::DataLossError(absl::StrCat(
                                  "could not decode the result: ",
                                  word_error<Value>(words[i], kind).message())));
        }
      }
      return decoded;
    } else {
      return Call::on_word_results(first, count, words, kind, errors);
    }
  }

  void on_error(size_t index, absl::Status status) override {
    if (cancelled_) return;
    if (index < first_error_index_) {
      first_error_index_ = index;
      first_error_ = std::move(status);
    }
    finish_one();
  }

 private:
  static constexpr size_t kNoError = std::numeric_limits<size_t>::max();

  void finish_one() {
    --remaining_;
    if (progress_) progress_(jobs_.size() - remaining_, jobs_.size());
    if (remaining_ == 0) this->complete(gather());
  }

  // The results in job order, or the first failing job's status (in job order), naming its index.
  absl::StatusOr<Gathered<Result>> gather() {
    if (first_error_index_ != kNoError) {
      return reworded(first_error_,
                      absl::StrCat("job ", first_error_index_, ": ", first_error_.message()));
    }
    if constexpr (std::is_void_v<Result>) {
      return std::monostate();
    } else if constexpr (Scalar<Result>) {
      return std::move(slots_);
    } else {
      std::vector<Result> results;
      results.reserve(slots_.size());
      for (std::optional<Result>& slot : slots_) results.push_back(*std::move(slot));
      return results;
    }
  }

  JobList<Job> jobs_;
  // Touched only by the callbacks above and cancel()'s settle (serialized by the core's lock; see
  // call.h). Scalars are stored as they are (and handed over whole); anything else may lack a
  // default. Empty for a void Result.
  std::vector<std::conditional_t<Scalar<Value>, Value, std::optional<Value>>> slots_;
  size_t remaining_;
  size_t first_error_index_ = kNoError;
  absl::Status first_error_;
  Progress progress_;
  bool cancelled_ = false;
};

// A Call for one job (apply, apply_async). Result may be void (the value is `none`).
template <typename Job, typename Result>
class ApplyCall final : public Call, public Completion<Stored<Result>> {
 public:
  using Value = Stored<Result>;

  ApplyCall(CallSettings settings, Job job) : Call(settings), job_(std::move(job)) {}

  void encode_job(size_t, wire::Value::Builder out) override { encode_value(job_, out); }

  bool on_value(size_t, wire::Value::Reader value) override {
    absl::StatusOr<Value> decoded = decode_value<Value>(value);
    if (!decoded.ok()) {
      this->complete(absl::DataLossError(
          absl::StrCat("could not decode the result: ", decoded.status().message())));
      return false;
    }
    this->complete(*std::move(decoded));  // dropped if cancel() came first
    return true;
  }

  void on_error(size_t, absl::Status status) override { this->complete(std::move(status)); }

  // The task is dropped if not started, its worker stopped if running; the result becomes
  // kCancelled. False if the result was already in.
  bool cancel() override {
    return cancel_call_through_core<Value>(this, *this,
                                           [this] { return this->complete(cancelled_by_user()); });
  }

 private:
  Job job_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_MAP_CALL_H_
