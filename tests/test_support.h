// Helpers for tests that fork real workers: temporary directories, event files written by
// workers, and checks on the children a process has.

#ifndef PROCPOOL_TESTS_TEST_SUPPORT_H_
#define PROCPOOL_TESTS_TEST_SUPPORT_H_

#include <signal.h>
#include <sys/types.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "procpool/pool_stats.h"

// std::views of libstdc++ 12 do not compile with clang before 16 (LLVM issue 44178: it checks
// view_interface's constraints before the view is complete). What the tests do with them is left
// out of such a build; g++ builds run it.
#if !defined(__clang__) || __clang_major__ >= 16
#define PROCPOOL_TEST_STD_VIEWS 1
#else
#define PROCPOOL_TEST_STD_VIEWS 0
#endif

// 1 in a build with AddressSanitizer (g++ or clang).
#if defined(__SANITIZE_ADDRESS__)
#define PROCPOOL_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PROCPOOL_TEST_ASAN 1
#endif
#endif

namespace procpool::testing {

// A fresh directory under $TEST_TMPDIR (or /tmp), removed with its files when destroyed.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Appends one line to a file with a single write(), so lines from many processes never mix.
void append_line(const std::string& path, const std::string& line);
std::vector<std::string> read_lines(const std::string& path);
// The whole file's bytes; "" if it cannot be read.
std::string read_file(const std::string& path);
bool file_exists(const std::string& path);
// The path of helper program `name` (a `data` dependency of the test): in Bazel's runfiles tree,
// else next to this binary (run by hand from bazel-bin, or built by CMake, which puts helpers
// beside tests).
std::string helper_program(const std::string& name);

// Pids of this process's children (including zombies), from /proc.
std::vector<pid_t> child_pids(pid_t parent);
// This process's children named like pool workers or fork servers ("procpool-w3"), zombies
// included. A child names itself just after fork: wait for the count rather than race it.
std::vector<pid_t> worker_children();
// Living processes (zombies left out: they run nothing), anywhere on the machine, whose
// environment holds `entry` ("NAME=value"): what a test marked before it started them.
std::vector<pid_t> processes_with_environment(const std::string& entry);
// True if `pid` exists (a zombie counts).
bool process_exists(pid_t pid);
// Polls `condition` every few ms until it holds or `timeout` passes; returns whether it held.
template <typename F>
bool wait_until(F condition, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (condition()) return true;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return condition();
}

// Every worker of the pool serves (idle or busy): each has run enter(), none is starting, gone or
// (remote) still dialling in.
inline bool all_serving(const PoolStats& stats) {
  for (const WorkerStats& worker : stats.workers) {
    if (worker.state != WorkerState::kIdle && worker.state != WorkerState::kBusy) return false;
  }
  return true;
}

// Every worker of the pool is ready and has no task: none starting, busy, leaving or waiting for
// a replacement. After a call whose tasks killed workers, the replacements start after the call
// ends: wait for this before counting the parent's fds or children.
inline bool all_idle(const PoolStats& stats) {
  for (const WorkerStats& worker : stats.workers) {
    if (worker.state != WorkerState::kIdle) return false;
  }
  return true;
}

// The parent of process `pid` (/proc/PID/stat); 0 if it is gone or unreadable.
inline pid_t parent_of(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string content;
  std::getline(stat, content);
  const size_t close = content.rfind(')');
  if (close == std::string::npos) return 0;
  char state;
  int ppid = 0;
  if (std::sscanf(content.c_str() + close + 1, " %c %d", &state, &ppid) != 2) return 0;
  return ppid;
}

// Default actions for the crash signals while one lives. The test mains build doctest without its
// signal handlers (a forked worker would inherit them and print a "test case CRASHED" report for
// each crash it is meant to have); a case that needs a worker to die of exactly the signal it
// raised still uses this, so a handler installed by the case or a library is not chained.
class DefaultCrashHandlers {
 public:
  DefaultCrashHandlers() {
    for (size_t i = 0; i < kSignals.size(); ++i) {
      struct sigaction fallback {};
      fallback.sa_handler = SIG_DFL;
      ::sigaction(kSignals[i], &fallback, &saved_[i]);
    }
  }
  ~DefaultCrashHandlers() {
    for (size_t i = 0; i < kSignals.size(); ++i) ::sigaction(kSignals[i], &saved_[i], nullptr);
  }

 private:
  static constexpr std::array<int, 5> kSignals = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
  std::array<struct sigaction, 5> saved_{};
};

}  // namespace procpool::testing

#endif  // PROCPOOL_TESTS_TEST_SUPPORT_H_
