// PoolCore: the type-erased engine behind ProcessPool and Pool.
//
// It owns the worker processes and one thread of its own (the pool thread) that runs a poll loop
// over every worker's socket and pidfd: it batches queued tasks to idle workers, reads their
// results, notices deaths and timeouts, respawns, and drives close-then-join. Everything typed
// lives in Call and WorkerBody implementations. Thread-safe: any thread may submit, cancel,
// close, join or read stats.

#ifndef PROCPOOL_INTERNAL_POOL_CORE_H_
#define PROCPOOL_INTERNAL_POOL_CORE_H_

#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "procpool/internal/call.h"
#include "procpool/internal/worker_body.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool::internal {

class PoolCore {
 public:
  // Forks the workers (before the pool thread starts, when called on the main thread) and starts
  // the pool thread. Never fails: a failure to fork or start is reported by every later call.
  PoolCore(PoolOptions options, WorkerBodyFactory factory);
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
  // Drops the call's tasks that no worker has started; each gets on_error(kCancelled).
  void cancel(const Call* call);
  // Drops every queued task that no worker has started, of every call; each gets on_error(status).
  void cancel_pending(absl::Status status);

  absl::Status close();
  absl::Status join();
  void terminate();

  // Runs `callback` on the pool's callback thread (started on first use), one at a time, in the
  // order posted. Callbacks still queued when the pool is destroyed run before it is gone.
  void post_callback(std::function<void()> callback);

  int worker_count() const;
  PoolStats stats() const;
  const PoolOptions& options() const;

  // Logs through the pool's sink, stamped with the parent's name and the time since start.
  void log(LogSeverity severity, std::string message) const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_POOL_CORE_H_
