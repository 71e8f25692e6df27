// AsyncResult<T>: the future of apply_async and map_async.
//
//   procpool::AsyncResult<int64_t> pending = pool.apply_async(7);
//   ... do other work ...
//   absl::StatusOr<int64_t> value = pending.get(absl::Seconds(1));  // kDeadlineExceeded if not yet
//
// Unlike Python's AsyncResult, every wait can be bounded: get(timeout) returns kDeadlineExceeded
// and the task keeps running; a later get() still gets its result. Callbacks (Callbacks<T>) run
// exactly once, on the pool's callback thread: never on the pool's I/O thread, so a callback may
// submit more work, or even block on the pool, without deadlocking it; callbacks run one at a
// time, in completion order.
//
// Copyable; every copy shares the one result. Safe to use from any thread, and after the pool is
// gone (the pool fails what it could not finish before it goes).

#ifndef PROCPOOL_ASYNC_RESULT_H_
#define PROCPOOL_ASYNC_RESULT_H_

#include <functional>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "procpool/internal/completion.h"

namespace procpool {

// Optional callbacks of an asynchronous call; either may be empty.
template <typename T>
struct Callbacks {
  std::function<void(const T&)> on_success;
  std::function<void(const absl::Status&)> on_error;
};

template <typename T>
class AsyncResult {
 public:
  explicit AsyncResult(std::shared_ptr<internal::Completion<T>> state) : state_(std::move(state)) {}

  // Blocks until the result is in and returns (a copy of) it.
  absl::StatusOr<T> get() const {
    state_->wait(absl::InfiniteDuration());
    return state_->result();
  }

  // As get(), but gives up after `timeout` with kDeadlineExceeded; the work goes on.
  absl::StatusOr<T> get(absl::Duration timeout) const {
    if (!state_->wait(timeout)) {
      return absl::DeadlineExceededError(
          absl::StrCat("the result was not ready within ", absl::FormatDuration(timeout)));
    }
    return state_->result();
  }

  void wait() const { state_->wait(absl::InfiniteDuration()); }
  // True if the result arrived within `timeout`.
  bool wait(absl::Duration timeout) const { return state_->wait(timeout); }
  bool ready() const { return state_->ready(); }

 private:
  std::shared_ptr<internal::Completion<T>> state_;
};

}  // namespace procpool

#endif  // PROCPOOL_ASYNC_RESULT_H_
