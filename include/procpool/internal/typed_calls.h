// TypedCalls<Job, Result>: the typed calls (map, map_async, apply, apply_async, imap,
// imap_unordered; starmap and starmap_async are map and map_async) over a PoolCore, shared by ProcessPool<W> and the plain-function Pool. `base`
// carries what the pool kind adds to every call (the function to run, for Pool).

#ifndef PROCPOOL_INTERNAL_TYPED_CALLS_H_
#define PROCPOOL_INTERNAL_TYPED_CALLS_H_

#include <algorithm>
#include <cstddef>
#include <memory>
#include <concepts>
#include <functional>
#include <ranges>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "procpool/async_result.h"
#include "procpool/call_options.h"
#include "procpool/imap_range.h"
#include "procpool/internal/call.h"
#include "procpool/internal/imap_call.h"
#include "procpool/internal/map_call.h"
#include "procpool/internal/pool_core.h"
#include "procpool/internal/worker_traits.h"

namespace procpool::internal {

// Per-call settings from the user's options. `job_count` 0 means unknown (lazy input).
inline CallSettings make_settings(const PoolCore& core, const CallOptions& options,
                                  size_t job_count, CallSettings base = {}) {
  CallSettings settings = base;
  settings.chunksize = options.chunksize;
  if (settings.chunksize == 0) {
    // Python's rule for map: about four chunks per worker. Lazy calls go one task at a time.
    const size_t parts = static_cast<size_t>(core.worker_count()) * 4;
    settings.chunksize = job_count == 0 ? 1 : std::max<size_t>(1, (job_count + parts - 1) / parts);
  }
  if (options.task_timeout) {
    settings.has_task_timeout = true;
    settings.task_timeout = *options.task_timeout;
  }
  settings.retries = options.retries;
  settings.soft_timeout = options.soft_timeout;
  settings.retry_on = options.retry_on;
  settings.retry_backoff = options.retry_backoff;
  return settings;
}

// What a map of Result gathers, as the public API names it: std::vector<Result>, or void.
template <typename Result>
using Mapped = std::conditional_t<std::is_void_v<Result>, void, std::vector<Result>>;

// What map returns: absl::StatusOr<std::vector<Result>>, or absl::Status for a void Result.
template <typename Result>
using MapOutcome = OutcomeOf<Mapped<Result>>;

// What imap keeps of its input, as std::views::all would: a reference to a container it was lent
// (which must outlive the results), the range itself when it was handed over or is a view. Not
// std::views::all itself: its ref_view and owning_view derive from view_interface, which clang
// before 16 cannot instantiate with libstdc++ 12 (LLVM issue 44178), and imap of a
// std::vector must work there.
template <typename R>
class InputRef {
 public:
  explicit InputRef(R& range) : range_(&range) {}
  auto begin() const { return std::ranges::begin(*range_); }
  auto end() const { return std::ranges::end(*range_); }

 private:
  R* range_;
};
template <typename Input>
using KeptInput =
    std::conditional_t<std::is_lvalue_reference_v<Input> &&
                           !std::ranges::view<std::remove_cvref_t<Input>>,
                       InputRef<std::remove_reference_t<Input>>, std::remove_cvref_t<Input>>;

// An input map accepts: a sized input range whose elements convert (implicitly) to Job.
template <typename R, typename Job>
concept JobRange = std::ranges::input_range<R> && std::ranges::sized_range<R> &&
                   std::convertible_to<std::ranges::range_reference_t<R>, Job>;

// The jobs as a vector: moved when they are an rvalue std::vector<Job>, else copied.
template <typename Job, typename R>
  requires JobRange<R, Job>
std::vector<Job> job_vector(R&& jobs) {
  if constexpr (std::is_same_v<std::remove_cvref_t<R>, std::vector<Job>> &&
                !std::is_lvalue_reference_v<R>) {
    return std::move(jobs);
  } else {
    std::vector<Job> copied;
    copied.reserve(std::ranges::size(jobs));
    for (auto&& job : jobs) copied.emplace_back(std::forward<decltype(job)>(job));  // one copy
    return copied;
  }
}

// The jobs of a blocking map: borrowed (zero-copy) when they are a contiguous range of exactly Job,
// else copied. Borrowed jobs must stay alive and unchanged until the map returns.
template <typename Job, typename R>
  requires JobRange<R, Job>
JobList<Job> borrow_or_copy(R&& jobs) {
  if constexpr (std::ranges::contiguous_range<R> &&
                std::is_same_v<std::ranges::range_value_t<R>, Job>) {
    return JobList<Job>(absl::Span<const Job>(std::ranges::data(jobs), std::ranges::size(jobs)));
  } else {
    return JobList<Job>(job_vector<Job>(std::forward<R>(jobs)));
  }
}

// Hands Callbacks<T> to a Completion<Stored<T>> (a void T's on_success takes no value).
template <typename T>
void set_callbacks(Completion<Stored<T>>& completion, Callbacks<T> callbacks) {
  if constexpr (std::is_void_v<T>) {
    std::function<void(const std::monostate&)> on_success;
    if (callbacks.on_success) {
      on_success = [f = std::move(callbacks.on_success)](const std::monostate&) { f(); };
    }
    completion.set_callbacks(std::move(on_success), std::move(callbacks.on_error));
  } else {
    completion.set_callbacks(std::move(callbacks.on_success), std::move(callbacks.on_error));
  }
}

// A call's progress function, as the pool runs it: on the pool thread (or a caller's, in a
// dispatch), under the core's lock, where an exception escaping it would end the program
// (std::terminate) or leave a borrowed worker unreturned. It is logged as an error instead, like a
// callback's, and the call goes on. Calls of the pool from it are refused (HeldLockMark).
inline std::function<void(size_t, size_t)> guard_progress(
    PoolCore& core, std::function<void(size_t, size_t)> progress) {
  return [&core, progress = std::move(progress)](size_t done, size_t total) {
    const PoolCore::HeldLockMark mark(core);
    try {
      progress(done, total);
    } catch (...) {
      core.log(LogSeverity::kError,
               "a progress function threw: " + describe_current_exception());
    }
  };
}

// Result may be void (tasks with no value): see Mapped, MapOutcome and OutcomeOf for what the
// calls then return.
template <typename Job, typename Result>
struct TypedCalls {
  static MapOutcome<Result> map(PoolCore& core, JobList<Job> jobs, CallOptions options,
                                CallSettings base) {
    const size_t count = jobs.size();
    auto call = std::make_shared<MapCall<Job, Result>>(make_settings(core, options, count, base),
                                                       std::move(jobs));
    if (options.progress) call->set_progress(guard_progress(core, std::move(options.progress)));
    if (absl::Status submitted = core.submit(call, 0, count); !submitted.ok()) return submitted;
    call->complete_if_empty();
    call->wait(absl::InfiniteDuration());
    // Frames may still hold the caller's jobs (sent in place) where a worker stalled: copy them
    // out before the caller may free the jobs.
    core.release_borrowed(call.get());
    return to_outcome<Mapped<Result>>(call->take_result());
  }

  static AsyncResult<Mapped<Result>> map_async(PoolCore& core, std::vector<Job> jobs,
                                               CallOptions options,
                                               Callbacks<Mapped<Result>> callbacks,
                                               CallSettings base) {
    const size_t count = jobs.size();
    auto call = std::make_shared<MapCall<Job, Result>>(make_settings(core, options, count, base),
                                                       JobList<Job>(std::move(jobs)));
    if (options.progress) call->set_progress(guard_progress(core, std::move(options.progress)));
    call->bind(&core);
    set_callbacks<Mapped<Result>>(*call, std::move(callbacks));
    if (absl::Status submitted = core.submit(call, 0, count); !submitted.ok()) {
      call->fail_unsubmitted(std::move(submitted));
    } else {
      call->complete_if_empty();
    }
    return AsyncResult<Mapped<Result>>(call);
  }

  static OutcomeOf<Result> apply(PoolCore& core, Job job, CallOptions options, CallSettings base) {
    auto call = std::make_shared<ApplyCall<Job, Result>>(make_settings(core, options, 1, base),
                                                         std::move(job));
    absl::Status submitted = core.run_one(call, [&call] { return call->ready(); });
    if (!submitted.ok()) return submitted;
    call->wait(absl::InfiniteDuration());
    return to_outcome<Result>(call->take_result());
  }

  static AsyncResult<Result> apply_async(PoolCore& core, Job job, CallOptions options,
                                         Callbacks<Result> callbacks, CallSettings base) {
    auto call = std::make_shared<ApplyCall<Job, Result>>(make_settings(core, options, 1, base),
                                                         std::move(job));
    call->bind(&core);
    set_callbacks<Result>(*call, std::move(callbacks));
    if (absl::Status submitted = core.submit(call, 0, 1); !submitted.ok()) {
      call->on_error(0, submitted);
    }
    return AsyncResult<Result>(call);
  }

  template <std::ranges::input_range Input>
  static auto imap(PoolCore& core, Input&& input, CallOptions options, bool ordered,
                   CallSettings base) {
    using View = KeptInput<Input>;
    CallSettings settings = make_settings(core, options, 0, base);
    const size_t max_in_flight =
        options.max_in_flight != 0
            ? options.max_in_flight
            : std::max<size_t>(4 * static_cast<size_t>(core.worker_count()),
                               (4 * static_cast<size_t>(core.worker_count()) + 1) * settings.chunksize);
    auto call = std::make_shared<ImapCall<Job, Stored<Result>>>(settings, ordered,
                                                                settings.chunksize, max_in_flight);
    return ImapRange<Job, Result, View>(&core, std::move(call), View(std::forward<Input>(input)),
                                        settings.chunksize, max_in_flight);
  }
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_TYPED_CALLS_H_
