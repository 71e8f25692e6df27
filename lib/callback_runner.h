// CallbackRunner: runs user callbacks (AsyncResult callbacks, done-callbacks) one at a time, in
// the order posted, on a thread of their own, started on first use.
//
// Why a thread of their own: callbacks are posted by the pool thread with the pool's lock held;
// run there, a callback that uses the pool (submits more work, or waits on it) would deadlock.
// On the callback thread it may do anything, even block on the pool, or destroy it: a callback
// may hold the last reference to its pool. Then stop() is called on the callback thread itself;
// it runs what is queued there and lets the thread go (detached), which ends once the callback
// returns. The thread's queue and lock are shared with it, so they outlive the runner.
//
// If the thread cannot be started (the thread limit is reached), callbacks stay queued; the next
// post tries again, and stop() runs what is left on the calling thread. Thread-safe.

#ifndef PROCPOOL_LIB_CALLBACK_RUNNER_H_
#define PROCPOOL_LIB_CALLBACK_RUNNER_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "lib/common/mutex.h"

namespace procpool::internal {

class CallbackRunner {
 public:
  // `on_throw` is told what a callback threw (it is caught: the thread carries on). It is not
  // called once the runner is gone (a callback that destroyed its pool, then threw): that goes
  // to stderr.
  explicit CallbackRunner(std::function<void(const std::string&)> on_throw);
  // stop().
  ~CallbackRunner();

  // Queues `callback`. After stop() it runs at once, on the calling thread.
  void post(std::function<void()> callback);
  // Runs every callback still queued, then stops the thread. Idempotent. Blocks until they ran.
  // On the callback thread itself (a callback destroying its pool), runs them there.
  void stop();

 private:
  // What the thread uses: shared with it, so that it survives the runner when stop() was called
  // from the thread itself.
  struct State {
    explicit State(std::function<void(const std::string&)> on_throw)
        : on_throw(std::move(on_throw)) {}
    Mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> queue ABSL_GUARDED_BY(mu);
    bool stopping ABSL_GUARDED_BY(mu) = false;
    bool stopped ABSL_GUARDED_BY(mu) = false;
    // The runner is gone: on_throw (which may reach into the pool) is no longer called.
    bool orphaned ABSL_GUARDED_BY(mu) = false;
    const std::function<void(const std::string&)> on_throw;
  };

  static void run(const std::shared_ptr<State>& state);
  static void run_one(State& state, std::function<void()>& callback);
  void start_thread() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_->mu);

  const std::shared_ptr<State> state_;
  std::thread thread_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_CALLBACK_RUNNER_H_
