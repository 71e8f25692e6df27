// resize() and idle_timeout at their edges (issue 19, items 2 and 3), tried from outside: workers
// whose exit() hangs or crashes as they leave for idleness or a resize, and resize() or stats()
// called from the log sink or a progress function while a caller's thread holds the pool (and an
// imap dropped from the log sink, on the pool's thread). Real
// forked workers; every enter() and exit() is counted in a file that every worker appends to.

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "procpool/process_pool.h"
#include "procpool/this_worker.h"
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

int g_enter_fails_in_slot = -1;  // the slot whose enter() always fails, if any

// A worker that records its life; run(job) returns job * 3.
struct Recorder {
  using Job = int64_t;
  using Result = int64_t;
  absl::Status enter() {
    testing::append_line(g_events, absl::StrCat("enter ", ::getpid()));
    if (this_worker().slot == g_enter_fails_in_slot) {
      return absl::UnavailableError("enter() fails on purpose");
    }
    return absl::OkStatus();
  }
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
  ~Events() {
    g_exit_mode = ExitMode::kReturn;
    g_enter_fails_in_slot = -1;
  }
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

TEST_CASE("idle_timeout leaves min_workers workers running: a place whose worker cannot start "
          "is not one of them") {
  Events events(ExitMode::kReturn);
  // Slot 2's worker never starts: its place stays empty, retried again and again.
  g_enter_fails_in_slot = 2;
  ProcessPool<Recorder> pool(quiet({.workers = 3,
                                    .respawn_delay = absl::Milliseconds(50),
                                    .respawn_max_delay = absl::Milliseconds(200),
                                    .min_workers = 2,
                                    .idle_timeout = absl::Milliseconds(100)}));
  // The two that started idle out only down to min_workers: neither leaves. (Counting the empty
  // place as one of the two, one of them would.)
  REQUIRE(wait_until([&] { return events.count("enter") >= 6; }, kPatience));
  absl::SleepFor(absl::Milliseconds(300));
  CHECK_MESSAGE(events.count("exit") == 0, events.all());
  CHECK(serving(pool.stats()) == 2);
  pool.terminate();
}

// Runs `call` on a thread of its own and says whether it returned within kPatience. One that
// never returns (a thread waiting for a lock it holds itself) cannot be joined or undone: the
// binary ends, failing, rather than hang until the test runner's timeout.
template <typename F>
void require_returns(const char* what, F call) {
  std::atomic<bool> returned{false};
  std::thread thread([&] {
    call();
    returned = true;
  });
  if (!wait_until([&] { return returned.load(); }, kPatience)) {
    std::fprintf(stderr, "%s never returned: the thread waits for itself\n", what);
    std::fflush(stderr);
    std::_Exit(1);
  }
  thread.join();
}

TEST_CASE("a log sink that calls resize() or stats() while a caller's resize() logs through it "
          "gets kFailedPrecondition and empty stats, not a thread that waits for itself") {
  Events events(ExitMode::kReturn);
  std::atomic<ProcessPool<Recorder>*> reachable{nullptr};
  std::atomic<int> refused{0};
  std::atomic<int> empty_stats{0};
  PoolOptions options{.workers = 2};
  options.log_sink = [&](const LogEvent& event) {
    ProcessPool<Recorder>* const pool = reachable.load();
    if (pool == nullptr || !absl::StrContains(event.message, "retired by resize()")) return;
    if (pool->resize(3).code() == absl::StatusCode::kFailedPrecondition) ++refused;
    if (pool->stats().workers.empty()) ++empty_stats;
  };
  ProcessPool<Recorder> pool(options);
  REQUIRE(wait_until([&] { return serving(pool.stats()) == 2; }, kPatience));
  reachable = &pool;
  // The retirement is logged on this thread (the caller's), under the pool's lock.
  require_returns("resize(1)", [&] { CHECK(pool.resize(1).ok()); });
  reachable = nullptr;
  CHECK(refused == 1);
  CHECK(empty_stats == 1);
  CHECK(pool.workers() == 1);
  CHECK(pool.apply(2).value_or(-1) == 6);
}

// A job too large for max_frame_bytes fails as it is encoded, in the dispatch that submit() runs
// on the caller's thread: the call's progress function runs there, under the pool's lock.
struct Measurer {
  using Job = std::string;
  using Result = int64_t;
  int64_t run(const std::string& job) { return static_cast<int64_t>(job.size()); }
};

TEST_CASE("a progress function run on a caller's thread that calls stats() or resize() gets empty "
          "stats and kFailedPrecondition, not a thread that waits for itself") {
  ProcessPool<Measurer> pool(quiet({.workers = 1, .max_frame_bytes = 4096}));
  CHECK(pool.apply(std::string("abc")).value_or(-1) == 3);
  std::atomic<int> progress_calls{0};
  std::atomic<int> refused{0};
  std::atomic<int> empty_stats{0};
  CallOptions options;
  options.progress = [&](size_t, size_t) {
    ++progress_calls;
    if (pool.stats().workers.empty()) ++empty_stats;
    if (pool.resize(2).code() == absl::StatusCode::kFailedPrecondition) ++refused;
  };
  const std::vector<std::string> jobs = {std::string(100'000, 'x'), "ab"};
  require_returns("map", [&] {
    const absl::StatusOr<std::vector<int64_t>> sizes = pool.map(jobs, options);
    CHECK(sizes.status().code() == absl::StatusCode::kResourceExhausted);
  });
  CHECK(progress_calls == 2);
  CHECK(empty_stats == 2);
  CHECK(refused == 2);
  CHECK(pool.workers() == 1);
}

// Sleeps, then returns job * 3; a negative job kills its worker after 300 ms.
struct SlowOrKilled {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t job) {
    absl::SleepFor(absl::Milliseconds(job < 0 ? 300 : 20));
    if (job < 0) ::raise(SIGKILL);
    return job * 3;
  }
};

// A log sink a program might write: it drops the imap it watches when a worker dies. The sink
// runs on the pool's thread holding the pool; dropping the range cancels its call there.
TEST_CASE("an imap dropped from the log sink as a worker's death is logged ends its unstarted "
          "tasks, not a pool thread that waits for itself") {
  using Range = decltype(std::declval<ProcessPool<SlowOrKilled>&>().imap(
      std::declval<std::vector<int64_t>>(), CallOptions{}));
  std::mutex held_mu;
  std::optional<Range> held;
  std::atomic<bool> dropped{false};
  PoolOptions options{.workers = 1};
  options.log_sink = [&](const LogEvent& event) {
    if (!absl::StrContains(event.message, "killed by signal")) return;
    std::optional<Range> range;
    {
      std::lock_guard lock(held_mu);
      range.swap(held);
    }
    if (!range) return;
    range.reset();  // the call is cancelled: its tasks not started never run
    dropped = true;
  };
  ProcessPool<SlowOrKilled> pool(options);
  std::vector<int64_t> jobs = {1, -1};
  for (int64_t i = 2; i < 40; ++i) jobs.push_back(i);
  {
    Range range = pool.imap(std::move(jobs), {.max_in_flight = 40});
    auto first = range.begin();
    REQUIRE(first != range.end());
    CHECK((*first).value_or(-1) == 3);
    std::lock_guard lock(held_mu);
    held.emplace(std::move(range));  // before the second task kills its worker, 300 ms on
  }
  if (!wait_until([&] { return dropped.load(); }, kPatience)) {
    std::fprintf(stderr, "the log sink never returned from dropping the imap: the pool's thread "
                         "waits for itself\n");
    std::fflush(stderr);
    std::_Exit(1);
  }
  // The pool goes on; the dropped call's tasks not started never ran (all 40 would be done by
  // now: 38 of 20 ms).
  absl::SleepFor(absl::Seconds(1));
  require_returns("apply", [&] { CHECK(pool.apply(5).value_or(-1) == 15); });
  const PoolStats stats = pool.stats();
  CHECK(stats.tasks_done < 20);
  CHECK(stats.tasks_done + stats.tasks_failed == stats.tasks_submitted);
}

}  // namespace
}  // namespace procpool
