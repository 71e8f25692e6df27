// Fault semantics a user can trust (issue 8): every failure is charged to its cause and nothing is
// misreported. Each TEST_CASE is one numbered behaviour of the issue, shown with real processes,
// real signals and real kills; every wait has a deadline (fault_support.h).

#include "procpool/process_pool.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "lib/fault_injection.h"
#include "procpool/pool.h"
#include "tests/fault_support.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::LogCapture;
using testing::OutcomePool;
using testing::TempDir;
using testing::map_within;
using testing::wait_until;
using testing::message_has;
using testing::write_all;

constexpr int kWorkerChannelFd = 3;

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return options;
}

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;

// Job codes: >= 0 returns its square; the others misbehave.
constexpr int64_t kAbort = -6;
constexpr int64_t kSegv = -11;
constexpr int64_t kKill = -9;

struct Crasher {
  int64_t run(int64_t job) {
    if (job == kAbort) std::abort();
    if (job == kSegv) ::raise(SIGSEGV);
    if (job == kKill) ::raise(SIGKILL);
    return job * job;
  }
};

using testing::all_idle;
using testing::all_serving;

// =============================================================================================
// 1. A task that kills its worker is that task's failure, never the pool's.

TEST_CASE("1,000 jobs that each crash their worker give 1,000 kAborted outcomes; the pool carries on") {
  // Each worker dies of its own signal, without doctest's crash report in its log.
  testing::DefaultCrashHandlers default_handlers;
  OutcomePool<Crasher> pool(quiet({.workers = 2}), [] { return std::make_unique<Crasher>(); });
  std::vector<int64_t> jobs;
  for (int i = 0; i < 1000; ++i) jobs.push_back(i % 2 == 0 ? kAbort : kSegv);
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  // About 16 ms of CPU per crash and fresh worker here; a deadline for a machine loaded 10x over.
  REQUIRE((*call)->wait(absl::Seconds(300)));
  size_t aborted = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    const absl::Status status = (*call)->outcome(i).status();
    if (status.code() == absl::StatusCode::kAborted) ++aborted;
    CHECK(status.code() == absl::StatusCode::kAborted);
    CHECK(message_has(status, jobs[i] == kAbort ? "SIGABRT" : "SIGSEGV"));
    if (!status.ok() && status.code() != absl::StatusCode::kAborted) MESSAGE(status);
  }
  CHECK(aborted == jobs.size());
  // The next map of good jobs succeeds.
  auto good = pool.submit({1, 2, 3, 4, 5}, {.chunksize = 1});
  REQUIRE(good.ok());
  REQUIRE((*good)->wait(absl::Seconds(10)));
  for (size_t i = 0; i < 5; ++i) CHECK((*good)->outcome(i).value_or(-1) == int64_t(i + 1) * int64_t(i + 1));
}

TEST_CASE("killing idle workers from outside, again and again, never breaks the pool") {
  ProcessPool<Crasher> pool(quiet({.workers = 2}));
  std::vector<int64_t> jobs = {1, 2, 3};
  for (int round = 0; round < 20; ++round) {
    CAPTURE(round);
    REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
    for (const WorkerStats& worker : pool.stats().workers) ::kill(worker.pid, SIGKILL);
  }
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  auto result = map_within(pool, jobs, {}, absl::Seconds(10));
  REQUIRE_MESSAGE(result.ok(), result.status());
  CHECK(*result == std::vector<int64_t>{1, 4, 9});
}

// enter() crashes (or fails) while a marker file says so; the pool backs off and recovers once
// workers start cleanly.
struct FlakyEnter {
  explicit FlakyEnter(std::string marker) : marker_(std::move(marker)) {}
  absl::Status enter() {
    if (testing::file_exists(marker_)) ::raise(SIGSEGV);
    return absl::OkStatus();
  }
  int64_t run(int64_t x) { return x + 1; }
  std::string marker_;
};

TEST_CASE("workers that die in enter() are respawned with growing delays, and the pool recovers") {
  TempDir dir;
  const std::string marker = dir.file("broken");
  testing::append_line(marker, "x");
  ProcessPool<FlakyEnter> pool(quiet({.workers = 2,
                                      .respawn_delay = absl::Milliseconds(20),
                                      .respawn_max_delay = absl::Milliseconds(200)}),
                               [marker] { return FlakyEnter(marker); });
  std::vector<int64_t> jobs = {1, 2, 3};
  // While no worker can start, calls fail at once with the cause, never wait.
  const absl::Time start = absl::Now();
  auto failing = map_within(pool, jobs, {}, absl::Seconds(10));
  CHECK(absl::Now() - start < absl::Seconds(3));
  REQUIRE_FALSE(failing.ok());
  CHECK(failing.status().code() == absl::StatusCode::kAborted);
  CHECK(message_has(failing.status(), "SIGSEGV"));
  MESSAGE("while enter() crashes: ", failing.status());
  // Bounded: one second of backoff capped at 200 ms cannot hold more than ~20 starts.
  absl::SleepFor(absl::Seconds(1));
  const int64_t restarted = pool.stats().workers_restarted;
  CHECK(restarted >= 2);
  CHECK(restarted <= 40);
  // The cause goes away: the pool heals by itself.
  std::filesystem::remove(marker);
  absl::StatusOr<std::vector<int64_t>> healed;
  CHECK(wait_until([&] {
    healed = map_within(pool, jobs, {}, absl::Seconds(5));
    return healed.ok();
  }, absl::Seconds(10)));
  REQUIRE_MESSAGE(healed.ok(), healed.status());
  CHECK(*healed == std::vector<int64_t>{2, 3, 4});
}

// =============================================================================================
// 2. Fork failure is a status, never an exception or a zombie.

TEST_CASE("forks that fail in the constructor are a status on the first call; nothing is left") {
  std::string what;
  StartMethod method = StartMethod::kFork;
  SUBCASE("fork") {}
  SUBCASE("fork server") { method = StartMethod::kForkServer; }
  bool threw = false;
  {
    internal::inject_fork_failures(1000, EAGAIN);
    std::unique_ptr<ProcessPool<Crasher>> pool;
    try {
      pool = std::make_unique<ProcessPool<Crasher>>(quiet({.workers = 3, .start_method = method}));
    } catch (...) {
      threw = true;
    }
    CHECK_FALSE(threw);
    REQUIRE(pool != nullptr);
    std::vector<int64_t> jobs = {1, 2};
    auto result = map_within(*pool, jobs, {}, absl::Seconds(10));
    REQUIRE_FALSE(result.ok());
    CHECK((result.status().code() == absl::StatusCode::kResourceExhausted ||
           result.status().code() == absl::StatusCode::kUnavailable));
    CHECK(message_has(result.status(), "fork"));
    MESSAGE("with fork() failing: ", result.status());
    // The limit lifts: the pool heals by itself.
    internal::inject_fork_failures(0, 0);
    absl::StatusOr<std::vector<int64_t>> healed;
    CHECK(wait_until([&] {
      healed = map_within(*pool, jobs, {}, absl::Seconds(5));
      return healed.ok();
    }, absl::Seconds(15)));
    CHECK(healed.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4});
  }
  internal::inject_fork_failures(0, 0);
  CHECK(testing::child_pids(::getpid()).empty());
}

TEST_CASE("a replacement fork that fails is retried while the live workers keep serving") {
  ProcessPool<Crasher> pool(quiet({.workers = 2,
                                   .respawn_delay = absl::Milliseconds(20),
                                   .respawn_max_delay = absl::Milliseconds(100)}));
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  internal::inject_fork_failures(1000, EAGAIN);
  const pid_t victim = pool.stats().workers[0].pid;
  ::kill(victim, SIGKILL);
  // The survivor serves every call meanwhile.
  std::vector<int64_t> jobs(20, 3);
  for (int i = 0; i < 5; ++i) {
    auto result = map_within(pool, jobs, {}, absl::Seconds(10));
    REQUIRE_MESSAGE(result.ok(), result.status());
  }
  CHECK(pool.stats().workers[0].pid != victim);
  internal::inject_fork_failures(0, 0);
  CHECK(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(10)));
}

// A child process of the test runs `body` inside a fresh pids cgroup whose limit is `limit`
// processes; the test can raise the limit through the returned path. Skips (with a printed
// reason) where no pids cgroup can be made.
std::string make_pids_cgroup() {
  for (const char* root : {"/sys/fs/cgroup/pids", "/sys/fs/cgroup"}) {
    const std::string dir = absl::StrCat(root, "/procpool-test-", ::getpid());
    if (::mkdir(dir.c_str(), 0755) != 0) continue;
    if (testing::file_exists(dir + "/pids.max")) return dir;
    ::rmdir(dir.c_str());
  }
  return "";
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

TEST_CASE("under a real pids cgroup limit the pool reports the cause and heals when it lifts") {
  const std::string cgroup = make_pids_cgroup();
  if (cgroup.empty()) {
    MESSAGE("skipped: no pids cgroup can be made here (needs a writable pids controller)");
    return;
  }
  int report[2];
  REQUIRE(::pipe2(report, O_CLOEXEC) == 0);
  int go[2];
  REQUIRE(::pipe2(go, O_CLOEXEC) == 0);
  write_file(cgroup + "/pids.max", "3");
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The child: itself plus at most two more tasks (processes or threads).
    write_file(cgroup + "/cgroup.procs", std::to_string(::getpid()));
    std::string out;
    {
      bool threw = false;
      std::unique_ptr<ProcessPool<Crasher>> pool;
      try {
        pool = std::make_unique<ProcessPool<Crasher>>(quiet({.workers = 4}));
      } catch (...) {
        threw = true;
      }
      out += threw ? "threw\n" : "constructed\n";
      if (pool != nullptr) {
        std::vector<int64_t> jobs = {1, 2};
        absl::StatusOr<std::vector<int64_t>> first = pool->map(jobs);
        out += absl::StrCat("first ", absl::StatusCodeToString(first.status().code()), " ",
                            first.status().message(), "\n");
        // Tell the test, wait for the limit to lift, then expect the pool to heal.
        (void)!::write(report[1], out.data(), out.size());
        out.clear();
        char byte;
        (void)!::read(go[0], &byte, 1);
        absl::StatusOr<std::vector<int64_t>> healed;
        testing::wait_until([&] {
          healed = pool->map(jobs);
          return healed.ok();
        }, absl::Seconds(15));
        out += absl::StrCat("healed ", healed.ok() ? "ok" : healed.status().ToString(), "\n");
        out += absl::StrCat("workers ", pool->stats().workers.size(), "\n");
      }
    }
    // Every child the pool forked has been reaped by now.
    out += absl::StrCat("children ", testing::child_pids(::getpid()).size(), "\n");
    (void)!::write(report[1], out.data(), out.size());
    ::_exit(0);
  }
  ::close(report[1]);
  ::close(go[0]);
  auto read_some = [&](absl::Duration timeout) {
    std::string text;
    const absl::Time deadline = absl::Now() + timeout;
    char buffer[4096];
    while (absl::Now() < deadline && !absl::StrContains(text, "first") &&
           !absl::StrContains(text, "threw")) {
      pollfd p{report[0], POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t got = ::read(report[0], buffer, sizeof(buffer));
      if (got <= 0) break;
      text.append(buffer, static_cast<size_t>(got));
    }
    return text;
  };
  const std::string first = read_some(absl::Seconds(20));
  MESSAGE("under pids.max = 3: ", first);
  CHECK(absl::StrContains(first, "constructed"));
  CHECK((absl::StrContains(first, "first RESOURCE_EXHAUSTED") ||
         absl::StrContains(first, "first UNAVAILABLE") || absl::StrContains(first, "first OK")));
  write_file(cgroup + "/pids.max", "max");
  (void)!::write(go[1], "g", 1);
  ::close(go[1]);
  std::string rest;
  char buffer[4096];
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline) {
    pollfd p{report[0], POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const ssize_t got = ::read(report[0], buffer, sizeof(buffer));
    if (got <= 0) break;
    rest.append(buffer, static_cast<size_t>(got));
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(report[0]);
  ::rmdir(cgroup.c_str());
  MESSAGE("after the limit lifted: ", rest);
  CHECK(absl::StrContains(rest, "healed ok"));
  CHECK(absl::StrContains(rest, "children 0"));
}

// =============================================================================================
// 3. The channel cannot wedge the parent.

constexpr int64_t kPartialFrame = -1000;  // a header announcing 1,000 words, then nothing
constexpr int64_t kGarbage = -1001;        // bytes that cannot be a frame, then nothing

struct Vandal {
  int64_t run(int64_t job) {
    if (job == kPartialFrame) {
      const uint32_t table[2] = {0, 1000};
      write_all(kWorkerChannelFd, table, sizeof(table));
      while (true) ::pause();
    }
    if (job == kGarbage) {
      const char garbage[] = "\xde\xad\xbe\xef not a frame \xff\xff\xff\xff";
      write_all(kWorkerChannelFd, garbage, sizeof(garbage));
      while (true) ::pause();
    }
    return job;
  }
};

TEST_CASE("a frame that begins and never ends fails its task within frame_timeout; no hang") {
  ProcessPool<Vandal> pool(quiet({.workers = 2, .frame_timeout = absl::Milliseconds(300)}));
  std::vector<int64_t> jobs = {0, 1, kPartialFrame, 3, 4, 5};
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(10));
  MESSAGE("took ", absl::FormatDuration(absl::Now() - start), ": ", result.status());
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kDataLoss);
  CHECK(message_has(result.status(), "job 2: "));
  CHECK(message_has(result.status(), "frame_timeout"));
  // The pool carries on.
  std::vector<int64_t> fine = {7, 8};
  auto next = map_within(pool, fine, {}, absl::Seconds(10));
  CHECK(next.value_or(std::vector<int64_t>{}) == fine);
}

TEST_CASE("a bad frame fails only the task that was running; innocent chunk-mates never get "
          "kDataLoss") {
  int retries = 0;
  SUBCASE("no retries: finished but unreported chunk-mates fail kAborted") {}
  SUBCASE("retries: they run again and succeed") { retries = 1; }
  ProcessPool<Vandal> pool(quiet({.workers = 2}));
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 200; ++i) jobs.push_back(i == 57 ? kGarbage : i);
  size_t data_loss = 0, ok = 0, aborted = 0, other = 0;
  size_t index = 0;
  for (const absl::StatusOr<int64_t>& outcome :
       pool.imap(jobs, {.chunksize = 5, .retries = retries})) {
    if (outcome.ok()) {
      ++ok;
      CHECK(*outcome == jobs[index]);
    } else if (outcome.status().code() == absl::StatusCode::kDataLoss) {
      ++data_loss;
      CHECK(index == 57);
    } else if (outcome.status().code() == absl::StatusCode::kAborted) {
      ++aborted;
    } else {
      ++other;
      MESSAGE(outcome.status());
    }
    ++index;
  }
  CHECK(index == jobs.size());
  CHECK(data_loss == 1);
  CHECK(other == 0);
  if (retries > 0) {
    CHECK(aborted == 0);
    CHECK(ok == jobs.size() - 1);
  } else {
    CHECK(aborted <= 4);
  }
}

// =============================================================================================
// 4. join() tells the truth.

constexpr const char* kDieInExit[] = {"abort", "sigsegv", "exit3", "outside-kill", "destructor"};

struct DiesInExit {
  DiesInExit(std::string how, std::string dir) : how_(std::move(how)), dir_(std::move(dir)) {}
  ~DiesInExit() {
    if (how_ == "destructor" && ready_) ::raise(SIGSEGV);
  }
  DiesInExit(DiesInExit&& other) noexcept : how_(other.how_), dir_(other.dir_) {}
  int64_t run(int64_t x) {
    ready_ = true;
    return x;
  }
  void exit() {
    if (how_ == "abort") std::abort();
    if (how_ == "sigsegv") ::raise(SIGSEGV);
    if (how_ == "exit3") std::exit(3);
    if (how_ == "outside-kill") {
      testing::append_line(dir_ + "/in-exit", std::to_string(::getpid()));
      while (true) ::pause();
    }
  }
  std::string how_;
  std::string dir_;
  bool ready_ = false;
};

TEST_CASE("a worker that dies during exit() makes join() report it, naming worker, pid and cause") {
  for (const char* how : kDieInExit) {
    CAPTURE(how);
    TempDir dir;
    LogCapture log;
    PoolOptions options{.workers = 1, .join_timeout = absl::Seconds(20)};
    options.log_sink = log.sink();
    ProcessPool<DiesInExit> pool(options, [how, path = dir.path()] { return DiesInExit(how, path); });
    std::vector<int64_t> jobs = {1, 2};
    REQUIRE(map_within(pool, jobs, {}, absl::Seconds(10)).ok());
    const pid_t pid = pool.stats().workers[0].pid;
    REQUIRE(pool.close().ok());
    std::thread killer;
    if (std::string(how) == "outside-kill") {
      killer = std::thread([&] {
        wait_until([&] { return testing::file_exists(dir.file("in-exit")); });
        ::kill(pid, SIGKILL);
      });
    }
    const absl::Status joined = pool.join();
    if (killer.joinable()) killer.join();
    MESSAGE(joined);
    CHECK(joined.code() == absl::StatusCode::kAborted);
    CHECK(message_has(joined, absl::StrCat("worker 0 (pid ", pid, ")")));
    const std::string expected = std::string(how) == "abort"        ? "SIGABRT"
                                 : std::string(how) == "exit3"      ? "status 3"
                                 : std::string(how) == "outside-kill" ? "SIGKILL"
                                                                      : "SIGSEGV";
    CHECK(message_has(joined, expected));
    CHECK(testing::worker_children().empty());
  }
}

TEST_CASE("the end of a pool's scope reports a worker that died in exit() as an error") {
  LogCapture log;
  {
    PoolOptions options{.workers = 1};
    options.log_sink = log.sink();
    ProcessPool<DiesInExit> pool(options, [] { return DiesInExit("abort", "/tmp"); });
    std::vector<int64_t> jobs = {1};
    REQUIRE(map_within(pool, jobs, {}, absl::Seconds(10)).ok());
  }
  CHECK(log.contains("SIGABRT"));
  CHECK(log.contains("join"));
}

// =============================================================================================
// 5. terminate() is a deliberate stop.

struct Sleeper {
  int64_t run(int64_t ms) {
    absl::SleepFor(absl::Milliseconds(ms));
    return ms;
  }
};

TEST_CASE("terminate(): undelivered tasks fail kCancelled, delivered ones are kept, join() is OK, "
          "and nothing is logged as a warning") {
  std::atomic<int> warnings{0};
  std::string logged;
  std::mutex logged_mu;
  PoolOptions options{.workers = 2, .join_timeout = absl::Seconds(5)};
  options.log_sink = [&](const LogEvent& event) {
    if (event.severity != LogSeverity::kInfo) {
      ++warnings;
      std::lock_guard lock(logged_mu);
      logged += event.message + "\n";
    }
  };
  OutcomePool<Sleeper> pool(options, [] { return std::make_unique<Sleeper>(); });
  std::vector<int64_t> jobs = {0, 0, 0, 0, 2000, 2000, 2000, 2000, 0, 0};
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  // Wait until the quick ones are in and a long one runs.
  REQUIRE(wait_until([&] {
    for (size_t i = 0; i < 4; ++i) {
      if ((*call)->outcome_count(i) == 0) return false;
    }
    for (const WorkerStats& worker : pool.stats().workers) {
      if (worker.state == WorkerState::kBusy && worker.current_task >= 4) return true;
    }
    return false;
  }));
  pool.core().terminate();
  REQUIRE((*call)->wait(absl::Seconds(5)));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    const auto& outcome = (*call)->outcome(i);
    if (i < 4) {
      CHECK(outcome.ok());
    } else if (jobs[i] > 0) {
      CHECK(outcome.status().code() == absl::StatusCode::kCancelled);
    } else {
      // A quick one after the long ones may have run already (a worker that became ready late
      // takes them while the other runs a long one): delivered, it keeps its value.
      CHECK((outcome.ok() || outcome.status().code() == absl::StatusCode::kCancelled));
    }
  }
  const absl::Status joined = pool.core().join();
  CHECK_MESSAGE(joined.ok(), joined);
  std::lock_guard lock(logged_mu);
  CHECK_MESSAGE(warnings.load() == 0, logged);
}

struct SlowEnter {
  absl::Status enter() {
    absl::SleepFor(absl::Seconds(5));
    return absl::OkStatus();
  }
  int64_t run(int64_t x) { return x; }
};

TEST_CASE("terminate() while workers run enter() logs nothing as a warning") {
  LogCapture log;
  PoolOptions options{.workers = 2};
  options.log_sink = [&log, sink = log.sink()](const LogEvent& event) {
    if (event.severity != LogSeverity::kInfo) sink(event);
  };
  ProcessPool<SlowEnter> pool(options);
  REQUIRE(wait_until([&] {
    const PoolStats stats = pool.stats();
    return stats.workers[0].pid != 0 && stats.workers[1].pid != 0;
  }, absl::Seconds(5)));
  const absl::Time start = absl::Now();
  pool.terminate();
  CHECK(absl::Now() - start < absl::Seconds(4));
  CHECK(pool.join().ok());
  CHECK_MESSAGE(log.all().empty(), log.all());
}

// =============================================================================================
// 6. Forking never duplicates output.

struct Nothing {
  int64_t run(int64_t x) { return x; }
};

// Runs `body` in a forked child whose stdout is the file `path` (so a worker inherits it, as it
// would a program's redirected output) and returns the child's exit status.
template <typename Body>
int run_with_stdout_to(const std::string& path, Body body) {
  std::fflush(nullptr);  // what the test runner buffered is not the child's to write
  const pid_t child = ::fork();
  if (child == 0) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ::dup2(fd, STDOUT_FILENO) < 0) ::_exit(120);
    ::close(fd);
    ::_exit(body());
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return status;
}

TEST_CASE("a program thread printing while pools come and go prints every line once") {
  StartMethod method = StartMethod::kFork;
  SUBCASE("fork") {}
  SUBCASE("fork server") { method = StartMethod::kForkServer; }
  TempDir dir;
  const std::string path = dir.file("lines");
  const int status = run_with_stdout_to(path, [method] {
    std::atomic<bool> stop{false};
    std::thread printer([&] {
      // Fully buffered stdout (a file): lines sit in the buffer between the flush before a fork
      // and the fork itself. A bounded number, so the file stays small.
      for (int64_t i = 0; i < 3'000'000 && !stop.load(std::memory_order_relaxed); ++i) {
        std::printf("line %lld\n", static_cast<long long>(i));
      }
    });
    const absl::Time end = absl::Now() + absl::Seconds(2);
    std::vector<int64_t> jobs(40, 1);
    int failures = 0;
    while (absl::Now() < end) {
      ProcessPool<Nothing> pool(
          quiet({.workers = 2, .max_tasks_per_worker = 3, .start_method = method}));
      if (!pool.map(jobs, {.chunksize = 1}).ok()) ++failures;
    }
    stop = true;
    printer.join();
    std::fflush(stdout);
    return failures == 0 ? 0 : 1;
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  // Up to 3 million lines: checked in one pass over the file's bytes, counting each number's
  // copies in a flat table (a std::map and a string per line took 10 CPU-seconds at -O0).
  const std::string text = testing::read_file(path);
  std::vector<uint8_t> copies(3'000'000, 0);
  size_t lines = 0, distinct = 0, duplicated = 0, out_of_order = 0;
  int64_t last = -1;
  std::vector<std::string> strange;
  for (absl::string_view rest = text; !rest.empty();) {
    const size_t end = rest.find('\n');
    absl::string_view line = rest.substr(0, end);
    rest.remove_prefix(end == absl::string_view::npos ? rest.size() : end + 1);
    ++lines;
    int64_t n = -1;
    if (absl::ConsumePrefix(&line, "line ") && absl::SimpleAtoi(line, &n) && n >= 0 &&
        n < static_cast<int64_t>(copies.size())) {
      if (copies[n] == 0) ++distinct; else ++duplicated;
      copies[n] = copies[n] < 255 ? copies[n] + 1 : 255;
      if (n != last + 1) ++out_of_order;
      last = n;
    } else if (strange.size() < 5) {
      strange.emplace_back(line);
    }
  }
  for (const std::string& line : strange) MESSAGE("not a line of the printer: '", line, "'");
  MESSAGE(lines, " lines in the file, ", distinct, " distinct, ", duplicated, " duplicated");
  CHECK(strange.empty());
  CHECK(duplicated == 0);
  CHECK(out_of_order == 0);
  CHECK(lines == distinct);
}

TEST_CASE("a program thread blocked reading a stdio stream never stalls forks or the pool") {
  // A thread in fgets() holds its FILE's lock until a line comes (a program reading stdin, or a
  // pipe from another program). Flushing every stream before fork() would wait for that lock,
  // with the pool's lock held and glibc's list of streams locked: the pool's constructor, its
  // replacements and every fopen() of the program would hang until someone typed a line.
  StartMethod method = StartMethod::kFork;
  SUBCASE("fork") {}
  SUBCASE("fork server") { method = StartMethod::kForkServer; }
  int input[2];
  REQUIRE(::pipe2(input, O_CLOEXEC) == 0);
  std::fflush(nullptr);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(input[1]);
    FILE* in = ::fdopen(input[0], "r");
    std::atomic<bool> reading{false};
    std::thread reader([&] {
      reading = true;
      char line[64];
      (void)!std::fgets(line, sizeof(line), in);  // blocks: nobody writes
    });
    while (!reading) absl::SleepFor(absl::Milliseconds(1));
    absl::SleepFor(absl::Milliseconds(50));  // in read(), holding the stream's lock
    int code = 0;
    {
      ProcessPool<Crasher> pool(quiet({.workers = 1, .start_method = method}));
      // The crash makes the pool thread fork a replacement while the reader blocks.
      std::vector<int64_t> jobs = {2, kKill, 3};
      absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs, {.chunksize = 1});
      if (squares.ok() || squares.status().code() != absl::StatusCode::kAborted) code = 1;
      if (!pool.map(std::vector<int64_t>{4, 5}).ok()) code = 2;
      if (std::FILE* other = std::fopen("/dev/null", "r")) std::fclose(other);
    }
    ::_exit(code);  // the reader still blocks; _exit does not wait for it
  }
  ::close(input[0]);
  int status = 0;
  const bool ended = testing::wait_until(
      [&] { return ::waitpid(child, &status, WNOHANG) == child; }, absl::Seconds(20));
  if (!ended) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
  }
  ::close(input[1]);
  CHECK(ended);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

// =============================================================================================
// 7. Closed stdio does not break workers.

struct Printer {
  int64_t run(int64_t x) {
    std::printf("task %lld says hello on stdout\n", static_cast<long long>(x));
    std::fflush(stdout);
    std::fprintf(stderr, "and on stderr\n");
    return x * 2;
  }
};

TEST_CASE("a program that closed its standard fds still gets working workers") {
  std::vector<int> closed;
  SUBCASE("stdin and stdout closed") { closed = {0, 1}; }
  SUBCASE("all three closed") { closed = {0, 1, 2}; }
  int report[2];
  REQUIRE(::pipe2(report, O_CLOEXEC) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    for (int fd : closed) ::close(fd);
    std::string out;
    {
      ProcessPool<Printer> pool(quiet({.workers = 2}));
      std::vector<int64_t> jobs = {1, 2, 3, 4, 5, 6};
      absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs);
      out = result.ok() ? absl::StrCat("ok ", result->back()) : result.status().ToString();
      out += absl::StrCat(" restarted ", pool.stats().workers_restarted);
    }
    (void)!::write(report[1], out.data(), out.size());
    ::_exit(0);
  }
  ::close(report[1]);
  std::string out;
  char buffer[1024];
  ssize_t got;
  while ((got = ::read(report[0], buffer, sizeof(buffer))) > 0) out.append(buffer, got);
  ::close(report[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(out == "ok 12 restarted 0");
}

// =============================================================================================
// 8. Deaths are reported right even when the program reaps children itself.

void reap_everything(int) {
  const int saved = errno;
  while (::waitpid(-1, nullptr, WNOHANG) > 0) {
  }
  errno = saved;
}

TEST_CASE("a worker killed by SIGABRT is reported as such even when the program reaps children") {
  // The worker dies of its abort(), not of doctest's crash report chained after the stack is
  // recorded (test_support.h).
  testing::DefaultCrashHandlers default_handlers;
  struct sigaction previous {};
  struct sigaction action {};
  SUBCASE("SIGCHLD ignored") { action.sa_handler = SIG_IGN; }
  SUBCASE("a SIGCHLD handler calling waitpid(-1)") {
    action.sa_handler = reap_everything;
    action.sa_flags = SA_RESTART;
  }
  sigemptyset(&action.sa_mask);
  REQUIRE(::sigaction(SIGCHLD, &action, &previous) == 0);
  {
    ProcessPool<Crasher> pool(quiet({.workers = 1}));
    std::vector<int64_t> jobs = {1, kAbort, 3};
    auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(10));
    REQUIRE_FALSE(result.ok());
    MESSAGE(result.status());
    CHECK(result.status().code() == absl::StatusCode::kAborted);
    CHECK(message_has(result.status(), "SIGABRT"));
    CHECK_FALSE(message_has(result.status(), "exited with status 0"));
    // A SIGKILL cannot be recorded by the worker: said so, never invented as a clean exit.
    std::vector<int64_t> killed = {kKill};
    auto unknown = map_within(pool, killed, {}, absl::Seconds(10));
    REQUIRE_FALSE(unknown.ok());
    MESSAGE(unknown.status());
    CHECK_FALSE(message_has(unknown.status(), "exited with status 0"));
    CHECK((message_has(unknown.status(), "SIGKILL") || message_has(unknown.status(), "unknown")));
  }
  REQUIRE(::sigaction(SIGCHLD, &previous, nullptr) == 0);
}

// =============================================================================================
// 9. A worker cannot use its parent's pool.

ProcessPool<Crasher>* inherited_pool = nullptr;

struct Recursive {
  // What a worker's call on the inherited pool returned (its status code), or, for job 2, the
  // sum of a pool made inside the worker.
  int64_t run(int64_t job) {
    if (job == 0) {
      std::vector<int64_t> jobs = {1, 2};
      return static_cast<int64_t>(inherited_pool->map(jobs).status().code());
    }
    if (job == 1) return static_cast<int64_t>(inherited_pool->apply(3).status().code());
    ProcessPool<Crasher> nested(quiet({.workers = 1}));
    std::vector<int64_t> jobs = {1, 2, 3};
    absl::StatusOr<std::vector<int64_t>> squares = nested.map(jobs);
    if (!squares.ok()) return -1;
    int64_t sum = 0;
    for (int64_t s : *squares) sum += s;
    return sum;
  }
};

TEST_CASE("a worker that calls a pool it inherited gets kFailedPrecondition at once") {
  ProcessPool<Crasher> global(quiet({.workers = 1}));
  inherited_pool = &global;
  ProcessPool<Recursive> pool(quiet({.workers = 1}));
  std::vector<int64_t> jobs = {0, 1, 2};
  auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(10));
  REQUIRE_MESSAGE(result.ok(), result.status());
  CHECK((*result)[0] == static_cast<int64_t>(absl::StatusCode::kFailedPrecondition));
  CHECK((*result)[1] == static_cast<int64_t>(absl::StatusCode::kFailedPrecondition));
  CHECK((*result)[2] == 14);  // pools made inside a worker work
  inherited_pool = nullptr;
}

// =============================================================================================
// 10. Options are checked.

TEST_CASE("bad options are kInvalidArgument on the first call, and no worker is forked") {
  PoolOptions options = quiet({.workers = 2});
  std::string field;
  SUBCASE("negative workers") {
    options.workers = -1;
    field = "workers";
  }
  SUBCASE("a frame limit too small for any frame") {
    options.max_frame_bytes = 16;
    field = "max_frame_bytes";
  }
  SUBCASE("a negative join_timeout") {
    options.join_timeout = absl::Seconds(-1);
    field = "join_timeout";
  }
  SUBCASE("a negative task_timeout") {
    options.task_timeout = -absl::Milliseconds(5);
    field = "task_timeout";
  }
  SUBCASE("a zero enter_timeout") {
    options.enter_timeout = absl::ZeroDuration();
    field = "enter_timeout";
  }
  SUBCASE("a negative kill_grace") {
    options.kill_grace = absl::Seconds(-2);
    field = "kill_grace";
  }
  SUBCASE("negative max_tasks_per_worker") {
    options.max_tasks_per_worker = -3;
    field = "max_tasks_per_worker";
  }
  ProcessPool<Crasher> pool(options);
  CHECK(testing::worker_children().empty());
  std::vector<int64_t> jobs = {1};
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<int64_t>> result = pool.map(jobs);
  CHECK(absl::Now() - start < absl::Seconds(1));
  CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(message_has(result.status(), field));
  CHECK(pool.apply(1).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("bad call options are kInvalidArgument for that call only") {
  ProcessPool<Crasher> pool(quiet({.workers = 1}));
  std::vector<int64_t> jobs = {1, 2};
  CHECK(pool.map(jobs, {.retries = -1}).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(pool.map(jobs, {.task_timeout = absl::Seconds(-1)}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::vector<int64_t>> good = pool.map(jobs);
  CHECK_MESSAGE(good.ok(), good.status().ToString());
}

// =============================================================================================
// 11. One code per cause.

struct Inflater {
  std::string run(const std::string& job) {
    if (job == "inflate") return std::string(size_t{2} << 20, 'x');
    return job;
  }
};

TEST_CASE("a value over max_frame_bytes gets the same code as a job or a result; the worker "
          "reports its own oversized result and lives") {
  ProcessPool<Inflater> pool(quiet({.workers = 1, .max_frame_bytes = size_t{1} << 20}));
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  const pid_t pid = pool.stats().workers[0].pid;
  std::vector<std::string> big_job = {"a", std::string(size_t{2} << 20, 'y'), "c"};
  std::vector<std::string> big_result = {"a", "inflate", "c"};
  auto job_failed = map_within(pool, big_job, {.chunksize = 1}, absl::Seconds(10));
  auto result_failed = map_within(pool, big_result, {.chunksize = 1}, absl::Seconds(10));
  MESSAGE("job: ", job_failed.status());
  MESSAGE("result: ", result_failed.status());
  CHECK(job_failed.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(result_failed.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(message_has(job_failed.status(), "job 1: "));
  CHECK(message_has(result_failed.status(), "job 1: "));
  CHECK(message_has(job_failed.status(), "max_frame_bytes"));
  CHECK(message_has(result_failed.status(), "max_frame_bytes"));
  CHECK(pool.stats().workers_restarted == 0);
  CHECK(pool.stats().workers[0].pid == pid);
}

// =============================================================================================
// 12. A stalled worker does not hold work hostage.

TEST_CASE("a SIGSTOPped worker does not keep unstarted tasks from idle workers") {
  ProcessPool<Sleeper> pool(quiet({.workers = 2}));
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  const pid_t stopped = pool.stats().workers[1].pid;
  REQUIRE(::kill(stopped, SIGSTOP) == 0);
  REQUIRE(wait_until([&] { return testing::process_state(stopped) == 'T'; }));
  std::vector<int64_t> jobs(8, 10);
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(3));
  MESSAGE("8 x 10 ms with one worker stopped: ", absl::FormatDuration(absl::Now() - start));
  CHECK_MESSAGE(result.ok(), result.status());
  ::kill(stopped, SIGCONT);
}

TEST_CASE("tasks queued behind a task that runs far longer than its peers move to idle workers") {
  TempDir dir;
  ProcessPool<Sleeper> pool(quiet({.workers = 2}));
  // Many short tasks, then one very long one with short ones behind it in the same chunk order.
  std::vector<int64_t> jobs;
  for (int i = 0; i < 40; ++i) jobs.push_back(i == 20 ? 3000 : 1);
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {.chunksize = 2}, absl::Seconds(10));
  const absl::Duration took = absl::Now() - start;
  MESSAGE("took ", absl::FormatDuration(took));
  REQUIRE(result.ok());
  // Nothing waited for the 3 s task but the task itself.
  CHECK(took < absl::Milliseconds(3600));
}

// =============================================================================================
// 14. Leaving an imap loop cancels what has not started, really.

struct Logged {
  explicit Logged(std::string dir) : dir_(std::move(dir)) {}
  int64_t run(int64_t job) {
    testing::append_line(dir_ + "/ran", std::to_string(job));
    absl::SleepFor(absl::Milliseconds(job % 10000));
    return job;
  }
  std::string dir_;
};

TEST_CASE("breaking out of imap keeps tasks already sent to a worker from starting") {
  TempDir dir;
  ProcessPool<Logged> pool(quiet({.workers = 1}), [path = dir.path()] { return Logged(path); });
  // Job values: id * 10000 + milliseconds to sleep.
  std::vector<int64_t> jobs = {0, 12000, 22000, 32000, 42000};
  {
    auto results = pool.imap(jobs);
    for (const absl::StatusOr<int64_t>& r : results) {
      CHECK(r.ok());
      break;
    }
  }
  const absl::Time start = absl::Now();
  auto next = pool.apply(5);
  const absl::Duration waited = absl::Now() - start;
  MESSAGE("apply after break waited ", absl::FormatDuration(waited));
  CHECK(next.ok());
  CHECK(waited < absl::Milliseconds(3000));
  std::set<std::string> ran;
  for (const std::string& line : testing::read_lines(dir.file("ran"))) ran.insert(line);
  CHECK(ran.count("22000") == 0);
  CHECK(ran.count("32000") == 0);
  CHECK(ran.count("42000") == 0);
}

TEST_CASE("a worker does not start a queued task of a call cancelled by a signal's close") {
  TempDir dir;
  OutcomePool<Logged> pool(quiet({.workers = 1}), [path = dir.path()] {
    return std::make_unique<Logged>(path);
  });
  // Quick tasks, then slow ones: they are queued at the worker behind the quick ones.
  auto call = pool.submit({0, 0, 0, 0, 0, 0, 11500, 21500, 31500}, {.chunksize = 1});
  REQUIRE(call.ok());
  REQUIRE(wait_until([&] { return testing::read_lines(dir.file("ran")).size() >= 7; }));
  pool.core().cancel_pending(absl::CancelledError("cancelled by the test"));
  REQUIRE((*call)->wait(absl::Seconds(5)));
  const absl::Time start = absl::Now();
  // The worker is free once its running task ends.
  CHECK(wait_until([&] { return all_idle(pool.stats()); }, absl::Seconds(3)));
  MESSAGE("idle after ", absl::FormatDuration(absl::Now() - start));
  std::set<std::string> ran;
  for (const std::string& line : testing::read_lines(dir.file("ran"))) ran.insert(line);
  CHECK(ran.count("21500") == 0);
  CHECK(ran.count("31500") == 0);
}

}  // namespace
}  // namespace procpool
