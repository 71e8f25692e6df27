// resize() and idle_timeout at their edges (issue 19, items 2 and 3), tried from outside: workers
// whose exit() hangs or crashes as they leave for idleness or a resize. Real forked workers; every
// enter() and exit() is counted in a file that every worker appends to.

#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "procpool/process_pool.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::TempDir;
using testing::wait_until;

constexpr absl::Duration kPatience = absl::Seconds(60);  // a loaded 2-core machine is slow

// How the workers' exit() misbehaves (read after fork: set before the pool is made).
enum class ExitMode { kReturn, kHangIgnoringSigterm, kAbort };
ExitMode g_exit_mode = ExitMode::kReturn;
std::string g_events;  // "enter <pid>", "exit <pid>"

// A worker that records its life; run(job) returns job * 3.
struct Recorder {
  using Job = int64_t;
  using Result = int64_t;
  void enter() { testing::append_line(g_events, absl::StrCat("enter ", ::getpid())); }
  int64_t run(int64_t job) { return job * 3; }
  void exit() {
    testing::append_line(g_events, absl::StrCat("exit ", ::getpid()));
    switch (g_exit_mode) {
      case ExitMode::kReturn:
        return;
      case ExitMode::kHangIgnoringSigterm:
        ::signal(SIGTERM, SIG_IGN);
        while (true) ::pause();
      case ExitMode::kAbort:
        std::abort();
    }
  }
};

// The events file of one case, named in the global while it lives.
struct Events {
  explicit Events(ExitMode mode) {
    g_exit_mode = mode;
    g_events = dir.file("events");
  }
  ~Events() { g_exit_mode = ExitMode::kReturn; }
  // The pids that ran `what` ("enter", "exit"), in order.
  std::vector<pid_t> pids(const std::string& what) const {
    std::vector<pid_t> out;
    for (const std::string& line : testing::read_lines(g_events)) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      pid_t pid = 0;
      if (parts.size() == 2 && parts[0] == what && absl::SimpleAtoi(parts[1], &pid)) {
        out.push_back(pid);
      }
    }
    return out;
  }
  int count(const std::string& what) const { return static_cast<int>(pids(what).size()); }
  std::string all() const { return absl::StrJoin(testing::read_lines(g_events), "; "); }

  TempDir dir;
};

PoolOptions quiet(PoolOptions options) {
  if (std::getenv("PROCPOOL_TEST_LOG") == nullptr) options.log_sink = nullptr;
  return options;
}

int serving(const PoolStats& stats) {
  int n = 0;
  for (const WorkerStats& worker : stats.workers) {
    n += worker.state == WorkerState::kIdle || worker.state == WorkerState::kBusy;
  }
  return n;
}

TEST_CASE("idle_timeout: a worker whose exit() hangs is stopped after join_timeout (SIGKILL "
          "after kill_grace when it ignores SIGTERM); work that needs its place gets a new "
          "worker") {
  Events events(ExitMode::kHangIgnoringSigterm);
  ProcessPool<Recorder> pool(quiet({.workers = 1,
                                    .join_timeout = absl::Milliseconds(300),
                                    .kill_grace = absl::Milliseconds(200),
                                    .idle_timeout = absl::Milliseconds(100)}));
  CHECK(pool.apply(1).value_or(-1) == 3);
  // Idle, it was told to leave: its exit() began, and hangs.
  REQUIRE(wait_until([&] { return events.count("exit") == 1; }, kPatience));
  const pid_t hung = events.pids("exit").front();
  // Stopped once join_timeout has passed (SIGTERM ignored: SIGKILL after kill_grace), not left
  // to hang for good.
  CHECK(wait_until([&] { return !testing::process_exists(hung); }, kPatience));
  // A call now gets a new worker in that place; it does not wait for the one that hung.
  AsyncResult<int64_t> pending = pool.apply_async(2);
  const absl::StatusOr<int64_t> result = pending.get(kPatience);
  CHECK_MESSAGE(result.value_or(-1) == 6, result.status());
  CHECK_MESSAGE(events.count("enter") == 2, events.all());
  pool.terminate();
}

TEST_CASE("idle_timeout: a worker whose exit() crashes as it leaves is not started again; the "
          "pool stays shrunk until work comes") {
  testing::DefaultCrashHandlers default_handlers;
  Events events(ExitMode::kAbort);
  ProcessPool<Recorder> pool(quiet({.workers = 2, .idle_timeout = absl::Milliseconds(100)}));
  REQUIRE(wait_until([&] { return events.count("exit") == 2; }, kPatience));
  // Both left; neither place starts a worker again while no work comes (a worker started would
  // idle and crash in its exit() again: a fork loop).
  absl::SleepFor(absl::Milliseconds(800));
  CHECK_MESSAGE(events.count("enter") == 2, events.all());
  CHECK(serving(pool.stats()) == 0);
  CHECK(pool.apply(4).value_or(-1) == 12);
  CHECK_MESSAGE(events.count("enter") == 3, events.all());
  pool.terminate();
}

}  // namespace
}  // namespace procpool
