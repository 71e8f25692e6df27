// PoolStats: a snapshot of what a pool and each of its workers are doing.
//
//   procpool::PoolStats stats = pool.stats();
//   for (const auto& w : stats.workers) printf("%d %s %lld\n", w.pid, to_string(w.state), w.tasks_done);
//
// A snapshot is consistent with itself (taken under the pool's lock) and stale the moment it
// returns. Safe to call from any thread at any time, also after close().

#ifndef PROCPOOL_POOL_STATS_H_
#define PROCPOOL_POOL_STATS_H_

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/time/time.h"

namespace procpool {

enum class WorkerState { kStarting, kIdle, kBusy, kExiting, kDead };
std::string_view to_string(WorkerState state);

struct WorkerStats {
  int slot = 0;                        // 0 .. workers-1, stable across restarts
  int pid = 0;
  WorkerState state = WorkerState::kStarting;
  std::optional<uint64_t> current_task;  // pool-wide task number of the task it runs, if busy
  int64_t tasks_done = 0;              // by this process
  absl::Duration time_busy;            // this process's time with work in hand
};

struct PoolStats {
  std::vector<WorkerStats> workers;
  int64_t tasks_submitted = 0;
  int64_t tasks_done = 0;              // completed with a value
  int64_t tasks_failed = 0;            // completed with an error (any cause)
  int64_t workers_restarted = 0;       // replacements forked after a death, timeout or recycling
};

}  // namespace procpool

#endif  // PROCPOOL_POOL_STATS_H_
