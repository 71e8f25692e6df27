// Seeing inside workers: what a worker prints (forwarded to the pool's log sink, line by line,
// with the worker's name), what its code logs (procpool::log, delivered before the task's
// result), and the stack of a worker that crashes (on the task's status, and in one error event).
//
//   bazel run //examples/observability
//
// Prints, among the pool's own lines:
//   [procpool-w0] parsing record 3                   <- the worker's printf, forwarded
//   [procpool +0.004s procpool-w1 pid 4242 on host task 2] info: record 2 has 2 fields
//   task 5 crashed: ... was killed by signal 11 (SIGSEGV) while running this task
//   #0 0x... crash_here(long)                        <- its stack, symbolized
//   #1 0x... Parser::run(long)

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "procpool/procpool.h"

// Not inlined, so that the crash's stack names it.
[[gnu::noinline]] int64_t crash_here(int64_t record) {
  volatile int64_t* nowhere = nullptr;
  *nowhere = record;  // SIGSEGV
  return record;
}

struct Parser {
  void enter() { procpool::log(procpool::LogSeverity::kInfo, "parser ready"); }
  int64_t run(int64_t record) {
    std::printf("parsing record %lld\n", static_cast<long long>(record));
    procpool::log(procpool::LogSeverity::kInfo,
                  absl::StrCat("record ", record, " has ", record % 3, " fields"));
    if (record == 5) return crash_here(record);
    return record % 3;
  }
};

int main() {
  // The default sink (log_to_stderr) prints forwarded lines to this program's stdout/stderr with
  // the worker's name, records of procpool::log whatever their severity, and the pool's warnings
  // and errors (the crash's stack among them).
  procpool::ProcessPool<Parser> pool({.workers = 2, .worker_output = procpool::WorkerOutput::kForward});
  std::vector<int64_t> records = {0, 1, 2, 3, 4, 5, 6, 7};
  int failed = 0;
  for (absl::StatusOr<int64_t> fields : pool.imap(records)) {
    if (fields.ok()) continue;
    ++failed;
    std::printf("a task crashed: %s\n", std::string(fields.status().message()).c_str());
    if (std::optional<std::string> stack = procpool::backtrace_of(fields.status())) {
      std::printf("its stack:\n%s", stack->c_str());
    }
  }
  std::fflush(stdout);
  return failed == 1 ? 0 : 1;
}
