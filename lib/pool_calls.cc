// PoolCore::Impl, what callers' threads do: admit and queue calls, borrow an idle worker for
// apply, cancel, close, join and terminate, read stats (pool_core_impl.h).

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "lib/common/clock.h"
#include "lib/common/spin.h"
#include "lib/link/remote_launcher.h"
#include "lib/options_check.h"
#include "lib/pool_core_impl.h"

namespace procpool::internal {
namespace {

// A caller reading a borrowed worker's channel (apply) wakes this often to notice a stop.
constexpr int kBorrowPollMs = 100;

}  // namespace

absl::Status PoolCore::Impl::submit(std::shared_ptr<Call> call, size_t first, size_t count) {
  if (called_from_own_loop()) return own_loop_error("a call");
  if (foreign()) return foreign_error();
  {
    MutexLock lock(mu_);
    if (absl::Status admitted = admit(call->settings()); !admitted.ok()) return admitted;
    if (count == 0) return absl::OkStatus();
    scheduler_->submit(std::move(call), first, count);
    // Send to an idle worker from this thread: one thread hand-off fewer on the latency path.
    // The pool thread polls every channel already; it needs waking for what it must watch anew.
    scheduler_->dispatch();
  }
  wake();
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::run_one(std::shared_ptr<Call> call,
                                     const std::function<bool()>& done) {
  if (called_from_own_loop()) return own_loop_error("a call");
  if (foreign()) return foreign_error();
  MutexLock lock(mu_);
  if (absl::Status admitted = admit(call->settings()); !admitted.ok()) return admitted;
  const bool has_timeout = call->settings().has_task_timeout
                               ? call->settings().task_timeout != absl::InfiniteDuration()
                               : options_.task_timeout != absl::InfiniteDuration();
  std::optional<int> slot;
  if (!has_timeout && !joining_) slot = scheduler_->dispatch_to_idle(call);
  if (!slot) {
    scheduler_->submit(std::move(call), 0, 1);
    scheduler_->dispatch();
    lock.unlock();
    wake();
    return absl::OkStatus();
  }
  // Borrow the worker: read its result on this thread, sparing the two hand-offs through the
  // pool thread. The pool thread still watches for the worker's end; if it dies, the pool thread
  // settles the task as for any other.
  const uint64_t generation = supervisor_->generation(*slot);
  WorkerLink* link = supervisor_->borrow(*slot);
  const int fd = link != nullptr ? link->channel_fd() : -1;
  while (fd >= 0 && supervisor_->generation(*slot) == generation && !done() &&
         !supervisor_->terminating()) {
    pollfd ready{fd, static_cast<short>(POLLIN | (link->has_unsent() ? POLLOUT : 0)), 0};
    const int64_t spin_ns = spin_.budget_ns();
    const bool spin_enabled = spin_.enabled();
    lock.unlock();
    // The reply usually comes within microseconds: look for it a little before sleeping.
    int ready_count = 0;
    if (spin_ns > 0) {
      const int64_t until = monotonic_now_ns() + spin_ns;
      while ((ready_count = ::poll(&ready, 1, 0)) == 0 && monotonic_now_ns() < until) {
        SpinPolicy::relax();
      }
    }
    int64_t blocked_ns = -1;
    if (ready_count == 0) {
      const int64_t since = spin_enabled ? monotonic_now_ns() : 0;
      ready_count = ::poll(&ready, 1, kBorrowPollMs);
      blocked_ns = spin_enabled ? monotonic_now_ns() - since : 0;
    }
    lock.lock();
    if (spin_ns > 0 && blocked_ns < 0) spin_.spun(true);
    if (blocked_ns >= 0) {
      if (spin_ns > 0) spin_.spun(false);
      spin_.blocked(blocked_ns);
    }
    // The worker may have ended meanwhile, and the pool thread dropped its link: look at the
    // slot's link before touching ours.
    if (supervisor_->generation(*slot) != generation || supervisor_->link(*slot) != link ||
        link->channel_fd() != fd) {
      break;
    }
    supervisor_->pump_borrowed(*slot, ready.revents);
    // The task was sent back (a retry): the pool thread runs it from the queue.
    if (scheduler_->has_pending()) break;
  }
  bool quiet = false;
  if (supervisor_->generation(*slot) == generation) {
    supervisor_->give_back(*slot);
    // An idle worker sends nothing until it is given work, and whoever gives it work next wakes
    // the pool thread (submit) or reads the channel itself (another borrow): the pool thread
    // need not be woken now just to poll the channel again. (Pinned to one CPU, that wake-up was
    // a third of a round trip.)
    // (A worker retired or parked meanwhile is not quiet: the pool thread sends its shutdown.)
    quiet = !closed_ && !joining_ && scheduler_->idle(*slot) && scheduler_->accepting(*slot) &&
            !scheduler_->has_pending();
  }
  lock.unlock();
  // The pool thread polls without this channel while it is borrowed: it must see it again.
  if (!quiet) wake();
  return absl::OkStatus();
}

void PoolCore::Impl::cancel(std::shared_ptr<const Call> call) {
  if (foreign()) return;
  if (called_from_own_loop()) {
    // This thread may hold mu_, in the middle of the scheduler's work: the pool thread does it.
    {
      MutexLock lock(deferred_mu_);
      deferred_cancels_.calls.push_back(call);
    }
    wake();
    return;
  }
  {
    MutexLock lock(mu_);
    cancel_locked(call.get());
  }
  wake();
}

void PoolCore::Impl::cancel_locked(const Call* call) {
  if (!scheduler_) return;
  scheduler_->cancel(call, absl::CancelledError("cancelled before it started"));
  // The tasks running go on (their worker is not stopped), asked to stop.
  scheduler_->ask_to_stop(call, absl::CancelledError("the call was cancelled"));
}

void PoolCore::Impl::release_borrowed(const Call* call) {
  if (foreign()) return;
  // From the pool's own code no call can have lent anything: a call made there is refused
  // before it sends a frame.
  if (called_from_own_loop()) return;
  MutexLock lock(mu_);
  if (supervisor_) supervisor_->release_borrowed(call);
}

void PoolCore::Impl::cancel_pending(absl::Status status) {
  if (foreign()) return;
  if (called_from_own_loop()) {
    {
      MutexLock lock(deferred_mu_);
      deferred_cancels_.pending = std::move(status);
    }
    wake();
    return;
  }
  {
    MutexLock lock(mu_);
    cancel_pending_locked(status);
  }
  wake();
}

void PoolCore::Impl::cancel_pending_locked(const absl::Status& status) {
  if (!scheduler_) return;
  scheduler_->cancel_all(status);
  scheduler_->ask_to_stop(nullptr, status);
}

void PoolCore::Impl::run_deferred_cancels() {
  DeferredCancels due;
  {
    MutexLock lock(deferred_mu_);
    if (deferred_cancels_.calls.empty() && !deferred_cancels_.pending) return;
    std::swap(due, deferred_cancels_);
  }
  for (const std::weak_ptr<const Call>& weak : due.calls) {
    // A call gone meanwhile has no tasks left to drop (queued tasks hold their call).
    if (const std::shared_ptr<const Call> call = weak.lock()) cancel_locked(call.get());
  }
  if (due.pending) cancel_pending_locked(*due.pending);
}

bool PoolCore::Impl::cancel_call(Call* call, const absl::Status& status,
                                 const std::function<bool()>& settle) {
  if (called_from_own_loop()) return false;
  if (foreign()) return false;
  {
    MutexLock lock(mu_);
    if (!settle()) return false;
    call->cancelled = true;
    if (scheduler_) {
      // Tasks not started are taken back (exactly, through their claims); a worker running one
      // is stopped and replaced, like Pebble's future.cancel().
      scheduler_->cancel(call, status);
      scheduler_->stop_running(
          call, absl::CancelledError(options_.cancel_grace > absl::ZeroDuration()
                                         ? "the task was cancelled and asked to stop"
                                         : "the task was cancelled; its worker was stopped"));
    }
  }
  wake();
  return true;
}

absl::Status PoolCore::Impl::close() {
  if (called_from_own_loop()) return own_loop_error("close()");
  if (foreign()) return foreign_error();
  MutexLock lock(mu_);
  closed_ = true;
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::begin_join(bool with_deadline) {
  if (!closed_) return absl::FailedPreconditionError("join() needs close() or terminate() first");
  joining_ = true;
  if (supervisor_ == nullptr) return absl::OkStatus();  // invalid options: nothing was started
  if (with_deadline && !join_deadline_armed_) {
    join_deadline_armed_ = true;
    supervisor_->begin_join(options_.join_timeout == absl::InfiniteDuration()
                                ? INT64_MAX
                                : monotonic_now_ns() + to_ns(options_.join_timeout));
  } else {
    supervisor_->begin_join(INT64_MAX);
  }
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::join() {
  if (called_from_own_loop()) return own_loop_error("join()");
  if (foreign()) return foreign_error();
  {
    MutexLock lock(mu_);
    if (absl::Status begun = begin_join(/*with_deadline=*/true); !begun.ok()) return begun;
    if (supervisor_ == nullptr) return absl::OkStatus();
  }
  wake();
  MutexLock lock(mu_);
  run_loop_to_end();
  return returned_join_result();
}

absl::Status PoolCore::Impl::returned_join_result() {
  absl::Status result = supervisor_->join_result();
  if (!result.ok()) join_failure_reported_ = true;
  return result;
}

absl::Status PoolCore::Impl::join_for(absl::Duration timeout) {
  if (called_from_own_loop()) return own_loop_error("join()");
  if (foreign()) return foreign_error();
  {
    MutexLock lock(mu_);
    // Pebble's join(timeout): the shutdown starts, but join_timeout's clock is left to join():
    // a caller that polls with join(timeout) must not have its workers killed behind its back.
    if (absl::Status begun = begin_join(/*with_deadline=*/false); !begun.ok()) return begun;
    if (supervisor_ == nullptr) return absl::OkStatus();
    // A bounded wait needs the shutdown to run elsewhere: on the pool thread, started now if no
    // call has started it yet.
    (void)ensure_thread();
    if (!loop_running_ && !loop_done_) {
      // No pool thread: this thread runs the shutdown to its end (it cannot give up midway).
      run_loop_to_end();
      return returned_join_result();
    }
  }
  wake();
  MutexLock lock(mu_);
  std::unique_lock<std::mutex> native(mu_.native(), std::adopt_lock);
  const bool done = loop_done_cv_.wait_for(
      native, absl::ToChronoNanoseconds(std::clamp(timeout, absl::ZeroDuration(), absl::Hours(24 * 365))),
      [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return loop_done_; });
  native.release();
  if (done) return returned_join_result();
  return absl::DeadlineExceededError(absl::StrCat(
      "join: workers still running after ", absl::FormatDuration(timeout),
      "; none was stopped, the shutdown goes on"));
}

absl::Status PoolCore::Impl::resize(int workers) {
  if (called_from_own_loop()) return own_loop_error("resize()");
  if (foreign()) return foreign_error();
  if (absl::Status checked = check_resize(workers); !checked.ok()) return checked;
  {
    MutexLock lock(mu_);
    if (!invalid_options_.ok()) return invalid_options_;
    if (closed_) return absl::FailedPreconditionError("resize: the pool is closed");
    if (loop_done_) {  // the constructor failed (a pool that ended was closed first)
      return thread_failure_.ok() ? absl::FailedPreconditionError("resize: the pool has ended")
                                  : thread_failure_;
    }
    // Workers are started (and retired ones watched as they leave) by the pool thread.
    if (absl::Status thread = ensure_thread(); !thread.ok()) return thread;
    supervisor_->resize(workers);
    target_workers_.store(workers, std::memory_order_relaxed);
  }
  wake();
  return absl::OkStatus();
}

void PoolCore::Impl::terminate() {
  if (called_from_own_loop()) {
    std::fprintf(stderr, "procpool: %s\n", std::string(own_loop_error("terminate()").message()).c_str());
    return;
  }
  if (foreign()) return;
  {
    MutexLock lock(mu_);
    closed_ = true;
    if (!supervisor_ || loop_done_) return;
    joining_ = true;
    supervisor_->terminate();
  }
  wake();
  MutexLock lock(mu_);
  run_loop_to_end();
}

std::string PoolCore::Impl::remote_address() const {
  if (foreign()) return "";
  MutexLock lock(mu_);
  if (auto* remote = dynamic_cast<const RemoteLauncher*>(launcher_.get())) return remote->address();
  return "";
}

std::string PoolCore::Impl::remote_token() const {
  if (foreign()) return "";
  MutexLock lock(mu_);
  if (auto* remote = dynamic_cast<const RemoteLauncher*>(launcher_.get())) return remote->token();
  return "";
}

PoolStats PoolCore::Impl::stats() const {
  PoolStats stats;
  if (called_from_own_loop()) return stats;  // empty, as in a worker
  if (foreign()) return stats;
  MutexLock lock(mu_);
  if (!scheduler_) return stats;
  // Reading the state of workers means running the loop that learns it (see the constructor).
  if (!closed_) (void)const_cast<Impl*>(this)->ensure_thread();
  stats.tasks_submitted = scheduler_->tasks_submitted();
  stats.tasks_done = scheduler_->tasks_done();
  stats.tasks_failed = scheduler_->tasks_failed();
  stats.task_run_time = scheduler_->run_time();
  supervisor_->fill_stats(stats);
  // Every task accepted gets one outcome, done or failed (scheduler.h): those without one yet are
  // running or waiting.
  stats.tasks_queued = std::max<int64_t>(
      0, stats.tasks_submitted - stats.tasks_done - stats.tasks_failed - stats.tasks_running);
  return stats;
}

}  // namespace procpool::internal
