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
/// returns. `stats()` is safe to call from any thread at any time, also after close(). It costs a
/// read of /proc per local worker (its resident memory); the counters themselves cost the pool
/// nothing it would not do anyway. `procpool::metrics_text` (metrics.h) renders a snapshot for
/// Prometheus, and `PoolOptions::metrics_listen` serves that over HTTP.

#ifndef PROCPOOL_POOL_STATS_H_
#define PROCPOOL_POOL_STATS_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
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
  kDead       ///< Gone and not yet replaced (or left after `idle_timeout` until work needs it).
};
/// The state's name without the k ("idle", "busy", ...), for logs. Never fails.
std::string_view to_string(WorkerState state);

/// One worker, as `PoolStats::workers` shows it.
struct WorkerStats {
  /// 0 .. workers-1, stable across restarts; after `resize()` shrank the pool, the slots kept
  /// keep their numbers (a later growth takes the freed numbers back first).
  int slot = 0;
  int pid = 0;                         ///< The worker process's pid (0 while there is none).
  WorkerState state = WorkerState::kStarting;  ///< What it is doing.
  std::optional<uint64_t> current_task;  ///< pool-wide task number of the task it runs, if busy
  int64_t tasks_done = 0;              ///< by this process
  absl::Duration time_busy;            ///< this process's time with work in hand
  /// The host it runs on: this machine's name for a forked worker, the name its worker host gave
  /// for a remote one ("" while a remote slot waits for a host).
  std::string host;
  /// Its resident memory in bytes (RssAnon + RssFile, as for `max_worker_rss_bytes`), 0 when
  /// unknown: no process, or a remote worker whose pool sets neither `max_worker_rss_bytes` nor
  /// `metrics_listen` (its host reports it only then). Remote: as of its last heartbeat.
  int64_t resident_bytes = 0;
  /// Processes this slot started after its first (any cause: a death, a timeout, recycling).
  int64_t restarts = 0;
  /// How this slot's last process ended, in the words of the pool's log ("was killed by signal 9
  /// (SIGKILL)", "exited with status 3"); empty while none has.
  std::string last_exit;
};

/// Workers on one host (`PoolStats::hosts`): the per-host breakdown of `PoolStats::workers`.
struct HostStats {
  std::string host;              ///< as in WorkerStats::host
  int workers = 0;               ///< slots on it (dead ones waiting for a restart included)
  int busy = 0;                  ///< of those, running tasks
  int64_t tasks_done = 0;        ///< by its current processes
  int64_t resident_bytes = 0;    ///< sum of its workers' (those known)
  int64_t restarts = 0;          ///< sum of its slots'
};

/// Task run times in fixed buckets, updated as outcomes arrive (a comparison or five per results
/// frame). A task's time is the worker's own account of it; tasks a worker reports together (quick
/// tasks go back in pieces of a few milliseconds) each count as the piece's mean. Tasks that got
/// no time from a worker (it died or was stopped while running them, or never started them) are
/// not in it.
struct RunTimeHistogram {
  /// Upper bounds of the buckets (inclusive, as Prometheus's `le`), in nanoseconds; one more
  /// bucket holds what is above the last.
  static constexpr std::array<int64_t, 20> kBoundsNs = {
      100'000,       250'000,       500'000,        1'000'000,      2'500'000,
      5'000'000,     10'000'000,    25'000'000,     50'000'000,     100'000'000,
      250'000'000,   500'000'000,   1'000'000'000,  2'500'000'000,  5'000'000'000,
      10'000'000'000, 30'000'000'000, 60'000'000'000, 300'000'000'000, 3'600'000'000'000};
  /// counts[i]: tasks that took more than kBoundsNs[i-1] and at most kBoundsNs[i]; the last entry
  /// counts those over every bound. Not cumulative.
  std::array<int64_t, kBoundsNs.size() + 1> counts{};
  int64_t count = 0;      ///< tasks in it
  absl::Duration sum;     ///< their total run time

  /// Adds `tasks` tasks that took `total` together (each counts as total / tasks). Never fails.
  void add(int64_t tasks, absl::Duration total) {
    if (tasks <= 0) return;
    const int64_t each = absl::ToInt64Nanoseconds(total) / tasks;
    const auto bucket = std::lower_bound(kBoundsNs.begin(), kBoundsNs.end(), each);
    counts[static_cast<size_t>(bucket - kBoundsNs.begin())] += tasks;
    count += tasks;
    sum += total;
  }
  /// The `q`-quantile (0 <= q <= 1) of the run times, interpolated linearly within its bucket as
  /// Prometheus's histogram_quantile does; zero when empty; the last bound when it falls above it.
  absl::Duration quantile(double q) const;
};

/// A snapshot of a pool (`ProcessPool::stats()`, `Pool::stats()`).
struct PoolStats {
  /// One per slot, in slot order: `workers()` of them (a worker retired by `resize()` that still
  /// finishes its task is not listed, but its task counts in `tasks_running`).
  std::vector<WorkerStats> workers;
  int64_t tasks_submitted = 0;         ///< Tasks accepted since the pool was made.
  int64_t tasks_done = 0;              ///< completed with a value
  int64_t tasks_failed = 0;            ///< completed with an error (any cause)
  /// Workers started in a slot that had one before: replacements after a death, a timeout or
  /// recycling, and workers started again after `idle_timeout` retired the slot's last one.
  int64_t workers_restarted = 0;
  /// Accepted and not started: in the pool's queue, or sent to a worker that has not begun them.
  int64_t tasks_queued = 0;
  /// Running in a worker now (those of `workers` with a `current_task`).
  int64_t tasks_running = 0;
  /// Run times of the tasks that have an outcome from a worker (see RunTimeHistogram).
  RunTimeHistogram task_run_time;
  /// Bytes of the frames the pool sent its workers since it was made. Byte strings a local
  /// worker's blob region carries (64 KiB and more) are not in it.
  int64_t bytes_sent = 0;
  /// Bytes of the frames the pool read from its workers since it was made (blobs: as above).
  int64_t bytes_received = 0;
  /// One entry per host its workers run on, in order of their first slot.
  std::vector<HostStats> hosts;
};

}  // namespace procpool

#endif  // PROCPOOL_POOL_STATS_H_
