#include "lib/callback_runner.h"

#include <string>
#include <system_error>
#include <utility>

#include "procpool/internal/worker_body.h"

namespace procpool::internal {

CallbackRunner::CallbackRunner(std::function<void(const std::string&)> on_throw)
    : on_throw_(std::move(on_throw)) {}

CallbackRunner::~CallbackRunner() { stop(); }

void CallbackRunner::post(std::function<void()> callback) {
  {
    MutexLock lock(mu_);
    if (!stopped_) {
      queue_.push_back(std::move(callback));
      if (!thread_.joinable()) start_thread();
      lock.unlock();
      cv_.notify_one();
      return;
    }
  }
  run_one(callback);  // nothing else can run it any more
}

void CallbackRunner::start_thread() {
  try {
    thread_ = std::thread([this] { run(); });
  } catch (const std::system_error&) {
    // Queued: the next post tries again, and stop() runs what is left.
  }
}

void CallbackRunner::run_one(std::function<void()>& callback) {
  try {
    callback();
  } catch (...) {
    if (on_throw_) on_throw_(describe_current_exception());
  }
}

void CallbackRunner::run() {
  MutexLock lock(mu_);
  while (true) {
    wait_on(cv_, mu_, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return stopping_ || !queue_.empty();
    });
    if (queue_.empty()) return;  // stopping, and everything ran
    std::function<void()> callback = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    run_one(callback);
    lock.lock();
  }
}

void CallbackRunner::stop() {
  std::deque<std::function<void()>> leftovers;
  {
    MutexLock lock(mu_);
    if (stopped_) return;
    stopping_ = true;
    // With no thread (it could not start), whatever is queued runs here.
    if (!thread_.joinable()) leftovers.swap(queue_);
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  {
    MutexLock lock(mu_);
    stopped_ = true;
    // Posted while the thread was leaving: nothing would run them otherwise.
    for (auto& callback : queue_) leftovers.push_back(std::move(callback));
    queue_.clear();
  }
  for (auto& callback : leftovers) run_one(callback);
}

}  // namespace procpool::internal
