// The default log sink and the names of worker states (declared in pool_options.h, pool_stats.h).

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/str_format.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool {

void log_to_stderr(const LogEvent& event) {
  if (event.severity == LogSeverity::kInfo && !getenv("PROCPOOL_LOG_ALL")) return;
  const char* level = event.severity == LogSeverity::kError     ? "error"
                      : event.severity == LogSeverity::kWarning ? "warning"
                                                                : "info";
  // One write per line, so lines from several processes do not interleave mid-line.
  std::string line = absl::StrFormat("[procpool +%.3fs %s pid %d] %s: %s\n",
                                     absl::ToDoubleSeconds(event.since_start), event.process,
                                     event.pid, level, event.message);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

std::string_view to_string(WorkerState state) {
  switch (state) {
    case WorkerState::kStarting: return "starting";
    case WorkerState::kIdle: return "idle";
    case WorkerState::kBusy: return "busy";
    case WorkerState::kExiting: return "exiting";
    case WorkerState::kDead: return "dead";
  }
  return "unknown";
}

}  // namespace procpool
