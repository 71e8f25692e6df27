// PoolCore: the type-erased engine behind ProcessPool and Pool.
//
// It owns the lock every layer below it runs under and one thread of its own (the pool thread),
// whose event loop polls the descriptors of every worker's link and drives close-then-join
// (lib/pool_core.cc; the entry points of calls, cancel and join in lib/pool_calls.cc). Which task
// runs where is the scheduler's (lib/scheduler/), the workers' lives (spawn, replace, deadlines,
// stop) supervision's (lib/supervision/), and each worker's process or connection its link's
// (lib/link/). Everything typed lives in Call and WorkerBody implementations. Thread-safe: any thread may submit, cancel,
// close, join or read stats.

#ifndef PROCPOOL_INTERNAL_POOL_CORE_H_
#define PROCPOOL_INTERNAL_POOL_CORE_H_

#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "procpool/internal/call.h"
#include "procpool/internal/worker_body.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool::internal {

class PoolCore;

// A reference to a PoolCore that may outlive it. AsyncResults keep one so that cancel() and
// add_done_callback() stay safe after their pool is gone: the pool clears it once its callback
// thread has stopped, and waits for a with_core() in progress before it goes on being destroyed.
class CoreLink {
 public:
  // Runs fn(core) with the link's lock held, so the pool cannot finish being destroyed meanwhile,
  // and returns true; returns false without running it once the pool is gone. `fn` may take the
  // core's lock, never the other way round: the pool thread never takes a link's lock.
  template <typename Fn>
  bool with_core(Fn&& fn) {
    std::lock_guard lock(mu_);
    if (core_ == nullptr) return false;
    fn(*core_);
    return true;
  }

 private:
  friend class PoolCore;
  std::mutex mu_;
  PoolCore* core_ = nullptr;
};

// Runs `callback`, a callback of a pool that is gone, on the calling thread, as the pool's callback
// thread would have: what it throws is reported on stderr (the pool's log sink went with it) and
// goes no further. (lib/callback_runner.cc)
void run_callback_without_pool(const std::function<void()>& callback);

class PoolCore {
 public:
  // What the typed layer knows of a pool's jobs and results.
  struct Features {
    // They may hold byte strings: each forked worker gets a shared region for large ones
    // (internal/blob_region.h).
    bool blob_regions = true;
  };
  // Forks the workers (before the pool thread starts, when called on the main thread) and starts
  // the pool thread: at once, or with the first call (or stats(), join(timeout)) for local
  // workers forked here. Never fails: a failure to fork or start is reported by every later call.
  // `worker_type` names the worker type for remote workers' handshake (worker_type_name()); an
  // empty one means the pool cannot have remote workers (PoolOptions::remote is then refused).
  // `features`: what the typed layer knows of the jobs and results (remote workers ignore it).
  PoolCore(PoolOptions options, WorkerBodyFactory factory, std::string worker_type,
           Features features);
  PoolCore(PoolOptions options, WorkerBodyFactory factory, std::string worker_type = "")
      : PoolCore(std::move(options), std::move(factory), std::move(worker_type), Features{}) {}
  // close() + join().
  ~PoolCore();
  PoolCore(const PoolCore&) = delete;
  PoolCore& operator=(const PoolCore&) = delete;

  // Queues tasks [first, first + count) of `call`. kFailedPrecondition after close(), or the
  // pool's failure (e.g. a worker's enter() failed). On failure no task was queued.
  absl::Status submit(std::shared_ptr<Call> call, size_t first, size_t count);
  // Runs the single task of `call` (index 0), on an idle worker whose channel this thread then
  // reads itself until `done()` (checked under the core's lock) says the call has its outcome;
  // otherwise (no idle worker, a task timeout to enforce) it is queued as by submit. Either way
  // the call gets exactly one outcome. Errors as for submit.
  absl::Status run_one(std::shared_ptr<Call> call, const std::function<bool()>& done);
  // Drops the call's tasks that no worker has started; each gets on_error(kCancelled). From the
  // pool's own code (a log sink or progress function that drops an imap), where the pool is held,
  // it is done by the pool's thread at its next turn, if the call is still alive then.
  void cancel(std::shared_ptr<const Call> call);
  // The call's frames still queued for a worker stop referencing memory it lent (its caller's
  // array of jobs, sent in place): their unsent bytes are copied. Call before that memory may go
  // away, after the call has its outcome (then no new frame of it is made). Does not block on
  // workers.
  void release_borrowed(const Call* call);
  // Drops every queued task that no worker has started, of every call; each gets on_error(status).
  // From the pool's own code, done by the pool's thread at its next turn, as cancel().
  void cancel_pending(absl::Status status);

  // --- Added for AsyncResult::cancel() and join(timeout) (issue 11); see lib/pool_calls.cc. ---

  // Cancels every task of `call` that has no outcome yet. Under the core's lock, first runs
  // `settle` (the call records its cancelled outcome and returns true, or returns false if its
  // outcome was already in: then nothing else happens). Then: the call's queued tasks are dropped
  // (on_error(status), which a settled call ignores); a worker running one of its tasks, or about
  // to start one, is stopped (SIGTERM, SIGKILL after kill_grace) and replaced, and its tasks of
  // other calls that had not started run elsewhere; tasks of the call a worker holds behind another
  // call's work are stopped the same way when the worker reaches them. Marks the call cancelled
  // (Call::cancelled): none of its tasks is queued again. Returns what `settle` returned.
  // Thread-safe; does not wait for the worker to exit.
  bool cancel_call(Call* call, absl::Status status, const std::function<bool()>& settle);

  // A link that outlives this core (see CoreLink). The same one every time.
  std::shared_ptr<CoreLink> link() const { return link_; }

  absl::Status close();
  absl::Status join();
  // As join(), but gives up after `timeout` with kDeadlineExceeded and stops nobody: the shutdown
  // goes on (workers finish their work, run exit() and leave), and a later join() or
  // join(timeout) waits for it again. PoolOptions::join_timeout is not enforced here: its clock
  // starts at the first join(). kFailedPrecondition unless close() or terminate() came first.
  absl::Status join(absl::Duration timeout);
  void terminate();

  // Runs `callback` on the pool's callback thread (started on first use), one at a time, in the
  // order posted. Callbacks still queued when the pool is destroyed run before it is gone.
  void post_callback(std::function<void()> callback);

  // The pool's size now: PoolOptions::workers (or the CPU count), then the last resize().
  int worker_count() const;
  // ProcessPool::resize (process_pool.h). Thread-safe; never blocks beyond the core's lock.
  absl::Status resize(int workers);
  // Where remote workers dial ("host:port"); empty for a pool without PoolOptions::remote.
  std::string remote_address() const;
  // The token remote workers must prove (given or made); empty for a pool without it.
  std::string remote_token() const;
  // Where PoolOptions::metrics_listen serves ("host:port"); empty without it.
  std::string metrics_address() const;
  PoolStats stats() const;
  const PoolOptions& options() const;

  // Logs through the pool's sink, stamped with the parent's name and the time since start.
  void log(LogSeverity severity, std::string message) const;

 private:
  class Impl;

 public:
  // While one lives, this thread runs the program's code (a progress function, the log sink)
  // under the core's lock, on the pool thread or a caller's: calls of this pool from that code
  // are refused (kFailedPrecondition; stats() is empty, terminate() does nothing) rather than
  // left to wait for the lock this thread holds. (The pool thread has one for its whole loop.)
  class HeldLockMark {
   public:
    explicit HeldLockMark(const PoolCore& core) : HeldLockMark(core.impl_.get()) {}
    explicit HeldLockMark(const Impl* pool);  // the pool's own code (its loop, its sink)
    ~HeldLockMark();
    HeldLockMark(const HeldLockMark&) = delete;
    HeldLockMark& operator=(const HeldLockMark&) = delete;

   private:
    const void* const outer_;
  };

 private:
  std::unique_ptr<Impl> impl_;
  std::shared_ptr<CoreLink> link_ = std::make_shared<CoreLink>();
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_POOL_CORE_H_
