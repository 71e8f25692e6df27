// resize() and idle_timeout (issue 19, items 2 and 3): a pool that grows and shrinks while it
// works, from any thread and from a callback, and one whose idle workers leave and come back.
// Real forked workers (and one remote pool over loopback); every enter(), task and exit() is
// counted in files that many processes append to, so a task lost, run twice, or an exit() that did
// not run shows.

#include "procpool/process_pool.h"

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
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
#include "procpool/pool.h"
#include "tests/remote_worker.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::TempDir;
using testing::wait_until;

// Where the workers of the running case write (read after fork: set before the pool is made).
std::string g_events;  // "enter <pid>", "exit <pid>"
std::string g_runs;    // "<job> <pid>" once per execution of a task
std::string g_gate;    // tasks with a job >= kGated wait until this file exists
absl::Duration g_exit_takes;  // exit() lasts this long after it wrote its line

constexpr int64_t kGated = 1000;  // jobs from here wait for the gate
constexpr absl::Duration kPatience = absl::Seconds(60);  // a loaded 2-core machine is slow

// A worker that records its life; run(job) returns job * 3.
struct Recorder {
  using Job = int64_t;
  using Result = int64_t;
  void enter() { testing::append_line(g_events, absl::StrCat("enter ", ::getpid())); }
  int64_t run(int64_t job) {
    testing::append_line(g_runs, absl::StrCat(job, " ", ::getpid()));
    if (job >= kGated) {
      while (!testing::file_exists(g_gate)) absl::SleepFor(absl::Milliseconds(2));
    }
    return job * 3;
  }
  void exit() {
    testing::append_line(g_events, absl::StrCat("exit ", ::getpid()));
    absl::SleepFor(g_exit_takes);
  }
};

// The files of one case, named in the globals while it lives.
struct Files {
  Files() {
    g_exit_takes = absl::ZeroDuration();
    g_events = dir.file("events");
    g_runs = dir.file("runs");
    g_gate = dir.file("gate");
  }
  void open_gate() const { testing::append_line(g_gate, "open"); }
  // pid -> how many times `what` ("enter", "exit") ran in it.
  std::map<pid_t, int> hooks(const std::string& what) const {
    std::map<pid_t, int> out;
    for (const std::string& line : testing::read_lines(g_events)) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      pid_t pid = 0;
      if (parts.size() == 2 && parts[0] == what && absl::SimpleAtoi(parts[1], &pid)) ++out[pid];
    }
    return out;
  }
  int count(const std::string& what) const {
    int n = 0;
    for (const auto& [pid, times] : hooks(what)) n += times;
    return n;
  }
  // job -> how many times it ran; and the pids that ran any.
  std::map<int64_t, int> runs(std::set<pid_t>* pids = nullptr) const {
    std::map<int64_t, int> out;
    for (const std::string& line : testing::read_lines(g_runs)) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      int64_t job = 0;
      pid_t pid = 0;
      if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &job) ||
          !absl::SimpleAtoi(parts[1], &pid)) {
        continue;
      }
      ++out[job];
      if (pids != nullptr) pids->insert(pid);
    }
    return out;
  }
  std::set<pid_t> running_pids() const {
    std::set<pid_t> pids;
    runs(&pids);
    return pids;
  }
  // The pids that ran a job that waits for the gate.
  std::set<pid_t> gated_pids() const {
    std::set<pid_t> pids;
    for (const std::string& line : testing::read_lines(g_runs)) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      int64_t job = 0;
      pid_t pid = 0;
      if (parts.size() == 2 && absl::SimpleAtoi(parts[0], &job) &&
          absl::SimpleAtoi(parts[1], &pid) && job >= kGated) {
        pids.insert(pid);
      }
    }
    return pids;
  }

  TempDir dir;
};

PoolOptions quiet(PoolOptions options) {
  if (std::getenv("PROCPOOL_TEST_LOG") == nullptr) options.log_sink = nullptr;
  return options;
}

std::vector<int64_t> iota(int64_t from, int64_t count) {
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < count; ++i) jobs.push_back(from + i);
  return jobs;
}

void check_tripled(const absl::StatusOr<std::vector<int64_t>>& results,
                   const std::vector<int64_t>& jobs) {
  REQUIRE_MESSAGE(results.ok(), results.status());
  REQUIRE(results->size() == jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) CHECK((*results)[i] == jobs[i] * 3);
}

// Each job ran exactly once.
void check_once_each(const Files& files, const std::vector<int64_t>& jobs) {
  const std::map<int64_t, int> runs = files.runs();
  CHECK(runs.size() == jobs.size());
  for (int64_t job : jobs) {
    CAPTURE(job);
    CHECK(runs.count(job) == 1);
    if (runs.count(job) == 1) CHECK(runs.at(job) == 1);
  }
}

int serving(const PoolStats& stats) {
  int n = 0;
  for (const WorkerStats& worker : stats.workers) {
    n += worker.state == WorkerState::kIdle || worker.state == WorkerState::kBusy;
  }
  return n;
}

TEST_CASE("resize outside 1..4096 is kInvalidArgument; after close() kFailedPrecondition") {
  Files files;
  ProcessPool<Recorder> pool(quiet({.workers = 1}));
  for (int bad : {0, -1, 4097, 1 << 30}) {
    CAPTURE(bad);
    const absl::Status status = pool.resize(bad);
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(status.message(), "4096"));
  }
  CHECK(pool.workers() == 1);
  CHECK(pool.stats().workers.size() == 1);
  REQUIRE(pool.close().ok());
  CHECK(pool.resize(2).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(pool.join().ok());
}

TEST_CASE("min_workers and idle_timeout out of range are kInvalidArgument naming the field") {
  Files files;
  struct Bad {
    PoolOptions options;
    const char* field;
  };
  for (Bad bad : {Bad{{.workers = 2, .min_workers = 3}, "min_workers"},
                  Bad{{.workers = 2, .min_workers = -1}, "min_workers"},
                  Bad{{.workers = 2, .idle_timeout = absl::ZeroDuration()}, "idle_timeout"},
                  Bad{{.workers = 2, .idle_timeout = -absl::Seconds(1)}, "idle_timeout"}}) {
    CAPTURE(bad.field);
    ProcessPool<Recorder> pool(quiet(bad.options));
    const absl::StatusOr<int64_t> result = pool.apply(1);
    CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(result.status().message(), bad.field));
    CHECK(pool.resize(3).code() == absl::StatusCode::kInvalidArgument);
  }
  ProcessPool<Recorder> fine(quiet({.workers = 2, .min_workers = 2, .idle_timeout = absl::Hours(1)}));
  CHECK(fine.apply(2).value_or(-1) == 6);
}

TEST_CASE("growing during a map: the new workers run enter() and take tasks; every result is "
          "right; join runs every exit()") {
  Files files;
  const std::vector<int64_t> jobs = iota(kGated, 40);
  {
    ProcessPool<Recorder> pool(quiet({.workers = 2}));
    auto mapped = pool.map_async(jobs, {.chunksize = 1});
    // Both workers hold a task that waits for the gate; the rest wait in the queue.
    REQUIRE(wait_until([&] { return files.running_pids().size() == 2; }, kPatience));
    REQUIRE(pool.resize(4).ok());
    CHECK(pool.workers() == 4);
    CHECK(pool.stats().workers.size() == 4);  // at once
    // The new workers start and take queued tasks while the first two still wait.
    CHECK(wait_until([&] { return files.running_pids().size() == 4; }, kPatience));
    files.open_gate();
    check_tripled(mapped.get(), jobs);
    check_once_each(files, jobs);
    // Every worker that ran a task ran enter() first.
    const std::map<pid_t, int> enters = files.hooks("enter");
    for (pid_t pid : files.running_pids()) CHECK(enters.count(pid) == 1);
    CHECK(serving(pool.stats()) == 4);
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
  }
  CHECK(files.count("enter") == 4);
  CHECK(files.hooks("exit") == files.hooks("enter"));
}

TEST_CASE("shrinking during a map: busy workers finish their task, give back the rest, run exit() "
          "and are not replaced; no task is lost, failed or run twice") {
  Files files;
  const std::vector<int64_t> jobs = iota(kGated, 60);
  {
    ProcessPool<Recorder> pool(quiet({.workers = 4}));
    // Chunks of several tasks: each worker holds tasks it has not started behind the one it runs.
    auto mapped = pool.map_async(jobs, {.chunksize = 4});
    REQUIRE(wait_until([&] { return files.running_pids().size() == 4; }, kPatience));
    REQUIRE(pool.resize(2).ok());
    CHECK(pool.workers() == 2);
    CHECK(pool.stats().workers.size() == 2);  // at once, though two still run a task
    files.open_gate();
    check_tripled(mapped.get(), jobs);
    check_once_each(files, jobs);
    // The two retired workers ran exit() and left; nothing replaced them.
    CHECK(wait_until([&] { return files.count("exit") == 2; }, kPatience));
    for (const auto& exited : files.hooks("exit")) {
      const pid_t pid = exited.first;  // (clang 14 captures no structured binding)
      CHECK(wait_until([&] { return !testing::process_exists(pid); }, kPatience));
    }
    const PoolStats stats = pool.stats();
    CHECK(stats.workers.size() == 2);
    CHECK(stats.workers_restarted == 0);
    CHECK(stats.tasks_failed == 0);
    CHECK(files.count("enter") == 4);
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
  }
  CHECK(files.count("enter") == 4);
  CHECK(files.count("exit") == 4);
  CHECK(files.hooks("exit") == files.hooks("enter"));
}

TEST_CASE("shrinking retires idle workers first, at once; busy ones keep their task") {
  Files files;
  ProcessPool<Recorder> pool(quiet({.workers = 4}));
  REQUIRE(wait_until([&] { return serving(pool.stats()) == 4; }, kPatience));
  const std::vector<int64_t> jobs = {kGated, kGated + 1};
  auto mapped = pool.map_async(jobs, {.chunksize = 1});
  REQUIRE(wait_until([&] { return files.running_pids().size() == 2; }, kPatience));
  REQUIRE(pool.resize(2).ok());
  // The two idle ones leave while the busy ones still wait for the gate.
  CHECK(wait_until([&] { return files.count("exit") == 2; }, kPatience));
  for (const auto& [pid, times] : files.hooks("exit")) CHECK(files.running_pids().count(pid) == 0);
  const PoolStats stats = pool.stats();
  REQUIRE(stats.workers.size() == 2);
  for (const WorkerStats& worker : stats.workers) CHECK(worker.state == WorkerState::kBusy);
  files.open_gate();
  check_tripled(mapped.get(), jobs);
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK_MESSAGE(files.count("exit") == 4, absl::StrJoin(testing::read_lines(g_events), "; "));
}

TEST_CASE("a worker that dies in a retired slot is not replaced; its task fails as any other") {
  testing::DefaultCrashHandlers default_handlers;
  Files files;
  ProcessPool<Recorder> pool(quiet({.workers = 2}));
  REQUIRE(wait_until([&] { return serving(pool.stats()) == 2; }, kPatience));
  auto mapped = pool.map_async(std::vector<int64_t>{kGated, kGated + 1}, {.chunksize = 1});
  REQUIRE(wait_until([&] { return files.running_pids().size() == 2; }, kPatience));
  REQUIRE(pool.resize(1).ok());
  // Both busy: one of them is retired. Both die in their task.
  for (pid_t pid : files.running_pids()) ::kill(pid, SIGKILL);
  const absl::StatusOr<std::vector<int64_t>> result = mapped.get();
  CHECK(result.status().code() == absl::StatusCode::kAborted);
  // The kept slot gets a replacement; the retired one none.
  CHECK(wait_until([&] { return files.count("enter") == 3 && serving(pool.stats()) == 1; },
                   kPatience));
  absl::SleepFor(absl::Milliseconds(300));  // time for a wrong restart to show
  CHECK(files.count("enter") == 3);
  CHECK(pool.stats().workers.size() == 1);
  CHECK(pool.apply(5).value_or(-1) == 15);
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(files.count("enter") == 3);
}

TEST_CASE("resize from a result callback and from another thread while maps run: every task "
          "runs once with the right result") {
  Files files;
  const std::vector<int64_t> jobs = iota(0, 400);
  {
    ProcessPool<Recorder> pool(quiet({.workers = 2}));
    std::atomic<int> callbacks{0};
    std::vector<AsyncResult<int64_t>> applies;
    for (int i = 0; i < 6; ++i) {
      // Callbacks run on the pool's callback thread: resize from there must not deadlock.
      applies.push_back(pool.apply_async(
          500 + i, {},
          Callbacks<int64_t>{.on_success =
                                 [&pool, &callbacks, i](const int64_t&) {
                                   CHECK(pool.resize(1 + i % 4).ok());
                                   ++callbacks;
                                 }}));
    }
    std::atomic<bool> stop{false};
    std::thread resizer([&] {
      for (int i = 0; !stop; ++i) {
        CHECK(pool.resize(1 + (i * 7) % 5).ok());
        absl::SleepFor(absl::Milliseconds(3));
      }
    });
    auto first = pool.map(std::vector<int64_t>(jobs.begin(), jobs.begin() + 200), {.chunksize = 3});
    auto second = pool.map(std::vector<int64_t>(jobs.begin() + 200, jobs.end()), {.chunksize = 1});
    stop = true;
    resizer.join();
    check_tripled(first, std::vector<int64_t>(jobs.begin(), jobs.begin() + 200));
    check_tripled(second, std::vector<int64_t>(jobs.begin() + 200, jobs.end()));
    for (auto& result : applies) CHECK(result.get().ok());
    CHECK(wait_until([&] { return callbacks == 6; }, kPatience));
    const PoolStats stats = pool.stats();
    CHECK(static_cast<int>(stats.workers.size()) == pool.workers());
    CHECK(stats.tasks_failed == 0);
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
  }
  std::map<int64_t, int> runs = files.runs();
  for (int64_t job : jobs) {
    CAPTURE(job);
    CHECK(runs[job] == 1);
  }
  // Every worker started ran exit() once, however often its slot was retired and taken back.
  CHECK(files.count("enter") >= 2);
  CHECK(files.hooks("exit") == files.hooks("enter"));
}

TEST_CASE("idle_timeout: idle workers run exit() and leave down to min_workers; work brings them "
          "back as it needs them") {
  Files files;
  {
    ProcessPool<Recorder> pool(
        quiet({.workers = 3, .min_workers = 1, .idle_timeout = absl::Milliseconds(200)}));
    CHECK(pool.apply(1).value_or(-1) == 3);
    // Two leave; one stays however long it idles.
    REQUIRE(wait_until([&] { return files.count("exit") == 2; }, kPatience));
    CHECK(pool.workers() == 3);  // the pool's size is unchanged
    PoolStats stats = pool.stats();
    REQUIRE(stats.workers.size() == 3);
    CHECK(serving(stats) == 1);
    absl::SleepFor(absl::Milliseconds(500));
    CHECK(files.count("exit") == 2);
    CHECK(serving(pool.stats()) == 1);
    // Three tasks that wait: all three workers are needed again.
    const std::vector<int64_t> jobs = {kGated, kGated + 1, kGated + 2};
    auto mapped = pool.map_async(jobs, {.chunksize = 1});
    CHECK(wait_until([&] { return files.gated_pids().size() == 3; }, kPatience));
    files.open_gate();
    check_tripled(mapped.get(), jobs);
    CHECK(files.count("enter") == 5);
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
  }
  CHECK(files.count("enter") == 5);
  CHECK(files.hooks("exit") == files.hooks("enter"));
}

TEST_CASE("idle_timeout with min_workers 0: every worker leaves; one task starts one worker, "
          "also while the last ones still run exit()") {
  Files files;
  g_exit_takes = absl::Milliseconds(300);
  ProcessPool<Recorder> pool(quiet({.workers = 3, .idle_timeout = absl::Milliseconds(100)}));
  REQUIRE(wait_until([&] { return files.count("enter") == 3; }, kPatience));
  // Asked while every worker is still in its exit(): one of them is followed by a new one.
  REQUIRE(wait_until([&] { return files.count("exit") == 3; }, kPatience));
  CHECK(serving(pool.stats()) == 0);
  CHECK(pool.apply(7).value_or(-1) == 21);
  CHECK(files.count("enter") == 4);
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK_MESSAGE(files.count("exit") == 4, absl::StrJoin(testing::read_lines(g_events), "; "));
}

TEST_CASE("a Pool of functions resizes too") {
  Pool pool(quiet({.workers = 1}));
  REQUIRE(pool.resize(3).ok());
  CHECK(pool.workers() == 3);
  auto tripled = pool.map(+[](const int64_t& x) { return x * 3; }, iota(0, 50));
  check_tripled(tripled, iota(0, 50));
  REQUIRE(pool.resize(1).ok());
  CHECK(pool.stats().workers.size() == 1);
  CHECK(pool.apply(+[](const int64_t& x) { return x + 1; }, int64_t{4}).value_or(-1) == 5);
}

// A remote pool over loopback: growing launches the worker program for the new slots; shrinking
// has the retired workers run exit() on their hosts.
std::string remote_worker_program() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr) {
    std::string path = absl::StrCat(srcdir, "/", workspace ? workspace : "procpool",
                                    "/tests/remote_worker_helper");
    if (testing::file_exists(path)) return path;
  }
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "remote_worker_helper")
      .string();
}

TEST_CASE("a remote pool grows by launching workers and shrinks with exit() on their hosts") {
  TempDir dir;
  const std::string events = dir.file("events");
  ::setenv("REMOTE_EVENTS", events.c_str(), 1);
  const auto count = [&](const std::string& what) {
    int n = 0;
    for (const std::string& line : testing::read_lines(events)) n += absl::StartsWith(line, what + " ");
    return n;
  };
  {
    ProcessPool<testing::RemoteWorker> pool(quiet(
        {.workers = 1,
         .remote = RemoteOptions{
             .launch = {remote_worker_program(), "--procpool-connect={address}"},
             .connect_timeout = absl::Seconds(30)}}));
    CHECK(pool.apply(3).value_or(-1) == 9);
    REQUIRE(pool.resize(3).ok());
    CHECK(pool.stats().workers.size() == 3);
    REQUIRE(wait_until([&] { return serving(pool.stats()) == 3; }, kPatience));
    CHECK(count("enter") == 3);
    std::vector<int64_t> jobs = iota(0, 200);
    auto squares = pool.map(jobs);
    REQUIRE_MESSAGE(squares.ok(), squares.status());
    for (int64_t i = 0; i < 200; ++i) CHECK((*squares)[i] == i * i);
    REQUIRE(pool.resize(1).ok());
    CHECK(pool.stats().workers.size() == 1);
    CHECK(wait_until([&] { return count("exit") == 2; }, kPatience));
    CHECK(pool.apply(4).value_or(-1) == 16);
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
  }
  ::unsetenv("REMOTE_EVENTS");
  CHECK(count("enter") == 3);
  CHECK(count("exit") == 3);
}

TEST_CASE("a remote slot retired while it waits for a worker host ends at once, without a warning "
          "or a start failure") {
  std::mutex mu;
  std::vector<LogEvent> errors;
  // A launch command whose worker never dials in: every slot waits for a host.
  ProcessPool<testing::RemoteWorker> pool(
      {.workers = 1,
       .log_sink =
           [&](const LogEvent& event) {
             std::lock_guard lock(mu);
             if (event.severity != LogSeverity::kInfo) errors.push_back(event);
           },
       .remote = RemoteOptions{.launch = {"sleep", "30"},
                               .connect_timeout = absl::Milliseconds(1500)}});
  REQUIRE(pool.resize(2).ok());
  // Its command launched, slot 1 waits for its host.
  REQUIRE(wait_until(
      [&] {
        const PoolStats stats = pool.stats();
        return stats.workers.size() == 2 && stats.workers[1].state == WorkerState::kStarting;
      },
      kPatience));
  REQUIRE(pool.resize(1).ok());
  CHECK(pool.stats().workers.size() == 1);
  // Slot 0's wait ends in a start failure at connect_timeout; slot 1's ended at the resize, as
  // deliberately as a terminate() (not at connect_timeout, as a worker that did not come).
  CHECK(wait_until(
      [&] {
        std::lock_guard lock(mu);
        return !errors.empty();
      },
      kPatience));
  absl::SleepFor(absl::Milliseconds(500));
  std::vector<LogEvent> seen;
  {
    std::lock_guard lock(mu);
    seen = errors;
  }
  for (const LogEvent& event : seen) {
    CAPTURE(event.message);
    CHECK(event.worker != 1);
  }
  pool.terminate();
}

}  // namespace
}  // namespace procpool
