/// \file
/// `PoolStats`: a snapshot of what a pool and each of its workers are doing.
///
/// ```cpp
/// procpool::PoolStats stats = pool.stats();
/// for (const procpool::WorkerStats& w : stats.workers) {
///   std::printf("%d %s %lld\n", w.pid, std::string(procpool::to_string(w.state)).c_str(),
///               static_cast<long long>(w.tasks_done));
/// }
/// ```
///
/// A snapshot is consistent with itself (taken under the pool's lock) and stale the moment it
/// returns. `stats()` is safe to call from any thread at any time, also after close().

#ifndef PROCPOOL_POOL_STATS_H_
#define PROCPOOL_POOL_STATS_H_

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/time/time.h"

namespace procpool {

/// What a worker is doing.
enum class WorkerState {
  kStarting,  ///< Being forked or connected, or running its constructor and enter().
  kIdle,      ///< Ready, with no task.
  kBusy,      ///< Running a task (or holding tasks to run).
  kExiting,   ///< Asked to leave: running exit(), or being stopped.
  kDead       ///< Gone and not yet replaced.
};
/// The state's name without the k ("idle", "busy", ...), for logs. Never fails.
std::string_view to_string(WorkerState state);

/// One worker, as `PoolStats::workers` shows it.
struct WorkerStats {
  int slot = 0;                        ///< 0 .. workers-1, stable across restarts
  int pid = 0;                         ///< The worker process's pid (0 while there is none).
  WorkerState state = WorkerState::kStarting;  ///< What it is doing.
  std::optional<uint64_t> current_task;  ///< pool-wide task number of the task it runs, if busy
  int64_t tasks_done = 0;              ///< by this process
  absl::Duration time_busy;            ///< this process's time with work in hand
};

/// A snapshot of a pool (`ProcessPool::stats()`, `Pool::stats()`).
struct PoolStats {
  std::vector<WorkerStats> workers;    ///< One per slot, in slot order.
  int64_t tasks_submitted = 0;         ///< Tasks accepted since the pool was made.
  int64_t tasks_done = 0;              ///< completed with a value
  int64_t tasks_failed = 0;            ///< completed with an error (any cause)
  int64_t workers_restarted = 0;       ///< replacements forked after a death, timeout or recycling
};

}  // namespace procpool

#endif  // PROCPOOL_POOL_STATS_H_
