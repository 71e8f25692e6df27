/// \file
/// `Pool`: a process pool for plain functions, like Python's `pool.map(f, xs)`.
///
/// ```cpp
/// int64_t square(const int64_t& x) { return x * x; }
///
/// procpool::Pool pool({.workers = 4});
/// absl::StatusOr<std::vector<int64_t>> squares = pool.map(square, jobs);
/// absl::StatusOr<std::string> name = pool.apply(+[](const int& id) { return lookup(id); }, 7);
/// ```
///
/// Any function, function pointer or lambda without captures works: `R f(const J&)` (or taking J
/// by value), R may be `absl::StatusOr<T>`, or `void` or `absl::Status` for tasks with no value
/// (map then returns `absl::Status`); with several parameters, starmap takes tuples. J and R need
/// a `procpool::Codec` (codec.h). Each call may use a different function on the same workers.
///
/// Why no registration is needed: a worker is a `fork()` of this process, so it runs the same
/// image at the same addresses, and a function's address in the parent names the same function in
/// the worker. The call sends that address (and that of a trampoline that decodes the job and
/// encodes the result). This holds for every worker procpool makes, replacements included,
/// because they are all forks of this process. It would not hold for workers that `exec()` a
/// program (Python's "spawn" start method), whose image is laid out anew; that is why Python
/// pickles functions by name, and why a Pool cannot have remote workers (`PoolOptions::remote`
/// makes every call fail with kInvalidArgument). Captured state does not travel: capture nothing,
/// pass what the function needs in the job.
///
/// Everything else (errors, lifetime, threads, fork safety, faults) is as for `ProcessPool`
/// (process_pool.h): the destructor is `close()` + `join()`.

#ifndef PROCPOOL_POOL_H_
#define PROCPOOL_POOL_H_

#include <concepts>
#include <memory>
#include <ranges>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "procpool/async_result.h"
#include "procpool/call_options.h"
#include "procpool/imap_range.h"
#include "procpool/internal/function_worker.h"
#include "procpool/internal/pool_core.h"
#include "procpool/internal/typed_calls.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool {

/// A pool of forked worker processes that runs plain functions, chosen per call (see the file
/// comment). Every method is thread-safe; contracts are those of the `ProcessPool` method of the
/// same name.
class Pool {
  template <typename F>
  using Traits = internal::FunctionTraits<internal::FunctionPointerOf<F>>;
  template <typename F>
  using JobOf = typename Traits<F>::Job;
  template <typename F>
  using ResultOf = typename Traits<F>::Result;
  template <typename F>
  using Calls = internal::TypedCalls<JobOf<F>, ResultOf<F>>;

 public:
  /// Forks the workers (as `ProcessPool`'s constructor does). Never fails and never throws for a
  /// bad option or a failed start: every later call returns the error (kInvalidArgument naming
  /// the field, or the start failure). Does not wait for the workers to be ready.
  explicit Pool(PoolOptions options = {})
      : core_(std::move(options), [] { return std::make_unique<internal::FunctionWorkerBody>(); }) {}

  /// Runs f on every job; results in job order, or the first failing job's status (see
  /// `ProcessPool::map`). For f returning void or absl::Status, returns absl::Status. Blocks until
  /// every job has an outcome; kFailedPrecondition after close(). `jobs` is read in place.
  template <internal::TaskFunction F>
  internal::MapOutcome<ResultOf<F>> map(F f, absl::Span<const JobOf<F>> jobs,
                                        CallOptions options = {}) {
    return Calls<F>::map(core_, internal::JobList<JobOf<F>>(jobs), std::move(options),
                         internal::function_settings(f));
  }

  /// map over any sized input range whose elements convert to f's job type (copied unless it is
  /// a contiguous range of exactly that type), as `ProcessPool::map`.
  template <internal::TaskFunction F, typename Jobs>
    requires internal::JobRange<Jobs, JobOf<F>> &&
             (!std::convertible_to<Jobs, absl::Span<const JobOf<F>>>)
  internal::MapOutcome<ResultOf<F>> map(F f, Jobs&& jobs, CallOptions options = {}) {
    return Calls<F>::map(core_, internal::borrow_or_copy<JobOf<F>>(std::forward<Jobs>(jobs)),
                         std::move(options), internal::function_settings(f));
  }

  /// map for a function of several parameters: each job is a `std::tuple` of its arguments. Same
  /// outcome, errors and blocking as map.
  template <internal::TaskFunction F>
    requires Traits<F>::kTakesTuple
  internal::MapOutcome<ResultOf<F>> starmap(F f, absl::Span<const JobOf<F>> jobs,
                                            CallOptions options = {}) {
    return map(f, jobs, std::move(options));
  }
  /// starmap over any sized input range of tuples, as map over a range.
  template <internal::TaskFunction F, typename Jobs>
    requires Traits<F>::kTakesTuple && internal::JobRange<Jobs, JobOf<F>> &&
             (!std::convertible_to<Jobs, absl::Span<const JobOf<F>>>)
  internal::MapOutcome<ResultOf<F>> starmap(F f, Jobs&& jobs, CallOptions options = {}) {
    return map(f, std::forward<Jobs>(jobs), std::move(options));
  }

  /// map without blocking (see `ProcessPool::map_async`): the jobs are copied (or moved from an
  /// rvalue vector); `AsyncResult<void>` for f returning void or absl::Status. Errors, including
  /// kFailedPrecondition after close(), arrive in the AsyncResult.
  template <internal::TaskFunction F>
  AsyncResult<internal::Mapped<ResultOf<F>>> map_async(
      F f, std::vector<JobOf<F>> jobs, CallOptions options = {},
      Callbacks<internal::Mapped<ResultOf<F>>> callbacks = {}) {
    return Calls<F>::map_async(core_, std::move(jobs), std::move(options), std::move(callbacks),
                               internal::function_settings(f));
  }
  /// map_async over any input range whose elements convert to f's job type (copied first).
  template <internal::TaskFunction F, typename Jobs>
    requires internal::JobRange<Jobs, JobOf<F>> &&
             (!std::convertible_to<Jobs, std::vector<JobOf<F>>>)
  AsyncResult<internal::Mapped<ResultOf<F>>> map_async(
      F f, Jobs&& jobs, CallOptions options = {},
      Callbacks<internal::Mapped<ResultOf<F>>> callbacks = {}) {
    return map_async(f, internal::job_vector<JobOf<F>>(std::forward<Jobs>(jobs)),
                     std::move(options), std::move(callbacks));
  }

  /// map_async for a function of several parameters: each job is a `std::tuple` of its
  /// arguments. Never blocks; errors arrive in the AsyncResult.
  template <internal::TaskFunction F>
    requires Traits<F>::kTakesTuple
  AsyncResult<internal::Mapped<ResultOf<F>>> starmap_async(
      F f, std::vector<JobOf<F>> jobs, CallOptions options = {},
      Callbacks<internal::Mapped<ResultOf<F>>> callbacks = {}) {
    return map_async(f, std::move(jobs), std::move(options), std::move(callbacks));
  }
  /// starmap_async over any input range of tuples (copied first).
  template <internal::TaskFunction F, typename Jobs>
    requires Traits<F>::kTakesTuple && internal::JobRange<Jobs, JobOf<F>> &&
             (!std::convertible_to<Jobs, std::vector<JobOf<F>>>)
  AsyncResult<internal::Mapped<ResultOf<F>>> starmap_async(
      F f, Jobs&& jobs, CallOptions options = {},
      Callbacks<internal::Mapped<ResultOf<F>>> callbacks = {}) {
    return map_async(f, std::forward<Jobs>(jobs), std::move(options), std::move(callbacks));
  }

  /// Runs f(job) and blocks until its outcome is in (bounded only by the task's timeout): the
  /// result (absl::Status for f returning void or absl::Status), the task's error, or
  /// kFailedPrecondition after close().
  template <internal::TaskFunction F>
  internal::OutcomeOf<ResultOf<F>> apply(F f, JobOf<F> job, CallOptions options = {}) {
    return Calls<F>::apply(core_, std::move(job), std::move(options),
                           internal::function_settings(f));
  }

  /// Runs f(job) without blocking; the outcome arrives in the AsyncResult (`AsyncResult<void>`
  /// for f returning void or absl::Status) and the callbacks; so does kFailedPrecondition after
  /// close().
  template <internal::TaskFunction F>
  AsyncResult<ResultOf<F>> apply_async(F f, JobOf<F> job, CallOptions options = {},
                                       Callbacks<ResultOf<F>> callbacks = {}) {
    return Calls<F>::apply_async(core_, std::move(job), std::move(options), std::move(callbacks),
                                 internal::function_settings(f));
  }

  /// Lazily maps f over any input range, results in input order, as `ProcessPool::imap`: returns
  /// an `ImapRange`; blocks only while iterating; errors arrive as elements.
  template <internal::TaskFunction F, std::ranges::input_range Input>
  auto imap(F f, Input&& input, CallOptions options = {}) {
    return Calls<F>::imap(core_, std::forward<Input>(input), std::move(options), /*ordered=*/true,
                          internal::function_settings(f));
  }

  /// As imap, but yields results as they complete (`ProcessPool::imap_unordered`).
  template <internal::TaskFunction F, std::ranges::input_range Input>
  auto imap_unordered(F f, Input&& input, CallOptions options = {}) {
    return Calls<F>::imap(core_, std::forward<Input>(input), std::move(options), /*ordered=*/false,
                          internal::function_settings(f));
  }

  /// As `ProcessPool::close()`: no new work; work already given still runs. Never blocks; OK
  /// (kFailedPrecondition in a worker that inherited the pool).
  absl::Status close() { return core_.close(); }
  /// As `ProcessPool::join()`: blocks until every worker ran exit() and is reaped, within
  /// `PoolOptions::join_timeout`; kFailedPrecondition unless close() or terminate() came first.
  absl::Status join() { return core_.join(); }
  /// As `ProcessPool::join(absl::Duration)`: waits at most `timeout`, then kDeadlineExceeded
  /// without stopping anyone.
  absl::Status join(absl::Duration timeout) { return core_.join(timeout); }
  /// As `ProcessPool::terminate()`: stops every worker now without exit(); unfinished tasks fail
  /// kCancelled. Blocks until all are reaped.
  void terminate() { core_.terminate(); }
  /// The number of workers: `PoolOptions::workers`, or the CPUs this process may run on when it
  /// was 0, or the size the last `resize()` gave. Never blocks.
  int workers() const { return core_.worker_count(); }
  /// As `ProcessPool::resize()`: `workers` workers from now on; new ones are forked, retired ones
  /// finish the task they run, run exit() and leave. Returns at once. kInvalidArgument outside
  /// 1..4096, kFailedPrecondition after close().
  absl::Status resize(int workers) { return core_.resize(workers); }
  /// A snapshot of the pool and its workers (pool_stats.h). Blocks only for the pool's lock.
  PoolStats stats() const { return core_.stats(); }
  /// With `PoolOptions::metrics_listen`: the "host:port" where `GET /metrics` is served (the port
  /// it got for port 0). Empty without it, or when it could not listen. Never blocks.
  std::string metrics_address() const { return core_.metrics_address(); }

 private:
  internal::PoolCore core_;
};

}  // namespace procpool

#endif  // PROCPOOL_POOL_H_
