// Completion<T>: the one-shot result of a call, with blocking and bounded waits, callbacks,
// listeners (for procpool::wait and as_completed) and cancellation.
//
// Set once, when the call's last task has an outcome (by the pool thread, or by the thread that
// cancels it). Waiters block on it; callbacks registered before or after it is set run exactly
// once, on the pool's callback thread (never on the pool thread, so a callback may call back into
// the pool, even block on it). CompletionBase is the part that does not depend on T, so that
// results of different types can be waited on together.

#ifndef PROCPOOL_INTERNAL_COMPLETION_H_
#define PROCPOOL_INTERNAL_COMPLETION_H_

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "procpool/internal/pool_core.h"

namespace procpool::internal {

// A wait bounded by more than this is a wait without a bound. std::chrono adds a wait's duration
// to its clock's now(): one near the range of its nanoseconds overflows into the past and the
// wait gives up at once, so get(absl::Hours(24 * 365 * 1000)) would return kDeadlineExceeded at
// once instead of waiting.
inline constexpr absl::Duration kLongestBoundedWait = absl::Hours(24 * 365 * 100);

// Collects "result i is in" events from many completions, in the order they happen; what
// procpool::wait and as_completed block on. Thread-safe.
class DoneNotifier {
 public:
  struct Event {
    size_t index = 0;
    bool ok = false;
  };

  void notify(size_t index, bool ok) {
    {
      std::lock_guard lock(mu_);
      events_.push_back({index, ok});
    }
    cv_.notify_all();
  }

  // Blocks until `ready(events)` holds (checked under the lock, on every event) or `deadline`
  // passes (absl::InfiniteFuture(): no deadline). Returns whether it held.
  template <typename Ready>
  bool wait_until(absl::Time deadline, Ready&& ready) {
    std::unique_lock lock(mu_);
    auto holds = [&] { return ready(static_cast<const std::deque<Event>&>(events_)); };
    if (deadline - absl::Now() >= kLongestBoundedWait) {  // absl::InfiniteFuture() included
      cv_.wait(lock, holds);
      return true;
    }
    return cv_.wait_until(lock, absl::ToChronoTime(deadline), holds);
  }

  // The oldest event not yet taken, waiting until `deadline` for one; nullopt past it.
  std::optional<Event> take(absl::Time deadline) {
    if (!wait_until(deadline, [](const std::deque<Event>& events) { return !events.empty(); })) {
      return std::nullopt;
    }
    std::lock_guard lock(mu_);
    Event event = events_.front();
    events_.pop_front();
    return event;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

class CompletionBase {
 public:
  virtual ~CompletionBase() = default;

  // True once the result is in. Blocks until it is, or `timeout` passes.
  bool wait(absl::Duration timeout) const {
    std::unique_lock lock(mu_);
    auto done = [this] { return done_; };
    if (timeout >= kLongestBoundedWait) {  // absl::InfiniteDuration() included
      cv_.wait(lock, done);
      return true;
    }
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(std::max(timeout, absl::ZeroDuration())),
                        done);
  }

  bool ready() const {
    std::lock_guard lock(mu_);
    return done_;
  }

  // Ready and OK.
  bool succeeded() const {
    std::lock_guard lock(mu_);
    return done_ && ok_;
  }

  // Calls notifier->notify(index, ok) once when the result is in: at once (on this thread) if it
  // is, else on the thread that sets it. Holds the notifier weakly: one dropped early costs
  // nothing.
  void add_listener(const std::shared_ptr<DoneNotifier>& notifier, size_t index) {
    {
      std::lock_guard lock(mu_);
      if (!done_) {
        // Prune listeners whose waits ended, so repeated bounded waits do not pile them up.
        std::erase_if(listeners_, [](const Listener& l) { return l.notifier.expired(); });
        listeners_.push_back({notifier, index});
        return;
      }
    }
    notifier->notify(index, succeeded());
  }

  // Cancels the call's unfinished tasks and sets the result to kCancelled. False if the result was
  // already in (or the pool is gone, which sets every result first).
  virtual bool cancel() { return false; }

 protected:
  struct Listener {
    std::weak_ptr<DoneNotifier> notifier;
    size_t index = 0;
  };

  // Marks the result in (with mu_ held by the caller) and returns the listeners to notify once
  // mu_ is released.
  std::vector<Listener> mark_done_locked(bool ok) {
    done_ = true;
    ok_ = ok;
    return std::move(listeners_);
  }

  static void notify_all(const std::vector<Listener>& listeners, bool ok) {
    for (const Listener& listener : listeners) {
      if (std::shared_ptr<DoneNotifier> notifier = listener.notifier.lock()) {
        notifier->notify(listener.index, ok);
      }
    }
  }

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool done_ = false;
  bool ok_ = false;
  std::vector<Listener> listeners_;
};

template <typename T>
class Completion : public CompletionBase, public std::enable_shared_from_this<Completion<T>> {
 public:
  using SuccessCallback = std::function<void(const T&)>;
  using ErrorCallback = std::function<void(const absl::Status&)>;
  using DoneCallback = std::function<void(const absl::StatusOr<T>&)>;

  // Ties the completion to its pool, for callbacks and cancel(). Call once, before the call is
  // submitted, and for every asynchronous call.
  void bind(PoolCore* core) {
    core_ = core;
    link_ = core->link();
  }

  // The callbacks given at submission (either may be empty). Call at most once, before the call is
  // submitted, after bind().
  void set_callbacks(SuccessCallback on_success, ErrorCallback on_error) {
    on_success_ = std::move(on_success);
    on_error_ = std::move(on_error);
  }

  // Runs `callback` once with the result, on the pool's callback thread: after the result is set
  // and the callbacks given at submission, in the order added; at once (posted) if the result is
  // already in and its callbacks are queued. Once the pool is gone, runs it on this thread
  // instead, where what it throws is reported and goes no further (run_callback_without_pool).
  void add_done_callback(DoneCallback callback) {
    {
      std::lock_guard lock(mu_);
      if (!callbacks_queued_) {
        // Before the result, or while complete() queues its callbacks: it queues this one too,
        // behind them (a waiter may have returned from get(), or a callback run, meanwhile).
        done_callbacks_.push_back(std::move(callback));
        return;
      }
    }
    std::function<void()> run = [self = this->shared_from_this(), callback = std::move(callback)] {
      callback(*self->result_);  // set before this was posted; never changes again
    };
    if (link_ == nullptr ||
        !link_->with_core([&run](PoolCore& core) { core.post_callback(std::move(run)); })) {
      run_callback_without_pool(run);
    }
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

  PoolCore* core() const { return core_; }
  const std::shared_ptr<CoreLink>& link() const { return link_; }

 protected:
  // Closures of the user's that the call holds besides its callbacks (a map's progress), moved
  // out once the call completes (under the pool's lock, after their last use), to be destroyed on
  // the callback thread. Empty if none.
  virtual std::function<void()> take_user_closures() { return nullptr; }

  // Sets the result, wakes waiters and listeners and schedules the callbacks. Only the first call
  // counts: returns false (and drops `result`) if the result was already set. Never takes a
  // CoreLink's lock: it runs on the pool thread, under the core's lock.
  //
  // Publishing the result and queuing its callbacks are one step for add_done_callback: until
  // every callback is queued, one added (by a thread that get() woke, or by a callback already
  // running) joins the queue behind them instead of posting itself ahead of them.
  bool complete(absl::StatusOr<T> result) {
    std::vector<Listener> listeners;
    std::vector<DoneCallback> done_callbacks;
    bool ok = false;
    {
      std::lock_guard lock(mu_);
      if (done_) return false;
      ok = result.ok();
      result_.emplace(std::move(result));
      listeners = mark_done_locked(ok);
      done_callbacks.swap(done_callbacks_);
      if (core_ == nullptr) callbacks_queued_ = true;  // no callback thread to queue them on
    }
    cv_.notify_all();
    notify_all(listeners, ok);
    if (core_ == nullptr) return true;
    // One post each, in order: the callback thread runs posts in order, and one callback that
    // throws (logged there) does not keep the next from running. The user's closures move into
    // the posts, so that they are destroyed on the callback thread, never on the pool thread
    // (which may drop the call's last reference): one of them may hold the last reference to
    // the pool, whose destruction cannot run on the pool's own thread.
    std::function<void()> held = take_user_closures();
    if (on_success_ || on_error_ || held) {
      core_->post_callback([self = this->shared_from_this(), on_success = std::move(on_success_),
                            on_error = std::move(on_error_), held = std::move(held)] {
        const absl::StatusOr<T>& outcome = *self->result_;  // set before posting; never changes
        if (outcome.ok()) {
          if (on_success) on_success(*outcome);
        } else if (on_error) {
          on_error(outcome.status());
        }
      });
    }
    while (true) {
      for (DoneCallback& callback : done_callbacks) {
        core_->post_callback([self = this->shared_from_this(), callback = std::move(callback)] {
          callback(*self->result_);  // set before this was posted; never changes again
        });
      }
      done_callbacks.clear();
      std::lock_guard lock(mu_);
      if (done_callbacks_.empty()) {
        callbacks_queued_ = true;  // from now on, add_done_callback posts its own
        return true;
      }
      done_callbacks.swap(done_callbacks_);  // added while these were queued: they go next
    }
  }

 private:
  std::optional<absl::StatusOr<T>> result_;  // guarded by mu_ until set; immutable after
  PoolCore* core_ = nullptr;
  std::shared_ptr<CoreLink> link_;
  SuccessCallback on_success_;
  ErrorCallback on_error_;
  std::vector<DoneCallback> done_callbacks_;  // guarded by mu_
  bool callbacks_queued_ = false;  // guarded by mu_: complete() queued every callback
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_COMPLETION_H_
