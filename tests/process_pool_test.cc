// Behaviour of ProcessPool<W> that a user relies on, with real forked workers.

#include "procpool/process_pool.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/capnp_struct.h"
#include "tests/codec_test.capnp.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::TempDir;

// Records every hook and task in a shared event file: "enter <pid>", "run <pid> <job>",
// "exit <pid>". Jobs that are negative misbehave: -1 throws, -2 returns an error status,
// -9 SIGKILLs its own worker.
struct RecordingWorker {
  using Job = int64_t;
  using Result = int64_t;

  explicit RecordingWorker(std::string log) : log_(std::move(log)) {}

  void enter() { testing::append_line(log_, absl::StrCat("enter ", getpid())); }

  absl::StatusOr<int64_t> run(int64_t job) {
    testing::append_line(log_, absl::StrCat("run ", getpid(), " ", job));
    if (job == -1) throw std::runtime_error("job -1 is not allowed");
    if (job == -2) return absl::NotFoundError("no such job");
    if (job == -9) ::raise(SIGKILL);
    return job * job;
  }

  void exit() { testing::append_line(log_, absl::StrCat("exit ", getpid())); }

  std::string log_;
};

struct Event {
  std::string kind;
  pid_t pid;
  int64_t job = 0;
};

std::vector<Event> read_events(const std::string& path) {
  std::vector<Event> events;
  for (const std::string& line : testing::read_lines(path)) {
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    Event event;
    event.kind = parts[0];
    CHECK(absl::SimpleAtoi(parts[1], &event.pid));
    if (parts.size() > 2) CHECK(absl::SimpleAtoi(parts[2], &event.job));
    events.push_back(event);
  }
  return events;
}

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return testing::on_link(std::move(options));
}

TEST_CASE("map runs every job exactly once, in order, between one enter and one exit per worker") {
  PROCPOOL_LOCAL_ONLY("RecordingWorker is built by a factory, which a remote program cannot run");
  TempDir dir;
  const std::string log = dir.file("events");
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 1000; ++i) jobs.push_back(i);

  {
    ProcessPool<RecordingWorker> pool(quiet({.workers = 3}), [log] { return RecordingWorker(log); });
    CHECK(pool.workers() == 3);
    absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
    REQUIRE(squares.ok());
    REQUIRE(squares->size() == jobs.size());
    for (size_t i = 0; i < jobs.size(); ++i) CHECK((*squares)[i] == jobs[i] * jobs[i]);
    // A second call reuses the same processes.
    absl::StatusOr<std::vector<int64_t>> again = pool.map(jobs, {.chunksize = 1});
    REQUIRE(again.ok());
    CHECK(*again == *squares);
  }
  std::map<pid_t, std::vector<Event>> by_pid;
  std::map<int64_t, int> runs_per_job;
  for (const Event& event : read_events(log)) {
    by_pid[event.pid].push_back(event);
    if (event.kind == "run") ++runs_per_job[event.job];
  }
  CHECK(by_pid.size() == 3);
  for (const auto& [pid, events] : by_pid) {
    const auto worker_pid = pid;  // clang before 16 cannot capture a structured binding
    CAPTURE(worker_pid);
    REQUIRE(events.size() >= 2);
    CHECK(events.front().kind == "enter");
    CHECK(events.back().kind == "exit");
    CHECK(std::count_if(events.begin(), events.end(), [](const Event& e) { return e.kind == "enter"; }) == 1);
    CHECK(std::count_if(events.begin(), events.end(), [](const Event& e) { return e.kind == "exit"; }) == 1);
  }
  REQUIRE(runs_per_job.size() == jobs.size());
  for (const auto& [job, runs] : runs_per_job) CHECK(runs == 2);  // once per map call
  CHECK(testing::worker_children().empty());
}

struct Squarer {
  int64_t run(int64_t x) { return x * x; }  // Job and Result deduced
};

TEST_CASE("a default-constructed worker with deduced types, and an empty map") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  static_assert(std::is_same_v<ProcessPool<Squarer>::Job, int64_t>);
  absl::StatusOr<std::vector<int64_t>> none = pool.map({});
  REQUIRE(none.ok());
  CHECK(none->empty());
  std::vector<int64_t> jobs = {3, 4};
  CHECK(*pool.map(jobs) == std::vector<int64_t>{9, 16});
}

TEST_CASE("workers=0 means one per CPU") {
  PROCPOOL_LOCAL_ONLY("remote pools must name their number of workers");
  ProcessPool<Squarer> pool(quiet({}));
  CHECK(pool.workers() >= 1);
  CHECK(static_cast<long>(pool.workers()) <= sysconf(_SC_NPROCESSORS_ONLN));
}

TEST_CASE("an exception thrown by run becomes that task's status and the worker carries on") {
  PROCPOOL_LOCAL_ONLY("RecordingWorker is built by a factory");
  TempDir dir;
  ProcessPool<RecordingWorker> pool(quiet({.workers = 2}),
                                    [log = dir.file("events")] { return RecordingWorker(log); });
  std::vector<int64_t> jobs = {1, 2, -1, 4, -1};
  absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs, {.chunksize = 1});
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kUnknown);
  const std::string message(result.status().message());
  CHECK(message.find("job 2") != std::string::npos);
  CHECK(message.find("std::runtime_error") != std::string::npos);
  CHECK(message.find("job -1 is not allowed") != std::string::npos);

  SUBCASE("an error status returned by run keeps its code") {
    std::vector<int64_t> more = {5, -2};
    absl::StatusOr<std::vector<int64_t>> failed = pool.map(more);
    CHECK(failed.status().code() == absl::StatusCode::kNotFound);
    CHECK(std::string(failed.status().message()) == "job 1: no such job");
  }
  SUBCASE("the same processes keep serving") {
    // map returns at its first failure, possibly before the second worker has entered: wait for
    // both enter() events rather than race them.
    std::set<pid_t> before;
    CHECK(testing::wait_until([&] {
      before.clear();
      for (const Event& e : read_events(dir.file("events"))) {
        if (e.kind == "enter") before.insert(e.pid);
      }
      return before.size() == 2;
    }));
    std::vector<int64_t> ok = {6, 7, 8};
    CHECK(*pool.map(ok) == std::vector<int64_t>{36, 49, 64});
    std::set<pid_t> after;
    for (const Event& e : read_events(dir.file("events"))) after.insert(e.pid);
    CHECK(after == before);
  }
}

struct FailingEnter {
  absl::Status enter() { return absl::UnavailableError("database is down"); }
  int64_t run(int64_t x) { return x; }
};

struct ThrowingEnter {
  void enter() { throw std::logic_error("cannot open config"); }
  int64_t run(int64_t x) { return x; }
};

TEST_CASE("a failing enter() is a clear error on the next call, naming the worker") {
  std::vector<int64_t> jobs = {1, 2, 3};
  SUBCASE("enter returns an error") {
    ProcessPool<FailingEnter> pool(quiet({.workers = 2}));
    absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs);
    REQUIRE_FALSE(result.ok());
    CHECK(result.status().code() == absl::StatusCode::kUnavailable);
    const std::string message(result.status().message());
    CHECK(message.find("failed enter()") != std::string::npos);
    CHECK(message.find("worker ") != std::string::npos);
    CHECK(message.find("pid ") != std::string::npos);
    CHECK(message.find("database is down") != std::string::npos);
    // Later calls keep saying so, at once; the pool retries with growing delays (the crash
    // guard), never in a loop.
    CHECK(pool.map(jobs).status().code() == absl::StatusCode::kUnavailable);
    CHECK(pool.stats().workers_restarted <= 4);
  }
  SUBCASE("enter throws") {
    ProcessPool<ThrowingEnter> pool(quiet({.workers = 1}));
    absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs);
    REQUIRE_FALSE(result.ok());
    CHECK(std::string(result.status().message()).find("cannot open config") != std::string::npos);
    CHECK(std::string(result.status().message()).find("std::logic_error") != std::string::npos);
  }
  CHECK(testing::worker_children().empty());
}

// A worker whose enter() failed never ran exit(): join has nothing of it to report, however soon
// after the failure it comes (the worker is still exiting then, with its start failure's status).
template <typename W>
void join_after_failed_enter(absl::StatusCode apply_fails_with) {
  for (int round = 0; round < 3; ++round) {
    ProcessPool<W> pool(quiet({.workers = 1}));
    CHECK(pool.apply(1).status().code() == apply_fails_with);
    REQUIRE(pool.close().ok());
    const absl::Status joined = pool.join();
    CHECK_MESSAGE(joined.ok(), joined.ToString());
  }
}

TEST_CASE("join right after a failed enter() reports no death during exit()") {
  SUBCASE("enter returns an error") {
    join_after_failed_enter<FailingEnter>(absl::StatusCode::kUnavailable);
  }
  SUBCASE("enter throws") { join_after_failed_enter<ThrowingEnter>(absl::StatusCode::kUnknown); }
  CHECK(testing::wait_until([] { return testing::worker_children().empty(); }));
}

struct HangingEnter {
  void enter() {
    while (true) pause();
  }
  int64_t run(int64_t x) { return x; }
};

TEST_CASE("an enter() that hangs is killed at enter_timeout; calls fail instead of waiting") {
  ProcessPool<HangingEnter> pool(quiet({.workers = 2,
                                        .enter_timeout = absl::Milliseconds(200),
                                        .kill_grace = absl::Milliseconds(100)}));
  std::vector<int64_t> jobs = {1, 2};
  absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs);
  CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(std::string(result.status().message()).find("enter_timeout") != std::string::npos);
  CHECK(pool.map(jobs).status().code() == absl::StatusCode::kDeadlineExceeded);
}

struct SlowExit {
  explicit SlowExit(std::string marker) : marker_(std::move(marker)) {}
  int64_t run(int64_t x) { return x; }
  void exit() {
    absl::SleepFor(absl::Milliseconds(300));
    testing::append_line(absl::StrCat(marker_, ".", getpid()), "flushed");
  }
  std::string marker_;
};

TEST_CASE("a slow exit() has finished when the pool's scope ends") {
  PROCPOOL_LOCAL_ONLY("SlowExit is built by a factory");
  TempDir dir;
  const std::string marker = dir.file("exit");
  std::vector<pid_t> pids;
  {
    ProcessPool<SlowExit> pool(quiet({.workers = 2}), [marker] { return SlowExit(marker); });
    for (const WorkerStats& worker : pool.stats().workers) pids.push_back(worker.pid);
    std::vector<int64_t> jobs = {1, 2, 3, 4};
    REQUIRE(pool.map(jobs).ok());
  }
  REQUIRE(pids.size() == 2);
  for (pid_t pid : pids) {
    CAPTURE(pid);
    CHECK(testing::read_lines(absl::StrCat(marker, ".", pid)) == std::vector<std::string>{"flushed"});
    CHECK_FALSE(testing::process_exists(pid));
  }
}

struct HangingExit {
  int64_t run(int64_t x) { return x; }
  void exit() {
    while (true) pause();
  }
};

TEST_CASE("a hanging exit() is killed at join_timeout and reported") {
  ProcessPool<HangingExit> pool(quiet({.workers = 2,
                                       .join_timeout = absl::Milliseconds(300),
                                       .kill_grace = absl::Milliseconds(200)}));
  std::vector<int64_t> jobs = {1, 2};
  REQUIRE(pool.map(jobs).ok());
  // Both serve, so both have an exit() to hang in (a remote worker still dialling in at join is
  // ended unstarted).
  REQUIRE(testing::wait_until([&] { return testing::all_serving(pool.stats()); },
                              absl::Seconds(30)));
  REQUIRE(pool.close().ok());
  const absl::Time start = absl::Now();
  absl::Status joined = pool.join();
  const absl::Duration took = absl::Now() - start;
  CHECK(joined.code() == absl::StatusCode::kDeadlineExceeded);
  const std::string message(joined.message());
  CHECK(message.find("worker 0") != std::string::npos);
  CHECK(message.find("worker 1") != std::string::npos);
  CHECK(message.find("join_timeout") != std::string::npos);
  CHECK(took >= absl::Milliseconds(300));
  CHECK(took < absl::Seconds(5));
  CHECK(testing::worker_children().empty());
}

TEST_CASE("a failed shutdown is logged once: by the destructor when nobody joined, not when join() returned it") {
  for (const bool joined_by_caller : {false, true}) {
    CAPTURE(joined_by_caller);
    std::mutex mu;
    int join_errors = 0;
    {
      PoolOptions options = quiet({.workers = 1,
                                   .join_timeout = absl::Milliseconds(200),
                                   .kill_grace = absl::Milliseconds(100)});
      options.log_sink = [&](const LogEvent& event) {
        std::lock_guard lock(mu);
        if (event.severity == LogSeverity::kError && absl::StartsWith(event.message, "join: ")) {
          ++join_errors;
        }
      };
      ProcessPool<HangingExit> pool(options);
      REQUIRE(pool.apply(1).ok());
      REQUIRE(pool.close().ok());
      if (joined_by_caller) CHECK(pool.join().code() == absl::StatusCode::kDeadlineExceeded);
    }
    std::lock_guard lock(mu);
    CHECK(join_errors == (joined_by_caller ? 0 : 1));
  }
}

struct Napper {
  int64_t run(int64_t ms) {
    absl::SleepFor(absl::Milliseconds(ms));
    return ms;
  }
};

TEST_CASE("timeouts of centuries behave as none: tasks finish, exit hooks run, nobody is killed") {
  // A deadline is now + timeout in int64 nanoseconds: one past 292 years must saturate, not wrap
  // into the past (where join_timeout would kill every worker at once).
  PROCPOOL_LOCAL_ONLY("RecordingWorker is built by a factory");
  const absl::Duration centuries = absl::Hours(24 * 365 * 1000);
  TempDir dir;
  const std::string log = dir.file("events");
  {
    ProcessPool<RecordingWorker> pool(quiet({.workers = 2,
                                             .join_timeout = centuries,
                                             .task_timeout = centuries,
                                             .kill_grace = centuries,
                                             .frame_timeout = centuries,
                                             .respawn_max_delay = centuries}),
                                      [log] { return RecordingWorker(log); });
    std::vector<int64_t> jobs = {1, 2, 3, 4};
    absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
    REQUIRE(squares.ok());
    CHECK(*squares == std::vector<int64_t>{1, 4, 9, 16});
    REQUIRE(pool.close().ok());
    absl::Status joined = pool.join();
    CHECK(joined.ok());
    if (!joined.ok()) MESSAGE(joined);
  }
  // Every worker that entered ran its exit() (one still starting at join may be let go unentered).
  int enters = 0;
  int exits = 0;
  for (const Event& event : read_events(log)) {
    enters += event.kind == "enter";
    exits += event.kind == "exit";
  }
  CHECK(exits >= 1);
  CHECK(exits == enters);

  ProcessPool<Napper> nappers(quiet({.workers = 1}));
  absl::StatusOr<int64_t> napped = nappers.apply(300, {.task_timeout = centuries});
  CHECK(napped.ok());
  if (!napped.ok()) MESSAGE(napped.status());
}

struct SigtermProof {
  int64_t run(int64_t x) {
    if (x == 0) ::signal(SIGTERM, SIG_IGN);
    absl::SleepFor(absl::Seconds(60));
    return x;
  }
};

TEST_CASE("terminate() stops workers at once, without exit hooks, and fails their tasks") {
  PROCPOOL_LOCAL_ONLY("it counts the test's child processes");
  TempDir dir;
  const std::string log = dir.file("events");
  auto pool = std::make_unique<ProcessPool<RecordingWorker>>(quiet({.workers = 2}),
                                                             [log] { return RecordingWorker(log); });
  std::vector<int64_t> jobs = {1, 2, 3};
  REQUIRE(pool->map(jobs).ok());
  pool->terminate();
  CHECK(testing::worker_children().empty());
  CHECK(pool->map(jobs).status().code() == absl::StatusCode::kFailedPrecondition);
  pool.reset();  // the destructor after terminate() must not hang or fail
  for (const Event& event : read_events(log)) CHECK(event.kind != "exit");

  SUBCASE("even a worker that ignores SIGTERM, mid-task") {
    ProcessPool<SigtermProof> stubborn(quiet({.workers = 1, .kill_grace = absl::Milliseconds(200)}));
    std::vector<int64_t> long_jobs = {0, 1};
    std::thread user([&] {
      absl::StatusOr<std::vector<int64_t>> result = stubborn.map(long_jobs);
      CHECK(result.status().code() == absl::StatusCode::kCancelled);
    });
    REQUIRE(testing::wait_until([&] { return stubborn.stats().workers[0].state == WorkerState::kBusy; }));
    absl::SleepFor(absl::Milliseconds(50));
    const absl::Time start = absl::Now();
    stubborn.terminate();
    CHECK(absl::Now() - start < absl::Seconds(5));
    user.join();
  }
}

// Its negative jobs never return.
struct Pauser {
  int64_t run(int64_t x) {
    while (x < 0) ::pause();
    return x;
  }
};

TEST_CASE("a worker ended under an apply() that waits on it does not crash the caller") {
  // apply() reads its idle worker's channel on the caller's thread. When the worker ends and no
  // other takes its place, the pool thread drops its link: the caller must not touch it after.
  std::string how;
  SUBCASE("terminate()") { how = "terminate"; }
  SUBCASE("killed while join() waits") { how = "join"; }
  for (int round = 0; round < 10; ++round) {
    CAPTURE(round);
    ProcessPool<Pauser> pool(quiet({.workers = 1}));
    REQUIRE(pool.apply(1).ok());  // a ready worker: the next apply borrows it
    absl::StatusOr<int64_t> got;
    std::thread caller([&] { got = pool.apply(-1); });
    REQUIRE(testing::wait_until([&] { return pool.stats().workers[0].state == WorkerState::kBusy; }));
    if (how == "terminate") {
      pool.terminate();
      caller.join();
      CHECK(got.status().code() == absl::StatusCode::kCancelled);
    } else {
      const pid_t pid = pool.stats().workers[0].pid;
      REQUIRE(pool.close().ok());
      std::thread joiner([&] { (void)pool.join(); });
      absl::SleepFor(absl::Milliseconds(20));
      REQUIRE(::kill(pid, SIGKILL) == 0);
      caller.join();
      joiner.join();
      CHECK(got.status().code() == absl::StatusCode::kAborted);
    }
  }
}

TEST_CASE("every call after close() is kFailedPrecondition; join() needs close() first") {
  ProcessPool<Squarer> pool(quiet({.workers = 1}));
  CHECK(pool.join().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(pool.close().ok());
  CHECK(pool.close().ok());  // idempotent
  std::vector<int64_t> jobs = {1};
  absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs);
  CHECK(result.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(pool.join().ok());
  CHECK(pool.join().ok());  // idempotent
  CHECK(testing::worker_children().empty());
}

TEST_CASE("no child process is left after the pool is destroyed") {
  PROCPOOL_LOCAL_ONLY("it counts the test's child processes");
  std::vector<pid_t> pids;
  {
    ProcessPool<Squarer> pool(quiet({.workers = 3}));
    std::vector<int64_t> jobs(100, 7);
    REQUIRE(pool.map(jobs).ok());
    // A worker names itself just after fork: wait for the names rather than race them.
    CHECK(testing::wait_until([&] { return testing::worker_children().size() == 3; }));
    pids = testing::worker_children();
  }
  CHECK(testing::worker_children().empty());
  for (pid_t pid : pids) CHECK_FALSE(testing::process_exists(pid));
}

// Lists the worker's open descriptors; its eventfd (which wakes it for what other threads log,
// lib/worker/task_server.h: post) as -1.
struct FdLister {
  std::vector<int64_t> run(int64_t) {
    std::vector<int64_t> fds;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
      std::error_code error;
      const std::string target = std::filesystem::read_symlink(entry.path(), error).string();
      fds.push_back(target == "anon_inode:[eventfd]" ? -1
                                                     : std::stoll(entry.path().filename().string()));
    }
    std::sort(fds.begin(), fds.end());
    return fds;
  }
};

TEST_CASE("a worker holds only stdin, stdout, stderr and its channel; the parent's fds are CLOEXEC") {
  PROCPOOL_LOCAL_ONLY("it inspects descriptors inherited by fork");
  // Descriptors of the parent's that a worker must not inherit.
  int leaked[2];
  REQUIRE(::pipe(leaked) == 0);
  // What this process had open before the pool: the pipe, and whatever the test runner passed
  // down (ctest under make or ninja does: the jobserver's fds). Only the pool's are checked below.
  std::set<int> before;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    before.insert(std::stoi(entry.path().filename().string()));
  }
  std::erase_if(before, [](int fd) { return ::fcntl(fd, F_GETFD) < 0; });  // the listing's own
  {
    ProcessPool<FdLister> pool(quiet({.workers = 2}));
    absl::StatusOr<std::vector<std::vector<int64_t>>> lists = pool.map(std::vector<int64_t>{0, 1});
    REQUIRE(lists.ok());
    for (const std::vector<int64_t>& fds : *lists) {
      // 0-2, the channel (3), its own eventfd (-1, made after the others: 4) and the directory
      // being listed (the lowest free number, 5): the pipe above, the other worker's channel and
      // the pool's own descriptors are all closed.
      CHECK(fds == std::vector<int64_t>{-1, 0, 1, 2, 3, 5});
    }
    // Every descriptor the pool opened in this process is close-on-exec.
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
      const int fd = std::stoi(entry.path().filename().string());
      if (fd <= 2 || before.contains(fd)) continue;
      const int flags = ::fcntl(fd, F_GETFD);
      if (flags < 0) continue;  // the directory iterator's own, already closed
      CAPTURE(fd);
      CHECK((flags & FD_CLOEXEC) != 0);
    }
  }
  ::close(leaked[0]);
  ::close(leaked[1]);
}

struct Namer {
  std::string run(int64_t) {
    char name[32] = {};
    prctl(PR_GET_NAME, name, 0, 0, 0);
    return name;
  }
};

TEST_CASE("workers name themselves so ps and htop show them") {
  PROCPOOL_LOCAL_ONLY("it reads the names of the test's child processes");
  ProcessPool<Namer> pool(quiet({.workers = 2, .name = "indexer"}));
  std::vector<int64_t> jobs(20, 0);
  absl::StatusOr<std::vector<std::string>> names = pool.map(jobs, {.chunksize = 1});
  REQUIRE(names.ok());
  std::set<std::string> distinct(names->begin(), names->end());
  for (const std::string& name : distinct) CHECK((name == "indexer-w0" || name == "indexer-w1"));
}

// Echoes any value: every built-in codec type makes the round trip through a real worker.
template <typename T>
struct Echo {
  using Job = T;
  using Result = T;
  T run(const T& value) { return value; }
};

template <typename T>
void check_round_trip(const std::vector<T>& values) {
  ProcessPool<Echo<T>> pool(quiet({.workers = 1}));
  absl::StatusOr<std::vector<T>> echoed = pool.map(values);
  REQUIRE(echoed.ok());
  CHECK(*echoed == values);
}

TEST_CASE("every built-in codec type crosses the process boundary") {
  check_round_trip<int8_t>({-128, 0, 127});
  check_round_trip<uint64_t>({0, UINT64_MAX});
  check_round_trip<int64_t>({INT64_MIN, INT64_MAX});
  check_round_trip<double>({0.5, -1e300});
  check_round_trip<std::tuple<bool, bool>>({{true, false}});  // vector<bool> is no Span
  check_round_trip<std::string>({"", std::string("bin\0ary", 7), std::string(100000, 'x')});
  check_round_trip<std::vector<int32_t>>({{}, {1, -2, 3}});
  check_round_trip<std::vector<std::string>>({{"a", "b"}});
  check_round_trip<std::pair<int, std::string>>({{1, "one"}});
  check_round_trip<std::tuple<int, double, std::string>>({{1, 2.5, "three"}});
  check_round_trip<std::optional<int>>({std::nullopt, 5});
  check_round_trip<std::map<std::string, std::vector<double>>>({{{"a", {1.0}}, {"b", {}}}});
}

struct DocumentTitler {
  using Job = CapnpStruct<testing::Document>;
  using Result = std::string;
  std::string run(const Job& document) {
    auto reader = document.reader();
    return absl::StrCat(reader.getId(), ":", reader.getTitle().cStr(), ":", reader.getTags().size());
  }
};

TEST_CASE("a user's Cap'n Proto struct as Job") {
  std::vector<CapnpStruct<testing::Document>> documents;
  for (uint64_t i = 0; i < 5; ++i) {
    documents.push_back(CapnpStruct<testing::Document>::build([i](testing::Document::Builder b) {
      b.setId(i);
      b.setTitle(absl::StrCat("doc", i));
      b.initTags(static_cast<unsigned>(i));
    }));
  }
  ProcessPool<DocumentTitler> pool(quiet({.workers = 2}));
  absl::StatusOr<std::vector<std::string>> titles = pool.map(documents);
  REQUIRE(titles.ok());
  CHECK(*titles == std::vector<std::string>{"0:doc0:0", "1:doc1:1", "2:doc2:2", "3:doc3:3", "4:doc4:4"});
}

TEST_CASE("a worker killed with SIGKILL mid-map does not hang map; the pool carries on") {
  PROCPOOL_LOCAL_ONLY("RecordingWorker is built by a factory");
  TempDir dir;
  const std::string log = dir.file("events");
  ProcessPool<RecordingWorker> pool(quiet({.workers = 2}), [log] { return RecordingWorker(log); });
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 50; ++i) jobs.push_back(i == 20 ? -9 : i);
  absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs, {.chunksize = 5});
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kAborted);
  const std::string message(result.status().message());
  CHECK(message.find("job 20") != std::string::npos);
  CHECK(message.find("pid ") != std::string::npos);
  CHECK(message.find("signal 9") != std::string::npos);
  // Tasks that never started were handed to another worker: every other job ran exactly once.
  std::map<int64_t, int> runs;
  for (const Event& e : read_events(log)) {
    if (e.kind == "run") ++runs[e.job];
  }
  for (int64_t i = 0; i < 50; ++i) {
    if (i != 20) CHECK(runs[i] == 1);
  }
  // The dead worker was replaced: the pool still has two and serves the next call.
  std::vector<int64_t> more = {2, 3};
  CHECK(*pool.map(more) == std::vector<int64_t>{4, 9});
  CHECK(pool.stats().workers_restarted == 1);
  CHECK(testing::wait_until([] { return testing::worker_children().size() == 2; }));
}

}  // namespace
}  // namespace procpool
