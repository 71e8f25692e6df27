#include "lib/callback_runner.h"

#include <cstdio>
#include <functional>
#include <string>
#include <system_error>
#include <utility>

#include "procpool/internal/pool_core.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {
namespace {

// A callback threw where no pool is left to log it.
void report_without_pool(const std::string& what) {
  std::fprintf(stderr, "procpool: a callback threw after its pool was destroyed: %s\n",
               what.c_str());
}

}  // namespace

void run_callback_without_pool(const std::function<void()>& callback) {
  try {
    callback();
  } catch (...) {
    report_without_pool(describe_current_exception());
  }
}

CallbackRunner::CallbackRunner(std::function<void(const std::string&)> on_throw)
    : state_(std::make_shared<State>(std::move(on_throw))) {}

CallbackRunner::~CallbackRunner() { stop(); }

void CallbackRunner::post(std::function<void()> callback) {
  {
    MutexLock lock(state_->mu);
    if (!state_->stopped) {
      state_->queue.push_back(std::move(callback));
      if (!thread_.joinable()) start_thread();
      lock.unlock();
      state_->cv.notify_one();
      return;
    }
  }
  run_one(*state_, callback);  // nothing else can run it any more
}

void CallbackRunner::start_thread() {
  try {
    thread_ = std::thread([state = state_] { run(state); });
  } catch (const std::system_error&) {
    // Queued: the next post tries again, and stop() runs what is left.
  }
}

void CallbackRunner::run_one(State& state, std::function<void()>& callback) {
  try {
    callback();
  } catch (...) {
    const std::string what = describe_current_exception();
    bool orphaned;
    {
      MutexLock lock(state.mu);
      orphaned = state.orphaned;
    }
    if (orphaned) {
      report_without_pool(what);
    } else if (state.on_throw) {
      state.on_throw(what);
    }
  }
}

void CallbackRunner::run(const std::shared_ptr<State>& state) {
  MutexLock lock(state->mu);
  while (true) {
    wait_on(state->cv, state->mu, [&state]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return state->stopping || !state->queue.empty();
    });
    if (state->queue.empty()) return;  // stopping, and everything ran
    {
      std::function<void()> callback = std::move(state->queue.front());
      state->queue.pop_front();
      lock.unlock();
      run_one(*state, callback);
      // `callback` is destroyed here, unlocked: what it holds may be the last reference to the
      // pool, whose destruction calls stop() on this thread.
    }
    lock.lock();
  }
}

void CallbackRunner::stop() {
  std::deque<std::function<void()>> leftovers;
  const bool on_own_thread =
      thread_.joinable() && thread_.get_id() == std::this_thread::get_id();
  {
    MutexLock lock(state_->mu);
    if (state_->stopped) return;
    state_->stopping = true;
    // With no thread (it could not start), or on the thread itself, what is queued runs here.
    if (!thread_.joinable() || on_own_thread) leftovers.swap(state_->queue);
  }
  state_->cv.notify_all();
  if (on_own_thread) {
    // A callback is destroying the pool: the thread cannot wait for itself. It ends when that
    // callback returns, finding `stopping` and an empty queue, on the state it shares.
    thread_.detach();
  } else if (thread_.joinable()) {
    thread_.join();
  }
  {
    MutexLock lock(state_->mu);
    state_->stopped = true;
    // Posted while the thread was leaving: nothing would run them otherwise.
    for (auto& callback : state_->queue) leftovers.push_back(std::move(callback));
    state_->queue.clear();
  }
  for (auto& callback : leftovers) run_one(*state_, callback);
  if (on_own_thread) {
    MutexLock lock(state_->mu);
    state_->orphaned = true;
  }
}

}  // namespace procpool::internal
