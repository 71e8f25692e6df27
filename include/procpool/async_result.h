/// \file
/// `AsyncResult<T>`: the future of `apply_async`, `map_async` and `starmap_async`.
///
/// ```cpp
/// procpool::AsyncResult<int64_t> pending = pool.apply_async(7);
/// pending.add_done_callback([](const absl::StatusOr<int64_t>& r) { /* callback thread */ });
/// // ... do other work ...
/// absl::StatusOr<int64_t> value = pending.get(absl::Seconds(1));  // kDeadlineExceeded if not yet
/// if (!value.ok()) pending.cancel();  // Pebble's future.cancel(): stops it even if it runs
/// ```
///
/// Unlike Python's AsyncResult, every wait can be bounded: `get(timeout)` returns
/// kDeadlineExceeded and the task keeps running; a later `get()` still gets its result.
/// `procpool::wait` and `procpool::as_completed` (wait.h) wait on many at once, like
/// concurrent.futures.
///
/// `AsyncResult<void>` is what a call whose tasks return no value (`void` or `absl::Status`)
/// gives: `get()` returns `absl::Status`, and its callbacks take no value.
///
/// **Callbacks.** Those given at submission (`Callbacks<T>`) and those added later
/// (`add_done_callback`) each run exactly once, on the pool's callback thread: never on the pool's
/// I/O thread, so a callback may submit more work, or even block on the pool, without deadlocking
/// it. Callbacks run one at a time, in the order the results completed; for one result, the
/// submission callbacks first, then the done callbacks in the order they were added. `get()` and
/// `wait()` return as soon as the result is in: they do not wait for callbacks, which may not have
/// run yet (wait for an event your callback sets if you need that). A callback added after the
/// pool is gone runs at once on the calling thread. A callback that throws is logged (on stderr
/// once the pool is gone: its log sink went with it), never thrown to its caller; the others
/// still run. A callback may hold the last reference to its pool (a `shared_ptr` it captured):
/// the pool is then destroyed on the callback thread, close-then-join as always, and the callbacks
/// queued behind it run there too. The callbacks and progress function of a call are released on
/// the callback thread once the call completes. (A progress function, which runs on the pool's
/// I/O thread, must not destroy its pool: that aborts with a message instead of hanging.)
///
/// **Lifetime and threads.** Copyable; every copy shares the one result. Safe to use from any
/// thread, and after the pool is gone (the pool gives every result its outcome before it goes),
/// except that `cancel()` and `add_done_callback()` must not race with the pool's destructor on
/// another thread.

#ifndef PROCPOOL_ASYNC_RESULT_H_
#define PROCPOOL_ASYNC_RESULT_H_

#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <variant>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "procpool/internal/completion.h"
#include "procpool/internal/worker_traits.h"

namespace procpool {

/// Optional callbacks of an asynchronous call, given at submission; either may be empty.
///
/// The one that matches the outcome runs once, if given, on the pool's callback thread (see the
/// file comment for the order), before any callback added by `AsyncResult::add_done_callback`.
template <typename T>
struct Callbacks {
  /// Called with the value when the call succeeded.
  std::function<void(const T&)> on_success;
  /// Called with the call's error (kCancelled after a cancel) when it failed.
  std::function<void(const absl::Status&)> on_error;
};

/// The callbacks of a call with no value (`AsyncResult<void>`): as `Callbacks<T>`.
template <>
struct Callbacks<void> {
  /// Called when every task of the call returned OK.
  std::function<void()> on_success;
  /// Called with the call's error (kCancelled after a cancel) when it failed.
  std::function<void(const absl::Status&)> on_error;
};

class AnyAsyncResult;

/// The future of one asynchronous call (`apply_async`, `map_async`, `starmap_async`): its outcome
/// once it is in, bounded waits, cancellation and callbacks. See the file comment for callbacks,
/// lifetime and threads.
template <typename T>
class AsyncResult {
 public:
  /// What `get()` returns: `absl::StatusOr<T>`, or `absl::Status` for `AsyncResult<void>`.
  using Outcome = internal::OutcomeOf<T>;
  /// A callback added by `add_done_callback`: receives the outcome, OK or not.
  using DoneCallback = std::function<void(const Outcome&)>;

  /// Made by the pool's asynchronous calls; not meant to be called by users.
  explicit AsyncResult(std::shared_ptr<internal::Completion<internal::Stored<T>>> state)
      : state_(std::move(state)) {}

  /// Blocks until the result is in, with no bound, and returns (a copy of) it: the value, or the
  /// call's error (map_async: the first failing job's, "job N: ..."; kCancelled after cancel();
  /// kFailedPrecondition if the call was made after close()). Does not wait for callbacks. Never
  /// blocks forever once the pool is gone: the pool sets every outcome before it goes.
  Outcome get() const {
    state_->wait(absl::InfiniteDuration());
    return internal::to_outcome<T>(state_->result());
  }

  /// As `get()`, but blocks at most `timeout`: if the result is not in by then, returns
  /// kDeadlineExceeded and the work goes on (a later `get()` still gets the result).
  Outcome get(absl::Duration timeout) const {
    if (!state_->wait(timeout)) {
      return absl::DeadlineExceededError(
          absl::StrCat("the result was not ready within ", absl::FormatDuration(timeout)));
    }
    return internal::to_outcome<T>(state_->result());
  }

  /// Blocks, with no bound, until the result is in. Does not wait for callbacks.
  void wait() const { state_->wait(absl::InfiniteDuration()); }
  /// Blocks until the result is in or `timeout` passes; true if it is in. Does not wait for
  /// callbacks.
  bool wait(absl::Duration timeout) const { return state_->wait(timeout); }

  /// True once the result is in (a value, an error, or kCancelled). Never blocks.
  bool done() const { return state_->ready(); }
  /// The same as `done()` (Python's name). Never blocks.
  bool ready() const { return state_->ready(); }
  /// True once the result is in and OK (Python's `successful()`, which raises instead while not
  /// ready); false while it is not in. Never blocks.
  bool successful() const { return state_->succeeded(); }

  /// Cancels the call (Pebble's `future.cancel()`): a task that has not started never runs; a
  /// running one is stopped by stopping its worker (SIGTERM, SIGKILL after
  /// `PoolOptions::kill_grace`), which the pool replaces, like a task past its timeout; the result
  /// becomes kCancelled at once. For map_async, every unfinished task of the call, and the call's
  /// result is kCancelled; the outcomes of tasks that finished before are dropped. Returns true if
  /// this cancelled it, false if the result was already in (then nothing changes). Blocks only for
  /// the pool's lock, never for the worker to exit. Other calls' tasks are not affected: those a
  /// stopped worker held and had not started run on another worker. "Not started" is exact, also
  /// for tasks already sent to a worker: it claims each task before it starts it, and `cancel()`
  /// takes them back through the same claims (README, "A stalled worker does not hold work
  /// hostage"). Must not race with the pool's destructor on another thread.
  bool cancel() { return state_->cancel(); }

  /// Adds a callback that runs once with the outcome, on the pool's callback thread (see the file
  /// comment for the order): when the result comes in, or at once (posted) if it is already in;
  /// once the pool is gone, at once on the calling thread. Any number may be added, from any
  /// thread. Never blocks (except to run the callback itself when the pool is gone). Must not race
  /// with the pool's destructor on another thread.
  void add_done_callback(DoneCallback callback) {
    if constexpr (std::is_void_v<T>) {
      state_->add_done_callback(
          [callback = std::move(callback)](const absl::StatusOr<std::monostate>& outcome) {
            callback(outcome.status());
          });
    } else {
      state_->add_done_callback(std::move(callback));
    }
  }

 private:
  friend class AnyAsyncResult;
  std::shared_ptr<internal::Completion<internal::Stored<T>>> state_;
};

/// Any AsyncResult, whatever its T: what `procpool::wait` and `procpool::as_completed` take, so
/// results of different types can be waited on together. Converts implicitly from every
/// `AsyncResult<T>` and shares its state. Copyable; thread-safe like AsyncResult.
class AnyAsyncResult {
 public:
  /// Shares `result`'s state: both see the same outcome, and cancelling either cancels the call.
  template <typename T>
  AnyAsyncResult(const AsyncResult<T>& result)  // NOLINT: implicit by design
      : state_(result.state_) {}

  /// As `AsyncResult::done()`: true once the result is in. Never blocks.
  bool done() const { return state_->ready(); }
  /// As `AsyncResult::successful()`: true once the result is in and OK. Never blocks.
  bool successful() const { return state_->succeeded(); }
  /// As `AsyncResult::wait(absl::Duration)`: blocks until the result is in or `timeout` passes;
  /// true if it is in.
  bool wait(absl::Duration timeout) const { return state_->wait(timeout); }
  /// As `AsyncResult::cancel()`, with the same contract: true if this cancelled the call.
  bool cancel() { return state_->cancel(); }

  /// The shared state, for wait.h; not meant to be called by users.
  internal::CompletionBase& state() const { return *state_; }

 private:
  std::shared_ptr<internal::CompletionBase> state_;
};

}  // namespace procpool

#endif  // PROCPOOL_ASYNC_RESULT_H_
