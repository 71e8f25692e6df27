// CallbackRunner: runs user callbacks (AsyncResult callbacks, done-callbacks) one at a time, in
// the order posted, on a thread of their own, started on first use.
//
// Why a thread of their own: callbacks are posted by the pool thread with the pool's lock held;
// run there, a callback that uses the pool (submits more work, or waits on it) would deadlock.
// On the callback thread it may do anything, even block on the pool.
//
// If the thread cannot be started (the thread limit is reached), callbacks stay queued; the next
// post tries again, and stop() runs what is left on the calling thread. Thread-safe.

#ifndef PROCPOOL_LIB_CALLBACK_RUNNER_H_
#define PROCPOOL_LIB_CALLBACK_RUNNER_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <thread>

#include "lib/common/mutex.h"

namespace procpool::internal {

class CallbackRunner {
 public:
  // `on_throw` is told what a callback threw (it is caught: the thread carries on).
  explicit CallbackRunner(std::function<void(const std::string&)> on_throw);
  // stop().
  ~CallbackRunner();

  // Queues `callback`. After stop() it runs at once, on the calling thread.
  void post(std::function<void()> callback);
  // Runs every callback still queued, then stops the thread. Idempotent. Blocks until they ran.
  void stop();

 private:
  void run();
  void start_thread() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void run_one(std::function<void()>& callback);

  const std::function<void(const std::string&)> on_throw_;
  Mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_CALLBACK_RUNNER_H_
