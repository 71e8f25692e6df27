// TypedWorkerBody<W>: the WorkerBody for a user worker type W.
//
// Lives in the worker process. enter() builds W (through the user's factory, or W's default
// constructor) and runs W::enter if it has one; run() decodes the job, calls W::run and encodes
// what it returns; exit() runs W::exit and destroys W. Every exception user code throws is caught
// here and becomes a status: the worker keeps serving.

#ifndef PROCPOOL_INTERNAL_TYPED_WORKER_BODY_H_
#define PROCPOOL_INTERNAL_TYPED_WORKER_BODY_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "procpool/codec.h"
#include "procpool/internal/blob_region.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/worker_body.h"
#include "procpool/internal/worker_traits.h"

namespace procpool::internal {

// Decodes `job` into `scratch`, calls `invoke(scratch)` (returning R, absl::StatusOr<R>, void or
// absl::Status) and writes its result (`none` for void and absl::Status), or the error, into
// `out`. Nothing escapes: user exceptions become kUnknown, codec failures kDataLoss (job) or
// kInvalidArgument (result). `scratch` is the worker's one Job object, decoded into again for every
// task: decoders overwrite all of a value and may keep its memory (codec.h), so a large string
// job reuses the buffer of the last one instead of faulting in fresh pages every task.
template <typename Job, typename Invoke>
void run_task(wire::Value::Reader job, wire::Outcome::Builder out, Job& scratch,
              Invoke&& invoke_user_code) {
  // The shared region (blob_region.h) is for jobs and results only: user code that encodes or
  // decodes a value itself (to keep it, or send it elsewhere) gets self-contained bytes.
  const auto invoke = [&invoke_user_code](const Job& decoded) -> decltype(auto) {
    const BlobScope user_code(nullptr);
    return invoke_user_code(decoded);
  };
  if (absl::Status read = decode_value(job, scratch); !read.ok()) {
    set_error(out, absl::DataLossError(absl::StrCat("could not decode the job: ", read.message())));
    return;
  }
  Job* decoded = &scratch;
  using Returned = std::remove_cvref_t<decltype(invoke(*decoded))>;
  if constexpr (std::is_void_v<Returned> || std::is_same_v<Returned, absl::Status>) {
    absl::Status status;
    try {
      if constexpr (std::is_void_v<Returned>) {
        invoke(*decoded);
      } else {
        status = invoke(*decoded);
      }
    } catch (...) {
      status = absl::UnknownError(describe_current_exception());
    }
    if (status.ok()) {
      out.initOk().setNone();
    } else {
      set_error(out, status);
    }
    return;
  } else {
    using Result = typename UnwrapStatusOr<Returned>::type;
    std::optional<Result> result;
    try {
      if constexpr (IsStatusOr<Returned>::value) {
        absl::StatusOr<Result> returned = invoke(*decoded);
        if (!returned.ok()) {
          set_error(out, returned.status());
          return;
        }
        result.emplace(*std::move(returned));
      } else {
        result.emplace(invoke(*decoded));
      }
    } catch (...) {
      set_error(out, absl::UnknownError(describe_current_exception()));
      return;
    }
    try {
      encode_value(*result, out.initOk());
    } catch (...) {
      set_error(out, absl::InvalidArgumentError(absl::StrCat("could not encode the result: ",
                                                             describe_current_exception())));
    }
  }
}

// The worker's loop over word jobs [first, end): `run(job)` is the user's run, returning R or
// absl::StatusOr<R>; result i goes to results[i] (which may be jobs[i]). Per task it costs the
// job's conversion, the call and one relaxed store of the task's index (plus, kTimed, a coarse
// clock read and a second store): crash attribution stays exact (the control page names the task
// that was running), while the rest of the bookkeeping is the caller's, per stride. Returns one
// past the last task run (see WordStamps for when that is before `end`).
template <Scalar Job, bool kTimed, typename Run>
uint32_t run_word_loop(const uint64_t* jobs, wire::WordKind kind, uint64_t* results,
                       uint32_t first, uint32_t end, const WordStamps& stamps, WordErrors& errors,
                       Run& run) {
  uint32_t i = first;
  while (i < end) {
    try {
      for (; i < end; ++i) {
        if constexpr (kTimed) {
          const int64_t now = stamps.now();
          if (i > first && now - stamps.stride_start_ns >= stamps.cut_after_ns) return i;
          stamps.started_ns->store(now, std::memory_order_relaxed);
        }
        stamps.task_index->store(i, std::memory_order_relaxed);
        Job job;
        if (!from_word(jobs[i], kind, job)) [[unlikely]] {
          absl::Status why = word_error<Job>(jobs[i], kind);
          errors.emplace_back(i, absl::DataLossError(
                                     absl::StrCat("could not decode the job: ", why.message())));
          continue;
        }
        using Returned = std::remove_cvref_t<decltype(run(job))>;
        if constexpr (IsStatusOr<Returned>::value) {
          Returned returned = run(job);
          if (!returned.ok()) [[unlikely]] {
            errors.emplace_back(i, std::move(returned).status());
            continue;
          }
          results[i] = to_word(*returned);
        } else {
          results[i] = to_word(run(job));
        }
      }
    } catch (...) {
      errors.emplace_back(i, absl::UnknownError(describe_current_exception()));
      ++i;
    }
  }
  return end;
}

template <typename W>
class TypedWorkerBody final : public WorkerBody {
 public:
  using Traits = WorkerTraits<W>;
  using Job = typename Traits::Job;
  using Result = typename Traits::Result;
  using Factory = std::function<std::unique_ptr<W>()>;
  static constexpr bool kPacked = Scalar<Job> && Scalar<Result>;

  explicit TypedWorkerBody(const Factory* factory) : factory_(factory) {}

  absl::Status enter() override {
    const BlobScope user_code(nullptr);  // user code, outside the region (run_task)
    try {
      worker_ = (*factory_)();
      if (worker_ == nullptr) return absl::InternalError("the worker factory returned null");
      if constexpr (Traits::kHasEnter) {
        return run_hook([this] { return worker_->enter(); });
      }
      return absl::OkStatus();
    } catch (...) {
      return absl::UnknownError(absl::StrCat("exception: ", describe_current_exception()));
    }
  }

  void run(wire::TaskBatch::Reader, wire::Value::Reader job,
           wire::Outcome::Builder out) override {
    if (!scratch_) scratch_.emplace();
    run_task<Job>(job, out, *scratch_, [this](const Job& decoded) -> decltype(auto) {
      return invoke_run(*worker_, decoded);
    });
  }

  wire::WordKind result_word_kind() const override {
    if constexpr (kPacked) return word_kind<Result>();
    return wire::WordKind::NONE;
  }

  uint32_t run_words(const uint64_t* jobs, wire::WordKind kind, uint64_t* results,
                     uint32_t first, uint32_t end, const WordStamps& stamps,
                     WordErrors& errors) override {
    if constexpr (kPacked) {
      // Scalars in place, no blobs: the whole loop runs outside the region (run_task).
      const BlobScope user_code(nullptr);
      auto run = [this](const Job& job) -> decltype(auto) { return invoke_run(*worker_, job); };
      if (stamps.started_ns != nullptr) {
        return run_word_loop<Job, true>(jobs, kind, results, first, end, stamps, errors, run);
      }
      return run_word_loop<Job, false>(jobs, kind, results, first, end, stamps, errors, run);
    } else {
      return WorkerBody::run_words(jobs, kind, results, first, end, stamps, errors);
    }
  }

  absl::Status exit() override {
    const BlobScope user_code(nullptr);  // user code, outside the region (run_task)
    absl::Status status;
    try {
      if constexpr (Traits::kHasExit) {
        if (worker_ != nullptr) status = run_hook([this] { return worker_->exit(); });
      }
    } catch (...) {
      status = absl::UnknownError(absl::StrCat("exception: ", describe_current_exception()));
    }
    try {
      worker_.reset();
    } catch (...) {
      if (status.ok()) status = absl::UnknownError(describe_current_exception());
    }
    return status;
  }

 private:
  const Factory* factory_;
  std::unique_ptr<W> worker_;
  std::optional<Job> scratch_;  // every task's job is decoded into it (run_task)
};

// The identity of W for a remote worker's handshake: the pool and the worker program must agree.
template <typename W>
std::string worker_type_name() {
  using Traits = WorkerTraits<W>;
  return describe_worker_type(typeid(W), typeid(typename Traits::Job), typeid(typename Traits::Result));
}

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_TYPED_WORKER_BODY_H_
