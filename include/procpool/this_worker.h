/// \file
/// `this_worker()` and `this_task`: what code running in a worker may ask about where it runs
/// and about the task it runs.
///
/// ```cpp
/// struct Trainer {
///   Trainer() { device_ = procpool::this_worker().slot % gpu_count(); }  // one GPU per slot
///   Model run(const Shard& shard) {
///     for (const Batch& batch : shard.batches()) {
///       if (procpool::this_task::stop_requested()) return partial_;  // discarded: kCancelled
///       step(batch);
///     }
///     return model_;
///   }
/// };
/// ```
///
/// Valid in the worker process, for every start method and for remote workers: in W's
/// constructor, `enter()`, `run()`, `exit()`, and in the functions a `procpool::Pool` runs.
/// Called anywhere else (the program that owns the pool, a thread it starts), `this_worker()`
/// returns a WorkerInfo with slot -1, and `this_task` reports no stop and attempt 0.
///
/// Threads: a worker runs its tasks on one thread; these may be called from any thread of the
/// worker and say the same. Fork: a process the task forks sees its parent's answers until it
/// execs.

#ifndef PROCPOOL_THIS_WORKER_H_
#define PROCPOOL_THIS_WORKER_H_

#include <cstdint>
#include <stop_token>
#include <string>

namespace procpool {

/// Who this worker process is (see the file comment).
struct WorkerInfo {
  int slot = 0;            ///< 0 .. workers-1: its place in the pool; -1 outside a worker
  int64_t generation = 0;  ///< 0 for a slot's first process, +1 per replacement
  int pid = 0;             ///< this process's id (on its own host, for a remote worker)
  std::string host;        ///< the name of the host it runs on (gethostname)
  std::string pool_name;   ///< PoolOptions::name
  int workers = 0;         ///< the pool's size
};

/// This worker's identity. Never blocks, never fails; the reference stays valid (and its fields
/// unchanged) for the life of the process.
const WorkerInfo& this_worker();

/// The task this worker is running now.
namespace this_task {

/// True once the pool wants the running task to stop soon: its AsyncResult or its call was
/// cancelled (AsyncResult::cancel, leaving an imap loop early, a signal's close), its
/// `CallOptions::soft_timeout` passed, or the pool is terminating. A task that then returns has
/// its value discarded: it reports kCancelled (kDeadlineExceeded after its soft_timeout), and its
/// worker lives on. One that does not return within `PoolOptions::cancel_grace` has its worker
/// killed, as without this. It costs a relaxed atomic load of the worker's control page (shared
/// memory the pool, or a remote worker's relay, writes), no system call: call it as often as you
/// like. False outside a worker and between tasks.
bool stop_requested();

/// The same request as a `std::stop_token`, for `std::stop_callback` and APIs that take one.
/// Each task gets a fresh one. `token.stop_requested()` turns true when `stop_requested()` above
/// first sees the request, or within about a millisecond by a watcher thread the worker starts
/// the first time a task calls this (a thread that reads the same shared flag; callbacks run on
/// it, or on the thread that calls stop_requested()). Outside a worker: a token that never
/// stops.
std::stop_token stop_token();

/// Which run of this task this is: 1 for the first, 2 for its first retry (CallOptions::retries
/// and retry_on), and so on. 0 outside a worker.
int attempt();

}  // namespace this_task
}  // namespace procpool

#endif  // PROCPOOL_THIS_WORKER_H_
