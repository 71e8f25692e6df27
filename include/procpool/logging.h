/// \file
/// Seeing inside workers: `procpool::log` from code a worker runs, and the stack a crashed worker
/// reported (`backtrace_of`).
///
/// ```cpp
/// struct Indexer {
///   absl::StatusOr<int64_t> run(const std::string& path) {
///     procpool::log(procpool::LogSeverity::kInfo, absl::StrCat("indexing ", path));
///     ...
///   }
/// };
/// absl::Status status = pool.apply(job);
/// if (std::optional<std::string> stack = procpool::backtrace_of(status)) std::cerr << *stack;
/// ```
///
/// A record logged in a worker reaches the pool's `PoolOptions::log_sink` as a LogEvent of source
/// `LogSource::kWorker`, naming the worker (slot, pid, host) and the pool-wide number of the task
/// it was running; one logged while task N runs reaches the sink before N's outcome reaches the
/// caller (it travels in the same stream as the results). Forked, fork-server and remote workers
/// alike. Thread safety: `log` may be called from any thread of the program, and in a worker from
/// any thread too: a record from a thread a task started goes out with the next frame of the
/// thread that runs tasks (before that task's outcome, if the thread logged before the task
/// returned), or at once while the worker waits for work; one logged just before the worker dies
/// still arrives from a forked worker, not always from a remote one. Not async-signal-safe (it
/// allocates, and may wait for the worker's stream): never call it from a signal handler. Fork
/// safety: nothing to do.
///
/// It also offers `metrics_text` (metrics.h), the pool's counters as Prometheus text.

#ifndef PROCPOOL_LOGGING_H_
#define PROCPOOL_LOGGING_H_

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "procpool/metrics.h"
#include "procpool/pool_options.h"

namespace procpool {

/// From code running in a worker (W's constructor, enter, run, exit; a Pool function): sends the
/// record to the pool's log_sink (source kWorker). A message longer than 64 KiB is cut there. If
/// the pool is gone the record is dropped. Elsewhere (in the program itself, or in a process a
/// task forked) it is written to stderr as `log_to_stderr` writes a kWorker event. Records from
/// threads other than the task's wait for the task thread to send them; while 8 MiB of them wait
/// (threads log faster than the worker sends), a new one is written to stderr instead. Never
/// fails; blocks only as long as a write to the pool (or to stderr) does.
void log(LogSeverity severity, std::string_view message);

/// The symbolized stack (one frame a line, innermost first) that a worker killed by a fatal
/// signal recorded, if `status` carries one: the kAborted status of the task it was running.
/// Nothing for any other status, or when `PoolOptions::crash_backtraces` was false.
std::optional<std::string> backtrace_of(const absl::Status& status);

/// The payload type URL under which a status carries the stack `backtrace_of` returns.
inline constexpr char kBacktracePayloadUrl[] = "type.procpool/crash-backtrace";

}  // namespace procpool

#endif  // PROCPOOL_LOGGING_H_
