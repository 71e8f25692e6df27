// AsyncResult<T>: the future of apply_async, map_async and starmap_async.
//
//   procpool::AsyncResult<int64_t> pending = pool.apply_async(7);
//   pending.add_done_callback([](const absl::StatusOr<int64_t>& r) { /* callback thread */ });
//   ... do other work ...
//   absl::StatusOr<int64_t> value = pending.get(absl::Seconds(1));  // kDeadlineExceeded if not yet
//   if (!value.ok()) pending.cancel();  // Pebble's future.cancel(): stops it even if it runs
//
// Unlike Python's AsyncResult, every wait can be bounded: get(timeout) returns kDeadlineExceeded
// and the task keeps running; a later get() still gets its result. procpool::wait and
// procpool::as_completed (wait.h) wait on many at once, like concurrent.futures.
//
// AsyncResult<void> is what a call whose tasks return no value (void or absl::Status) gives:
// get() returns absl::Status, and its callbacks take no value.
//
// Callbacks. Those given at submission (Callbacks<T>) and those added later (add_done_callback)
// each run exactly once, on the pool's callback thread: never on the pool's I/O thread, so a
// callback may submit more work, or even block on the pool, without deadlocking it. Callbacks run
// one at a time, in the order the results completed; for one result, the submission callbacks
// first, then the done callbacks in the order they were added. get() and wait() return as soon as
// the result is in: they do not wait for callbacks, which may not have run yet (wait for an event
// your callback sets if you need that). A callback added after the pool is gone runs at once on
// the calling thread. A callback that throws is logged; the others still run.
//
// Copyable; every copy shares the one result. Safe to use from any thread, and after the pool is
// gone (the pool gives every result its outcome before it goes), except that cancel() and
// add_done_callback() must not race with the pool's destructor on another thread.

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

// Optional callbacks of an asynchronous call, given at submission; either may be empty.
template <typename T>
struct Callbacks {
  std::function<void(const T&)> on_success;
  std::function<void(const absl::Status&)> on_error;
};

// For calls with no value (AsyncResult<void>).
template <>
struct Callbacks<void> {
  std::function<void()> on_success;
  std::function<void(const absl::Status&)> on_error;
};

class AnyAsyncResult;

template <typename T>
class AsyncResult {
 public:
  // What get() returns: absl::StatusOr<T>, or absl::Status for AsyncResult<void>.
  using Outcome = internal::OutcomeOf<T>;
  using DoneCallback = std::function<void(const Outcome&)>;

  explicit AsyncResult(std::shared_ptr<internal::Completion<internal::Stored<T>>> state)
      : state_(std::move(state)) {}

  // Blocks until the result is in and returns (a copy of) it: the value, or the call's error
  // (map_async: the first failing job's, "job N: ..."; kCancelled after cancel()). Does not wait
  // for callbacks.
  Outcome get() const {
    state_->wait(absl::InfiniteDuration());
    return internal::to_outcome<T>(state_->result());
  }

  // As get(), but gives up after `timeout` with kDeadlineExceeded; the work goes on.
  Outcome get(absl::Duration timeout) const {
    if (!state_->wait(timeout)) {
      return absl::DeadlineExceededError(
          absl::StrCat("the result was not ready within ", absl::FormatDuration(timeout)));
    }
    return internal::to_outcome<T>(state_->result());
  }

  // Blocks until the result is in.
  void wait() const { state_->wait(absl::InfiniteDuration()); }
  // Blocks until the result is in or `timeout` passes; true if it is in.
  bool wait(absl::Duration timeout) const { return state_->wait(timeout); }

  // True once the result is in (a value, an error, or kCancelled). Never blocks.
  bool done() const { return state_->ready(); }
  bool ready() const { return state_->ready(); }
  // True once the result is in and OK (Python's successful(), which raises instead while not
  // ready). Never blocks.
  bool successful() const { return state_->succeeded(); }

  // Cancels the call (Pebble's future.cancel()): a task that has not started never runs; a running
  // one is stopped by stopping its worker (SIGTERM, SIGKILL after PoolOptions::kill_grace), which
  // the pool replaces, like a task past its timeout; the result becomes kCancelled at once. For
  // map_async, every unfinished task of the call, and the call's result is kCancelled; the
  // outcomes of tasks that finished before are dropped. Returns true if this cancelled it, false
  // if the result was already in (then nothing changes). Blocks only for the pool's lock, never
  // for the worker to exit. Other calls' tasks are not affected: those a stopped worker held and
  // had not started run on another worker. "Not started" is exact, also for tasks already sent to
  // a worker: it claims each task before it starts it, and cancel() takes them back through the
  // same claims (README, "A stalled worker does not hold work hostage").
  bool cancel() { return state_->cancel(); }

  // Adds a callback that runs once with the outcome, on the pool's callback thread (see the top
  // comment for the order): when the result comes in, or at once (posted) if it is already in.
  // Any number may be added, from any thread. Never blocks.
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

// Any AsyncResult, whatever its T: what procpool::wait and as_completed take, so results of
// different types can be waited on together. Converts implicitly from every AsyncResult<T> and
// shares its state. Copyable; thread-safe like AsyncResult.
class AnyAsyncResult {
 public:
  template <typename T>
  AnyAsyncResult(const AsyncResult<T>& result)  // NOLINT: implicit by design
      : state_(result.state_) {}

  // As AsyncResult's done(), successful(), wait(timeout) and cancel(), with the same contracts.
  bool done() const { return state_->ready(); }
  bool successful() const { return state_->succeeded(); }
  bool wait(absl::Duration timeout) const { return state_->wait(timeout); }
  bool cancel() { return state_->cancel(); }

  // For wait.h.
  internal::CompletionBase& state() const { return *state_; }

 private:
  std::shared_ptr<internal::CompletionBase> state_;
};

}  // namespace procpool

#endif  // PROCPOOL_ASYNC_RESULT_H_
