// Completion<T>: the one-shot result of a call, with blocking and bounded waits and callbacks.
//
// Set once, by the pool thread, when the call's last task has an outcome. Waiters block on it;
// callbacks registered before or after it is set run exactly once, on the pool's callback thread
// (never on the pool thread, so a callback may call back into the pool, even block on it).

#ifndef PROCPOOL_INTERNAL_COMPLETION_H_
#define PROCPOOL_INTERNAL_COMPLETION_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "procpool/internal/pool_core.h"

namespace procpool::internal {

template <typename T>
class Completion : public std::enable_shared_from_this<Completion<T>> {
 public:
  using SuccessCallback = std::function<void(const T&)>;
  using ErrorCallback = std::function<void(const absl::Status&)>;

  virtual ~Completion() = default;

  // Registers callbacks (either may be empty). Call at most once, before the call is submitted.
  void set_callbacks(PoolCore* core, SuccessCallback on_success, ErrorCallback on_error) {
    core_ = core;
    on_success_ = std::move(on_success);
    on_error_ = std::move(on_error);
  }

  bool wait(absl::Duration timeout) const {
    std::unique_lock lock(mu_);
    auto done = [this] { return result_.has_value(); };
    if (timeout == absl::InfiniteDuration()) {
      cv_.wait(lock, done);
      return true;
    }
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(std::max(timeout, absl::ZeroDuration())),
                        done);
  }

  bool ready() const {
    std::lock_guard lock(mu_);
    return result_.has_value();
  }

  // The result; call after wait() returned true.
  const absl::StatusOr<T>& result() const {
    std::lock_guard lock(mu_);
    return *result_;
  }
  absl::StatusOr<T> take_result() {
    std::lock_guard lock(mu_);
    return *std::move(result_);
  }

 protected:
  // Sets the result (once), wakes waiters and schedules the callbacks.
  void complete(absl::StatusOr<T> result) {
    {
      std::lock_guard lock(mu_);
      result_.emplace(std::move(result));
    }
    cv_.notify_all();
    if (core_ != nullptr && (on_success_ || on_error_)) {
      core_->post_callback([self = this->shared_from_this()] { self->run_callbacks(); });
    }
  }

 private:
  void run_callbacks() {
    const absl::StatusOr<T>& outcome = *result_;  // set before posting; never changes again
    if (outcome.ok()) {
      if (on_success_) on_success_(*outcome);
    } else if (on_error_) {
      on_error_(outcome.status());
    }
  }

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::optional<absl::StatusOr<T>> result_;
  PoolCore* core_ = nullptr;
  SuccessCallback on_success_;
  ErrorCallback on_error_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_COMPLETION_H_
