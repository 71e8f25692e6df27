/// \file
/// `ProcessPool<W>`: a pool of worker processes, each owning one W, that runs `W::run` over jobs.
///
/// What Python's multiprocessing.Pool is to Python, for C++: N processes are forked once and kept;
/// each builds its own W after the fork, runs `W::enter()` once (open files, connections),
/// `W::run(job)` for every task it is handed, and `W::exit()` once at shutdown (flush, close). Jobs
/// and results cross the process boundary as Cap'n Proto messages over one socketpair per worker
/// (see codec.h for the types that can cross, and how to teach it yours).
///
/// ```cpp
/// struct Squarer {
///   using Job = int64_t;
///   using Result = int64_t;
///   int64_t run(int64_t x) { return x * x; }
/// };
///
/// {
///   procpool::ProcessPool<Squarer> pool({.workers = 4});
///   absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
/// }  // close() then join(): every worker's exit() has finished here
/// ```
///
/// **Worker type.** `run(const Job&)` returns Result or `absl::StatusOr<Result>`, or `void` or
/// `absl::Status` for tasks with no value (then map returns `absl::Status`, apply `absl::Status`,
/// apply_async and map_async `AsyncResult<void>`, imap yields `absl::Status`); `enter()` and
/// `exit()` are optional and return `void` or `absl::Status`. Job and Result can be deduced from a
/// non-overloaded run. An exception thrown by run becomes that task's kUnknown status with the
/// exception's type and `what()`; the worker carries on.
///
/// **Errors.** One mapping everywhere (README, "Errors: one code per cause"; docs/guide.md): a
/// task past its timeout is kDeadlineExceeded; a worker that died is kAborted naming pid and
/// signal or exit status; calls after `close()` are kFailedPrecondition; a frame or value that
/// cannot be decoded is kDataLoss; a job or result over max_frame_bytes is kResourceExhausted; a
/// user exception is kUnknown; a bad option is kInvalidArgument. Nothing waits forever.
///
/// **Faults.** A worker that dies while running a task (a signal, an exit, a kill at the task
/// timeout) fails that task (kAborted naming pid and signal or status; kDeadlineExceeded for a
/// timeout) and is replaced at once; tasks it had not started run on another worker; tasks it
/// finished whose results had not reached us yet (only short ones: a result of a task over 200 us
/// is sent at once) fail with kAborted too. `CallOptions::retries` runs such tasks again instead.
/// Only start failures (fork failed, death or failure before `enter()` returned) count against
/// the pool: they are retried with growing delays (`PoolOptions::respawn_delay`), and while no
/// worker can start, calls fail at once with the cause; the pool recovers by itself.
///
/// **Lifetime.** The destructor is `close()` + `join()`: work already given finishes, every
/// `exit()` runs, every child is reaped, all within `PoolOptions::join_timeout`; past it workers
/// are killed. It never calls `terminate()`. It logs a failed join as an error.
///
/// **Threads.** All methods are thread-safe. The pool runs one thread of its own (the pool
/// thread), which does all I/O with the workers; calls block their caller only.
///
/// **Fork safety.** Workers are `fork()`s of this process, made in the constructor before the
/// pool thread starts when it runs on the main thread (else by the pool thread, which outlives
/// none of them); replacements are forked by the pool thread. A worker gets a copy of the
/// parent's memory as it is then, and only stdin, stdout, stderr and its channel of its
/// descriptors: it closes the rest. It ignores SIGINT (the parent decides what Ctrl-C means) and
/// dies with the parent (PR_SET_PDEATHSIG, plus end of file on its channel). If other threads of
/// the program may hold locks that W's constructor or hooks need while a fork happens, create the
/// pool before them (or use `StartMethod::kForkServer`). A pool inherited by a worker refuses to
/// be used there, a global one called by its own workers' tasks included: its calls return
/// kFailedPrecondition, and its destructor (at the worker's `exit()`) does nothing. A pool made
/// inside a worker is that worker's own and works. (A pool in a function-local `static` cannot be
/// reached from its own workers: they were forked while that static was being initialized, and
/// reaching it there aborts the worker. Make a global pool a namespace-scope object.)

#ifndef PROCPOOL_PROCESS_POOL_H_
#define PROCPOOL_PROCESS_POOL_H_

#include <concepts>
#include <cstddef>
#include <functional>
#include <memory>
#include <ranges>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "procpool/async_result.h"
#include "procpool/call_options.h"
#include "procpool/codec.h"
#include "procpool/internal/pool_core.h"
#include "procpool/imap_range.h"
#include "procpool/internal/typed_calls.h"
#include "procpool/internal/typed_worker_body.h"
#include "procpool/internal/worker_registry.h"
#include "procpool/internal/worker_traits.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool {

/// A pool of worker processes, each owning one `W`, that runs `W::run` over jobs (see the file
/// comment for the worker type, errors, faults, lifetime, threads and fork safety).
template <typename W>
class ProcessPool {
 public:
  /// What one task takes: `W::Job`, or deduced from a non-overloaded `W::run` (a `std::tuple` of
  /// its parameters when it takes several).
  using Job = typename internal::WorkerTraits<W>::Job;
  /// What one task yields; void when `W::run` returns void or absl::Status.
  using Result = typename internal::WorkerTraits<W>::Result;
  /// What map and starmap return: `absl::StatusOr<std::vector<Result>>`, or `absl::Status` when
  /// Result is void.
  using MapOutcome = internal::MapOutcome<Result>;
  /// What apply returns (and imap yields): `absl::StatusOr<Result>`, or `absl::Status` when Result
  /// is void.
  using Outcome = internal::OutcomeOf<Result>;
  static_assert(Encodable<Job>, "Job has no procpool::Codec (see procpool/codec.h)");
  static_assert(Encodable<internal::Stored<Result>>,
                "Result has no procpool::Codec (see procpool/codec.h)");

  /// Starts the workers; each default-constructs its W, in the worker process. Never fails and
  /// never throws for a bad option or a failed start: every later call returns the error
  /// (kInvalidArgument naming the field, or the start failure). Forks the workers (with
  /// `StartMethod::kForkServer`, the fork server) but does not wait for them to be ready.
  explicit ProcessPool(PoolOptions options = {})
    requires std::default_initializable<W>
      : ProcessPool(std::move(options), [] { return std::make_unique<W>(); }) {}

  /// Starts the workers; each gets its W from `factory`, called in the worker process after fork
  /// (so it may capture constructor arguments). `factory` returns W or `std::unique_ptr<W>`.
  /// Otherwise as the constructor above.
  template <typename Factory>
    requires std::invocable<Factory&>
  ProcessPool(PoolOptions options, Factory factory)
      : make_worker_(adapt_factory(std::move(factory))),
        core_(
            std::move(options),
            [this] { return std::make_unique<internal::TypedWorkerBody<W>>(&make_worker_); },
            internal::worker_type_name<W>(),
            {.blob_regions = !internal::Blobless<Job>::value ||
                             !internal::Blobless<internal::Stored<Result>>::value}) {
    // Makes W known to procpool::serve(argc, argv) in every process of this program.
    (void)internal::WorkerRegistration<W>::registered;
  }

  /// `close()` + `join()`; never `terminate()`. Blocks until every worker ran `exit()` and is
  /// reaped, at most `PoolOptions::join_timeout` (then the rest are killed). A failed join is
  /// logged as an error. Every AsyncResult of the pool has its outcome when it returns.
  ~ProcessPool() = default;

  ProcessPool(const ProcessPool&) = delete;
  ProcessPool& operator=(const ProcessPool&) = delete;

  /// Runs `W::run` on every job and returns the results in job order (absl::Status for a void
  /// Result: OK if every task succeeded). Blocks until every job has an outcome (each bounded by
  /// the task timeout, if any). If any failed, returns the failure of the first failing job in
  /// job order, its message prefixed with "job <index>: ". kFailedPrecondition after close();
  /// kInvalidArgument for bad options; the start failure while no worker can start. `jobs` is
  /// read, not copied: keep it unchanged until map returns.
  MapOutcome map(absl::Span<const Job> jobs, CallOptions options = {}) {
    return Calls::map(core_, internal::JobList<Job>(jobs), std::move(options), {});
  }

  /// map over any sized input range whose elements convert to Job: a `std::vector<int>` for
  /// int64_t jobs, `std::views::iota(0, n)`, a `std::vector<bool>`, a `std::set`. A contiguous
  /// range of exactly Job is read in place, anything else copied first. Same outcome, errors and
  /// blocking as above.
  template <typename Jobs>
    requires internal::JobRange<Jobs, Job> &&
             (!std::convertible_to<Jobs, absl::Span<const Job>>)
  MapOutcome map(Jobs&& jobs, CallOptions options = {}) {
    return Calls::map(core_, internal::borrow_or_copy<Job>(std::forward<Jobs>(jobs)),
                      std::move(options), {});
  }

  /// map for a worker whose run takes several parameters: each job is a `std::tuple` of them.
  /// Same outcome, errors and blocking as map.
  MapOutcome starmap(absl::Span<const Job> jobs, CallOptions options = {})
    requires internal::WorkerTraits<W>::kRunTakesTuple
  {
    return map(jobs, std::move(options));
  }
  /// starmap over any sized input range of tuples, as map over a range.
  template <typename Jobs>
    requires internal::WorkerTraits<W>::kRunTakesTuple && internal::JobRange<Jobs, Job> &&
             (!std::convertible_to<Jobs, absl::Span<const Job>>)
  MapOutcome starmap(Jobs&& jobs, CallOptions options = {}) {
    return map(std::forward<Jobs>(jobs), std::move(options));
  }

  /// map without blocking: the jobs are copied (moved from an rvalue `std::vector<Job>`) and the
  /// outcome arrives in the AsyncResult: `std::vector<Result>`, or `AsyncResult<void>` for a void
  /// Result; the first failing job's status as for map; kFailedPrecondition (in the AsyncResult)
  /// after close(). The callbacks run as async_result.h says. `AsyncResult::cancel()` cancels
  /// every unfinished task.
  AsyncResult<internal::Mapped<Result>> map_async(
      std::vector<Job> jobs, CallOptions options = {},
      Callbacks<internal::Mapped<Result>> callbacks = {}) {
    return Calls::map_async(core_, std::move(jobs), std::move(options), std::move(callbacks), {});
  }
  /// map_async over any input range whose elements convert to Job (copied first).
  template <typename Jobs>
    requires internal::JobRange<Jobs, Job> && (!std::convertible_to<Jobs, std::vector<Job>>)
  AsyncResult<internal::Mapped<Result>> map_async(
      Jobs&& jobs, CallOptions options = {}, Callbacks<internal::Mapped<Result>> callbacks = {}) {
    return map_async(internal::job_vector<Job>(std::forward<Jobs>(jobs)), std::move(options),
                     std::move(callbacks));
  }

  /// map_async for a worker whose run takes several parameters: each job is a `std::tuple` of
  /// them. Never blocks; errors arrive in the AsyncResult.
  AsyncResult<internal::Mapped<Result>> starmap_async(
      std::vector<Job> jobs, CallOptions options = {},
      Callbacks<internal::Mapped<Result>> callbacks = {})
    requires internal::WorkerTraits<W>::kRunTakesTuple
  {
    return map_async(std::move(jobs), std::move(options), std::move(callbacks));
  }
  /// starmap_async over any input range of tuples (copied first).
  template <typename Jobs>
    requires internal::WorkerTraits<W>::kRunTakesTuple && internal::JobRange<Jobs, Job> &&
             (!std::convertible_to<Jobs, std::vector<Job>>)
  AsyncResult<internal::Mapped<Result>> starmap_async(
      Jobs&& jobs, CallOptions options = {}, Callbacks<internal::Mapped<Result>> callbacks = {}) {
    return map_async(std::forward<Jobs>(jobs), std::move(options), std::move(callbacks));
  }

  /// Runs one job and blocks until its outcome is in (bounded only by the task timeout, if any):
  /// the result (absl::Status for a void Result), the task's error, kFailedPrecondition after
  /// close(), or the start failure while no worker can start.
  Outcome apply(Job job, CallOptions options = {}) {
    return Calls::apply(core_, std::move(job), std::move(options), {});
  }

  /// Runs one job without blocking; the outcome arrives in the AsyncResult (`AsyncResult<void>`
  /// for a void Result) and the callbacks, if any. kFailedPrecondition (in the AsyncResult) after
  /// close().
  AsyncResult<Result> apply_async(Job job, CallOptions options = {},
                                  Callbacks<Result> callbacks = {}) {
    return Calls::apply_async(core_, std::move(job), std::move(options), std::move(callbacks), {});
  }

  /// Lazily maps any input range (a container, a view, an endless generator): results in input
  /// order as an `ImapRange`, an input range of `absl::StatusOr<Result>` (absl::Status for a void
  /// Result), with at most `options.max_in_flight` jobs taken and not yet consumed (imap_range.h).
  /// chunksize defaults to 1. Never blocks itself; iterating blocks for the next result. Errors
  /// arrive as elements (kFailedPrecondition after close()). The range must not outlive the pool.
  template <std::ranges::input_range Input>
  auto imap(Input&& input, CallOptions options = {}) {
    return Calls::imap(core_, std::forward<Input>(input), std::move(options), /*ordered=*/true, {});
  }

  /// As imap, but yields results as they complete.
  template <std::ranges::input_range Input>
  auto imap_unordered(Input&& input, CallOptions options = {}) {
    return Calls::imap(core_, std::forward<Input>(input), std::move(options), /*ordered=*/false, {});
  }

  /// No new work is accepted: later calls fail with kFailedPrecondition; work already given still
  /// runs. Never blocks (beyond the pool's lock). Idempotent; OK (kFailedPrecondition in a worker
  /// that inherited the pool). Then call `join()`.
  absl::Status close() { return core_.close(); }

  /// Waits for the work in flight, asks every worker to run exit() and leave, and reaps them, all
  /// within `PoolOptions::join_timeout` (its clock starts at the first join()); past it sends
  /// SIGTERM, then SIGKILL after kill_grace, and returns kDeadlineExceeded naming the workers it
  /// killed. Also reports exit() failures (that exit()'s status, or kAborted naming a worker that
  /// died in exit()). OK means every exit() returned OK (after `terminate()`: OK).
  /// kFailedPrecondition unless close() or terminate() was called first. Blocks until every
  /// worker is reaped: about join_timeout + kill_grace at most.
  absl::Status join() { return core_.join(); }

  /// Pebble's join(timeout): as join(), but waits at most `timeout` and then returns
  /// kDeadlineExceeded without stopping anyone: workers finish their work, run exit() and leave as
  /// they would, and a later join() or join(timeout) waits for them again (and can still end
  /// cleanly). join_timeout is not enforced by this call. kFailedPrecondition unless close() or
  /// terminate() was called first.
  absl::Status join(absl::Duration timeout) { return core_.join(timeout); }

  /// Stops every worker at once (SIGTERM, then SIGKILL after kill_grace) without running exit();
  /// tasks not finished fail with kCancelled, results already in are kept. Closes the pool. Blocks
  /// until all are reaped. With a `cancel_grace`, running tasks are first asked to stop
  /// (this_task::stop_requested) and given that long to return, so it may block for as long. Idempotent; a later join() returns OK. Does nothing in a worker that
  /// inherited the pool.
  void terminate() { core_.terminate(); }

  /// The number of workers: `PoolOptions::workers`, or the CPUs this process may run on when it
  /// was 0, or the size the last `resize()` gave. Never blocks.
  int workers() const { return core_.worker_count(); }

  /// Makes the pool `workers` workers from now on (Celery's autoscale, loky's resize). Growing
  /// starts the new workers as at construction (forked, or for a remote pool launched with
  /// `RemoteOptions::launch`, or waited for until `connect_timeout` as hosts dial in); they run
  /// enter() and take work as they come. Shrinking retires workers, those with nothing to do
  /// first: a retired worker takes no new work, gives back the tasks it has not started (they run
  /// elsewhere), finishes the one it runs, runs exit() and leaves; it is not replaced, also if it
  /// dies. No task is lost, run twice or failed by a resize. `workers()` and `stats()` show the
  /// new size at once (`stats().workers` lists the slots kept; slot numbers stay those they had).
  /// Returns at once, without waiting for any worker. kInvalidArgument outside 1..4096;
  /// kFailedPrecondition after close() or terminate(); the pool's own error (a bad option, a
  /// failed start) as for any call. Thread-safe, also from a result callback.
  absl::Status resize(int workers) { return core_.resize(workers); }
  /// With `PoolOptions::remote`: the address remote workers dial ("host:port", the port the pool
  /// got when it listened on port 0), for programs that start their workers themselves. Empty for
  /// a pool of forked workers, or when it could not listen (then every call says why). Blocks only
  /// for the pool's lock.
  std::string remote_address() const { return core_.remote_address(); }
  /// With `PoolOptions::remote`: the token remote workers must prove, `RemoteOptions::token` or,
  /// when that was empty, the one the pool made (64 hex digits), for programs that start their
  /// workers themselves: give it to them as PROCPOOL_TOKEN or in a file named by
  /// PROCPOOL_TOKEN_FILE. Empty when `remote_address()` is. It is a secret: do not log it. Blocks
  /// only for the pool's lock.
  std::string remote_token() const { return core_.remote_token(); }
  /// With `PoolOptions::metrics_listen`: the "host:port" where `GET /metrics` is served (the port
  /// it got when it listened on port 0). Empty without it, or when it could not listen (then
  /// every call says why). Never blocks.
  std::string metrics_address() const { return core_.metrics_address(); }
  /// A snapshot of the pool and its workers (pool_stats.h); empty in a worker that inherited the
  /// pool. Blocks only for the pool's lock; safe at any time, also after close().
  PoolStats stats() const { return core_.stats(); }

 private:
  using WorkerFactory = std::function<std::unique_ptr<W>()>;
  using Calls = internal::TypedCalls<Job, Result>;

  template <typename Factory>
  static WorkerFactory adapt_factory(Factory factory) {
    using Made = std::remove_cvref_t<std::invoke_result_t<Factory&>>;
    if constexpr (std::is_same_v<Made, std::unique_ptr<W>>) {
      return WorkerFactory(std::move(factory));
    } else {
      static_assert(std::is_same_v<Made, W>, "the factory must return W or std::unique_ptr<W>");
      return [factory = std::move(factory)]() mutable { return std::make_unique<W>(factory()); };
    }
  }

  // Declared before core_: the workers forked by core_'s constructor read it.
  WorkerFactory make_worker_;
  internal::PoolCore core_;
};

}  // namespace procpool

#endif  // PROCPOOL_PROCESS_POOL_H_
