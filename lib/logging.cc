// The default log sink, procpool::log and backtrace_of, and the names of worker states (declared
// in pool_options.h, logging.h, pool_stats.h, and lib/output_sink.h).

#include <errno.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lib/output_sink.h"
#include "lib/worker/task_server.h"
#include "procpool/logging.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool {
namespace {

// Whether `host` names another machine than this one (local workers' events name this one).
bool elsewhere(const std::string& host) {
  static const std::string here = [] {
    char name[256] = {};
    ::gethostname(name, sizeof(name) - 1);
    return std::string(name);
  }();
  return !host.empty() && host != here;
}

// What comes before a forwarded line: "[procpool-w3] ", or "[procpool-w3 on node7] " for a
// worker on another host.
void append_worker_prefix(std::string& out, const LogEvent& event) {
  if (!elsewhere(event.host)) {
    absl::StrAppend(&out, "[", event.process, "] ");
  } else {
    absl::StrAppend(&out, "[", event.process, " on ", event.host, "] ");
  }
}

// Where forwarded lines are put together before they are written, kept from call to call: a
// worker's lines come thousands a read, and an allocation each would cost more than the rest of
// their way here. A long line's room is given back, not kept.
std::string& output_buffer() {
  thread_local std::string buffer;
  if (buffer.capacity() > (size_t{256} << 10)) std::string().swap(buffer);
  buffer.clear();
  return buffer;
}

std::FILE* stream_of(const LogEvent& event) {
  return event.source == LogSource::kStdout ? stdout : stderr;
}

}  // namespace

namespace internal {

bool is_log_to_stderr(const LogSink& sink) {
  using Function = void (*)(const LogEvent&);
  const Function* target = sink.target<Function>();
  return target != nullptr && *target == &log_to_stderr;
}

void log_lines_to_stderr(const LogEvent& event, std::span<const std::string_view> lines) {
  std::string& out = output_buffer();
  std::string prefix;
  append_worker_prefix(prefix, event);
  for (const std::string_view line : lines) {
    // Written in whole lines, about 64 KiB at a time.
    if (!out.empty() && out.size() + prefix.size() + line.size() >= (size_t{64} << 10)) {
      std::fwrite(out.data(), 1, out.size(), stream_of(event));
      out.clear();
    }
    out.append(prefix).append(line).push_back('\n');
  }
  std::fwrite(out.data(), 1, out.size(), stream_of(event));
}

}  // namespace internal

void log_to_stderr(const LogEvent& event) {
  // One write per line, so lines from several processes do not interleave mid-line.
  if (event.source == LogSource::kStdout || event.source == LogSource::kStderr) {
    std::string& line = output_buffer();
    append_worker_prefix(line, event);
    absl::StrAppend(&line, event.message, "\n");
    std::fwrite(line.data(), 1, line.size(), stream_of(event));
    return;
  }
  if (event.source == LogSource::kPool && event.severity == LogSeverity::kInfo &&
      !getenv("PROCPOOL_LOG_ALL")) {
    return;
  }
  const char* level = event.severity == LogSeverity::kError     ? "error"
                      : event.severity == LogSeverity::kWarning ? "warning"
                                                                : "info";
  std::string where = elsewhere(event.host) ? absl::StrCat(" on ", event.host) : "";
  if (event.task) absl::StrAppend(&where, " task ", *event.task);
  std::string line = absl::StrFormat("[procpool +%.3fs %s pid %d%s] %s: %s\n",
                                     absl::ToDoubleSeconds(event.since_start), event.process,
                                     event.pid, where, level, event.message);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

void log(LogSeverity severity, std::string_view message) {
  if (internal::send_worker_log(static_cast<int>(severity), message)) return;
  LogEvent event;
  event.severity = severity;
  event.source = LogSource::kWorker;
  event.process = program_invocation_short_name;
  event.pid = static_cast<int>(::getpid());
  event.message = std::string(message);
  log_to_stderr(event);
}

std::optional<std::string> backtrace_of(const absl::Status& status) {
  // absl::optional: Debian's Abseil does not alias std::optional.
  auto payload = status.GetPayload(kBacktracePayloadUrl);
  if (!payload.has_value()) return std::nullopt;
  return std::string(*payload);
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
