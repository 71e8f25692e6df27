// MapCall: a Call whose results are gathered into a vector, in job order (map, map_async,
// starmap). Jobs are read through a Span the caller keeps alive until the call is done, or owned
// by the call (map_async copies them).

#ifndef PROCPOOL_INTERNAL_MAP_CALL_H_
#define PROCPOOL_INTERNAL_MAP_CALL_H_

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
#include "absl/types/span.h"
#include "procpool/codec.h"
#include "procpool/internal/call.h"
#include "procpool/internal/completion.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {

template <typename Job, typename Result>
class MapCall final : public Call, public Completion<std::vector<Result>> {
 public:
  using Progress = std::function<void(size_t done, size_t total)>;

  // Borrows `jobs` (they must outlive the call) unless `owned` is given, then reads those.
  MapCall(CallSettings settings, absl::Span<const Job> jobs, std::vector<Job> owned = {})
      : Call(settings),
        owned_(std::move(owned)),
        jobs_(owned_.empty() ? jobs : absl::MakeConstSpan(owned_)),
        slots_(jobs_.size()),
        remaining_(jobs_.size()) {}

  // An empty call has no task to finish it: completes it (after callbacks were set).
  void complete_if_empty() {
    if (jobs_.empty()) this->complete(std::vector<Result>());
  }

  void set_progress(Progress progress) { progress_ = std::move(progress); }

  // The pool refused the call: it completes with that status, without any task.
  void fail_unsubmitted(absl::Status status) { this->complete(std::move(status)); }

  void encode_job(size_t index, wire::Value::Builder out) override { encode_value(jobs_[index], out); }

  bool on_value(size_t index, wire::Value::Reader value) override {
    absl::StatusOr<Result> decoded = decode_value<Result>(value);
    if (!decoded.ok()) {
      on_error(index, absl::DataLossError(absl::StrCat("could not decode the result: ",
                                                       decoded.status().message())));
      return false;
    }
    slots_[index] = *std::move(decoded);
    finish_one();
    return true;
  }

  // Scalars go packed, unless a plain function (whose trampoline has no packed form) runs them.
  bool packs_jobs() const override {
    return Scalar<Job> && Scalar<Result> && settings().trampoline == 0;
  }

  void encode_jobs_packed(size_t first, size_t count, wire::Value::Builder out) override {
    if constexpr (Scalar<Job>) {
      PackedWriter writer = PackedWriter::make<Job>(out, static_cast<uint32_t>(count));
      for (size_t i = 0; i < count; ++i) writer.set<Job>(static_cast<uint32_t>(i), jobs_[first + i]);
    }
  }

  size_t on_packed_results(size_t first, uint32_t count, wire::Value::Reader values,
                           capnp::List<wire::TaskError>::Reader errors) override {
    if constexpr (Scalar<Result>) {
      // `errors` is ascending by index: skip those entries while reading the values.
      auto is_error = [&errors](size_t& cursor, uint32_t i) {
        while (cursor < errors.size() && errors[cursor].getIndex() < i) ++cursor;
        return cursor < errors.size() && errors[cursor].getIndex() == i;
      };
      size_t cursor = 0;
      // Entries [0, readable) were read (failed tasks' entries too: unused, their errors win).
      const PackedReader packed(values);
      uint32_t readable = 0;
      absl::Status read;
      while (readable < count && (read = packed.get(readable, slots_[first + readable])).ok()) {
        ++readable;
      }
      if (errors.size() == 0 && readable == count && !progress_) {
        // Every task of the piece has its value: settle them at once.
        remaining_ -= count;
        if (remaining_ == 0) this->complete(gather());
        return count;
      }
      size_t decoded = 0;
      for (uint32_t i = 0; i < count; ++i) {
        if (is_error(cursor, i)) {
          absl::Status failed = status_from_wire(errors[cursor].getError());
          on_error(first + i, failed.ok() ? absl::UnknownError("failed without a status") : failed);
        } else if (i < readable) {
          ++decoded;
          finish_one();
        } else {
          on_error(first + i, absl::DataLossError(absl::StrCat(
                                  "could not decode the result: ",
                                  read.ok() ? absl::string_view("missing") : read.message())));
        }
      }
      return decoded;
    } else {
      return Call::on_packed_results(first, count, values, errors);
    }
  }

  void on_error(size_t index, absl::Status status) override {
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
  absl::StatusOr<std::vector<Result>> gather() {
    if (first_error_index_ != kNoError) {
      return absl::Status(first_error_.code(),
                          absl::StrCat("job ", first_error_index_, ": ", first_error_.message()));
    }
    if constexpr (Scalar<Result>) {
      return std::move(slots_);
    } else {
      std::vector<Result> results;
      results.reserve(slots_.size());
      for (std::optional<Result>& slot : slots_) results.push_back(*std::move(slot));
      return results;
    }
  }

  std::vector<Job> owned_;
  absl::Span<const Job> jobs_;
  // Touched only by the callbacks above (serialized by the core's lock; see call.h).
  // Scalars are stored as they are (and handed over whole); anything else may lack a default.
  std::vector<std::conditional_t<Scalar<Result>, Result, std::optional<Result>>> slots_;
  size_t remaining_;
  size_t first_error_index_ = kNoError;
  absl::Status first_error_;
  Progress progress_;
};

// A Call for one job (apply, apply_async).
template <typename Job, typename Result>
class ApplyCall final : public Call, public Completion<Result> {
 public:
  ApplyCall(CallSettings settings, Job job) : Call(settings), job_(std::move(job)) {}

  void encode_job(size_t, wire::Value::Builder out) override { encode_value(job_, out); }

  bool on_value(size_t, wire::Value::Reader value) override {
    absl::StatusOr<Result> decoded = decode_value<Result>(value);
    if (!decoded.ok()) {
      this->complete(absl::DataLossError(
          absl::StrCat("could not decode the result: ", decoded.status().message())));
      return false;
    }
    this->complete(*std::move(decoded));
    return true;
  }

  void on_error(size_t, absl::Status status) override { this->complete(std::move(status)); }

 private:
  Job job_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_MAP_CALL_H_
