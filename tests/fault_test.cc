// Fault injection (issue 4): every fault here is real. Workers die of real signals, are killed from
// outside, stopped, time out, write garbage on their channel; a real parent process is SIGKILLed.
// Nothing sleeps to let things happen: each test waits on an event (an outcome, a line in an event
// file, a process state) with a deadline, and a call that misses its deadline fails the test
// instead of hanging it (see fault_support.h).

#include "procpool/process_pool.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "capnp/any.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "procpool/internal/protocol.capnp.h"
#include "tests/fault_support.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

// ---------------------------------------------------------------------------------------------
// Types whose codecs fail on purpose (test 2). Codec specializations must come before any use.

namespace procpool::testing {

// A result type: encoding 13 throws (in the worker); decoding 7 fails (in the parent).
struct Brittle {
  int64_t value = 0;
};
// A job type: encoding 99 throws (in the parent); decoding -1 fails (in the worker).
struct Picky {
  int64_t value = 0;
};
// A large job type: a byte string (in the worker's shared region from 64 KiB), or, poisoned, one
// whose encoding throws (in the parent).
struct LargePicky {
  std::string payload;
  bool poison = false;
};

}  // namespace procpool::testing

namespace procpool {

template <>
struct Codec<testing::Brittle> {
  static void encode(const testing::Brittle& b, wire::Value::Builder out) {
    if (b.value == 13) throw std::runtime_error("13 cannot be encoded");
    out.setInt(b.value);
  }
  static absl::Status decode(wire::Value::Reader in, testing::Brittle& out) {
    if (absl::Status s = Codec<int64_t>::decode(in, out.value); !s.ok()) return s;
    if (out.value == 7) return absl::DataLossError("7 cannot be decoded");
    return absl::OkStatus();
  }
};

template <>
struct Codec<testing::Picky> {
  static void encode(const testing::Picky& p, wire::Value::Builder out) {
    if (p.value == 99) throw std::runtime_error("99 cannot be encoded");
    out.setInt(p.value);
  }
  static absl::Status decode(wire::Value::Reader in, testing::Picky& out) {
    if (absl::Status s = Codec<int64_t>::decode(in, out.value); !s.ok()) return s;
    if (out.value == -1) return absl::DataLossError("-1 cannot be decoded");
    return absl::OkStatus();
  }
};

template <>
struct Codec<testing::LargePicky> {
  static void encode(const testing::LargePicky& job, wire::Value::Builder out) {
    if (job.poison) throw std::runtime_error("the poisoned job cannot be encoded");
    Codec<std::string>::encode(job.payload, out);
  }
  static absl::Status decode(wire::Value::Reader in, testing::LargePicky& out) {
    out.poison = false;
    return Codec<std::string>::decode(in, out.payload);
  }
};

}  // namespace procpool

namespace procpool {
namespace {

using testing::LogCapture;
using testing::OutcomePool;
using testing::TempDir;
using testing::map_within;
using testing::process_alive;
using testing::wait_until;
using testing::message_has;
using testing::write_all;

// The worker's end of its channel (lib/worker_main.cc kChannelFd). Tests that forge frames write
// there directly, as a buggy or hostile worker would.
constexpr int kWorkerChannelFd = 3;

// Job codes understood by FaultyWorker. Jobs >= 0 are ordinary: they return their square.
constexpr int64_t kRaiseSigkill = -9;
constexpr int64_t kRaiseSigsegv = -11;
constexpr int64_t kAbort = -6;
constexpr int64_t kExit3 = -3;
constexpr int64_t kHang = -100;              // sleeps until killed
constexpr int64_t kIgnoreSigtermAndHang = -15;
constexpr int64_t kSleep300ms = -300;        // then returns 300
constexpr int64_t kKillOnce = -19;           // SIGKILLs itself on its first run only; then 1900
constexpr int64_t kStopSelf = -17;           // SIGSTOPs its own process; 17 if ever continued
constexpr int64_t kAlwaysKill = -29;         // like kRaiseSigkill, another value to tell apart

// Records "enter <pid>" and "run <pid> <job>" lines (one write each, so lines from many processes
// never mix) in <dir>/events, then does what the job code says.
struct FaultyWorker {
  using Job = int64_t;
  using Result = int64_t;

  // The events file's directory comes from the environment (faulty_in sets it), so that a remote
  // worker program, started with the test's environment, writes to the same file.
  FaultyWorker() : dir_(fault_dir()) {}
  static std::string fault_dir() {
    const char* dir = std::getenv("PROCPOOL_FAULT_DIR");
    return dir != nullptr ? dir : "/tmp";
  }

  void enter() { testing::append_line(dir_ + "/events", absl::StrCat("enter ", getpid())); }

  int64_t run(int64_t job) {
    testing::append_line(dir_ + "/events", absl::StrCat("run ", getpid(), " ", job));
    switch (job) {
      case kRaiseSigkill:
      case kAlwaysKill:
        ::raise(SIGKILL);
        break;
      case kRaiseSigsegv:
        ::raise(SIGSEGV);
        break;
      case kAbort:
        std::abort();
      case kExit3:
        ::_exit(3);
      case kIgnoreSigtermAndHang:
        ::signal(SIGTERM, SIG_IGN);
        [[fallthrough]];
      case kHang:
        while (true) ::pause();
      case kSleep300ms:
        absl::SleepFor(absl::Milliseconds(300));
        return 300;
      case kKillOnce: {
        // The marker is created before the kill, so a second attempt knows it is one.
        const std::string marker = dir_ + "/killed-once";
        if (!testing::file_exists(marker)) {
          testing::append_line(marker, "x");
          ::raise(SIGKILL);
        }
        return 1900;
      }
      case kStopSelf:
        ::raise(SIGSTOP);
        return 17;
      default:
        break;
    }
    return job * job;
  }

  std::string dir_;
};

// What the workers wrote to the event file.
struct Events {
  std::map<int64_t, int> runs;          // job -> times it ran
  std::map<int64_t, pid_t> last_runner; // job -> pid that ran it last
  std::vector<pid_t> enters;
};

Events read_events(const std::string& dir) {
  Events events;
  for (const std::string& line : testing::read_lines(dir + "/events")) {
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    pid_t pid = 0;
    REQUIRE(parts.size() >= 2);
    REQUIRE(absl::SimpleAtoi(parts[1], &pid));
    if (parts[0] == "enter") {
      events.enters.push_back(pid);
    } else if (parts[0] == "run") {
      int64_t job = 0;
      REQUIRE(parts.size() == 3);
      REQUIRE(absl::SimpleAtoi(parts[2], &job));
      ++events.runs[job];
      events.last_runner[job] = pid;
    }
  }
  return events;
}

size_t enter_count(const std::string& dir) { return read_events(dir).enters.size(); }

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return testing::on_link(std::move(options));
}

// Workers that write their events in `dir` (through the environment: see FaultyWorker).
std::function<std::unique_ptr<FaultyWorker>()> faulty_in(const TempDir& dir) {
  ::setenv("PROCPOOL_FAULT_DIR", dir.path().c_str(), 1);
  return [] { return std::make_unique<FaultyWorker>(); };
}

// Jobs 0..count-1, with `special` at the given indexes.
std::vector<int64_t> jobs_with(size_t count, std::map<size_t, int64_t> special) {
  std::vector<int64_t> jobs;
  for (size_t i = 0; i < count; ++i) jobs.push_back(special.count(i) ? special[i] : int64_t(i));
  return jobs;
}

std::set<pid_t> live_worker_pids(const PoolStats& stats) {
  std::set<pid_t> pids;
  for (const WorkerStats& worker : stats.workers) {
    if (worker.pid != 0) pids.insert(worker.pid);
  }
  return pids;
}

using testing::all_serving;

// The pid of the worker running task `task` of the pool, once one is seen running it.
template <typename Pool>
pid_t wait_for_worker_running(const Pool& pool, uint64_t task) {
  pid_t found = 0;
  wait_until([&] {
    for (const WorkerStats& worker : pool.stats().workers) {
      if (worker.state == WorkerState::kBusy && worker.current_task == task) {
        found = worker.pid;
        return true;
      }
    }
    return false;
  }, absl::Seconds(10));
  return found;
}

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;

// ============================================================================================
// 1. Worker death mid-task.

TEST_CASE("a worker that dies mid-task fails that task alone; its unstarted chunk-mates run "
          "elsewhere exactly once; a fresh worker runs enter()") {
  struct Death {
    int64_t job;
    std::string how;
  };
  Death death;
  SUBCASE("raise(SIGKILL)") { death = {kRaiseSigkill, "killed by signal 9 (SIGKILL)"}; }
  SUBCASE("raise(SIGSEGV)") { death = {kRaiseSigsegv, "killed by signal 11 (SIGSEGV)"}; }
  SUBCASE("abort()") { death = {kAbort, "killed by signal 6 (SIGABRT)"}; }
  SUBCASE("_exit(3)") { death = {kExit3, "exited with status 3"}; }
  CAPTURE(death.how);
  // The worker dies of the signal itself, not of doctest's report of it (test_support.h).
  testing::DefaultCrashHandlers default_handlers;

  TempDir dir;
  OutcomePool<FaultyWorker> pool(quiet({.workers = 2}), faulty_in(dir));
  // Chunks of 5: the fault is the first task of chunk [20, 25), so 21..24 are its unstarted
  // chunk-mates, and no finished result of that chunk can be lost with it.
  const std::vector<int64_t> jobs = jobs_with(40, {{20, death.job}});
  auto call = pool.submit(jobs, {.chunksize = 5});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(10)));

  const Events events = read_events(dir.path());
  REQUIRE(events.last_runner.count(death.job));
  const pid_t victim = events.last_runner.at(death.job);
  const absl::Status& failed = (*call)->outcome(20).status();
  CHECK(failed.code() == absl::StatusCode::kAborted);
  CHECK(message_has(failed, absl::StrCat("(pid ", victim, ")")));
  CHECK(message_has(failed, death.how));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    if (i == 20) continue;
    REQUIRE((*call)->outcome(i).ok());
    CHECK(*(*call)->outcome(i) == jobs[i] * jobs[i]);
  }
  for (int64_t job : jobs) {
    CAPTURE(job);
    CHECK(events.runs.at(job) == 1);
  }
  // A replacement was forked and ran enter(): two original workers plus one.
  CHECK(wait_until([&] { return enter_count(dir.path()) == 3; }, absl::Seconds(5)));
  CHECK(pool.stats().workers_restarted == 1);
  CHECK(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(5)));
  CHECK(live_worker_pids(pool.stats()).count(victim) == 0);
  CHECK(live_worker_pids(pool.stats()).size() == 2);

  // The pool carries on with both workers.
  auto again = pool.submit(jobs_with(10, {}), {.chunksize = 1});
  REQUIRE(again.ok());
  REQUIRE((*again)->wait(absl::Seconds(10)));
  for (size_t i = 0; i < 10; ++i) CHECK(*(*again)->outcome(i) == int64_t(i * i));
}

TEST_CASE("a death mid-chunk: every job still has exactly one outcome and ran at most once") {
  // Tasks finished before the death in the same chunk may not have been reported yet: the engine
  // fails them (kAborted, "before its result was sent") rather than run them twice. Nothing is
  // lost silently and nothing runs twice.
  TempDir dir;
  OutcomePool<FaultyWorker> pool(quiet({.workers = 2}), faulty_in(dir));
  const std::vector<int64_t> jobs = jobs_with(40, {{22, kRaiseSigkill}});
  auto call = pool.submit(jobs, {.chunksize = 5});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(10)));
  const Events events = read_events(dir.path());
  CHECK((*call)->outcome(22).status().code() == absl::StatusCode::kAborted);
  CHECK(message_has((*call)->outcome(22).status(), "signal 9"));
  int lost = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    CHECK(events.runs.at(jobs[i]) == 1);
    if (i == 22) continue;
    const auto& outcome = (*call)->outcome(i);
    if (outcome.ok()) {
      CHECK(*outcome == jobs[i] * jobs[i]);
    } else {
      // Only the two chunk-mates that ran before the death may be lost, and they say so.
      CHECK((i == 20 || i == 21));
      CHECK(outcome.status().code() == absl::StatusCode::kAborted);
      CHECK(message_has(outcome.status(), "before its result was sent"));
      ++lost;
    }
  }
  MESSAGE("finished-but-unreported results lost with the worker: ", lost);
}

TEST_CASE("an OOM-killer-style SIGKILL from outside fails the busy worker's task, naming pid "
          "and signal; map returns and the pool carries on") {
  TempDir dir;
  ProcessPool<FaultyWorker> pool(quiet({.workers = 2}), faulty_in(dir));
  const std::vector<int64_t> jobs = jobs_with(12, {{5, kHang}});
  pid_t victim = 0;
  std::thread killer([&] {
    victim = wait_for_worker_running(pool, 5);
    if (victim > 0) ::kill(victim, SIGKILL);
  });
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(10));
  const absl::Duration took = absl::Now() - start;
  killer.join();
  REQUIRE(victim > 0);
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kAborted);
  CHECK(message_has(result.status(), "job 5: "));
  CHECK(message_has(result.status(), absl::StrCat("(pid ", victim, ")")));
  CHECK(message_has(result.status(), "killed by signal 9 (SIGKILL)"));
  CHECK(took < absl::Seconds(5));
  const Events events = read_events(dir.path());
  for (int64_t job : jobs) CHECK(events.runs.at(job) == 1);
  CHECK(wait_until([&] { return enter_count(dir.path()) == 3; }, absl::Seconds(5)));

  auto next = map_within(pool, jobs_with(6, {}), {}, absl::Seconds(10));
  REQUIRE(next.ok());
  CHECK(*next == std::vector<int64_t>{0, 1, 4, 9, 16, 25});
  CHECK(pool.stats().workers_restarted == 1);
}

TEST_CASE("CallOptions.retries re-runs a task whose worker died") {
  TempDir dir;
  ProcessPool<FaultyWorker> pool(quiet({.workers = 2}), faulty_in(dir));

  SUBCASE("a task that kills its worker once succeeds on its second attempt") {
    // First of its chunk of 2: its chunk-mate 5 has not started when it dies, and is re-sent.
    const std::vector<int64_t> jobs = jobs_with(8, {{4, kKillOnce}});
    auto result = map_within(pool, jobs, {.chunksize = 2, .retries = 1}, absl::Seconds(10));
    REQUIRE_MESSAGE(result.ok(), result.status());
    CHECK((*result)[4] == 1900);
    for (size_t i = 0; i < jobs.size(); ++i) {
      if (i != 4) CHECK((*result)[i] == int64_t(i * i));
    }
    const Events events = read_events(dir.path());
    CHECK(events.runs.at(kKillOnce) == 2);
    for (int64_t job : jobs) {
      if (job != kKillOnce) CHECK(events.runs.at(job) == 1);
    }
    CHECK(wait_until([&] { return enter_count(dir.path()) == 3; }, absl::Seconds(5)));
  }
  SUBCASE("without retries the same task fails") {
    const std::vector<int64_t> jobs = jobs_with(8, {{4, kKillOnce}});
    auto result = map_within(pool, jobs, {.chunksize = 2}, absl::Seconds(10));
    CHECK(result.status().code() == absl::StatusCode::kAborted);
    CHECK(read_events(dir.path()).runs.at(kKillOnce) == 1);
  }
  SUBCASE("a task that always kills its worker fails after 1 + retries runs") {
    const std::vector<int64_t> jobs = jobs_with(8, {{4, kAlwaysKill}});
    auto result = map_within(pool, jobs, {.chunksize = 2, .retries = 2}, absl::Seconds(10));
    CHECK(result.status().code() == absl::StatusCode::kAborted);
    CHECK(message_has(result.status(), "job 4: "));
    CHECK(read_events(dir.path()).runs.at(kAlwaysKill) == 3);
  }
}

// ============================================================================================
// 2. Encoding failures never hang.

struct CodecWorker {
  testing::Brittle run(const testing::Picky& job) { return testing::Brittle{job.value}; }
};

struct LengthWorker {
  int64_t run(const testing::LargePicky& job) { return static_cast<int64_t>(job.payload.size()); }
};

TEST_CASE("a job that cannot be encoded after large ones fails alone; its batch-mates all run") {
  // Ten 1 MiB jobs go into the worker's shared region before the eleventh fails to encode; the
  // batch is built again without it, then cut at the region's budget per batch. Every good job
  // must run, and only the poisoned one fail.
  OutcomePool<LengthWorker> pool(quiet({.workers = 1}),
                                 [] { return std::make_unique<LengthWorker>(); });
  std::vector<testing::LargePicky> jobs;
  for (int i = 0; i < 14; ++i) {
    jobs.push_back({std::string((size_t{1} << 20) + static_cast<size_t>(i), 'x'), i == 10});
  }
  auto call = pool.submit(jobs, {.chunksize = 16});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(30)));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    const auto& outcome = (*call)->outcome(i);
    if (jobs[i].poison) {
      CHECK(outcome.status().code() == absl::StatusCode::kInvalidArgument);
      CHECK(message_has(outcome.status(), "the poisoned job cannot be encoded"));
    } else {
      CHECK(outcome.value_or(-1) == static_cast<int64_t>(jobs[i].payload.size()));
    }
  }
}

TEST_CASE("encoding and decoding failures fail their task alone and never hang") {
  using testing::Picky;
  OutcomePool<CodecWorker> pool(quiet({.workers = 2}), [] { return std::make_unique<CodecWorker>(); });
  // 13: the worker cannot encode the result; 7: the parent cannot decode the result;
  // -1: the worker cannot decode the job; 99: the parent cannot encode the job.
  std::vector<Picky> jobs;
  for (int64_t v : {1, 13, 2, 7, 3, -1, 4, 99, 5, 6}) jobs.push_back({v});
  auto call = pool.submit(jobs, {.chunksize = 3});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(10)));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(jobs[i].value);
    CHECK((*call)->outcome_count(i) == 1);
    const auto& outcome = (*call)->outcome(i);
    switch (jobs[i].value) {
      case 13:
        CHECK(outcome.status().code() == absl::StatusCode::kInvalidArgument);
        CHECK(message_has(outcome.status(), "could not encode the result"));
        CHECK(message_has(outcome.status(), "13 cannot be encoded"));
        break;
      case 7:
        CHECK(outcome.status().code() == absl::StatusCode::kDataLoss);
        CHECK(message_has(outcome.status(), "7 cannot be decoded"));
        break;
      case -1:
        CHECK(outcome.status().code() == absl::StatusCode::kDataLoss);
        CHECK(message_has(outcome.status(), "could not decode the job"));
        break;
      case 99:
        CHECK(outcome.status().code() == absl::StatusCode::kInvalidArgument);
        CHECK(message_has(outcome.status(), "could not encode the job"));
        break;
      default:
        REQUIRE(outcome.ok());
        CHECK(outcome->value == jobs[i].value);
    }
  }
  // No worker died for any of it.
  CHECK(pool.stats().workers_restarted == 0);

  SUBCASE("through map: each failure is that job's error, and the pool carries on") {
    ProcessPool<CodecWorker> mapper(quiet({.workers = 2}));
    struct Case {
      int64_t bad;
      absl::StatusCode code;
    };
    for (Case c : {Case{13, absl::StatusCode::kInvalidArgument}, Case{7, absl::StatusCode::kDataLoss},
                   Case{-1, absl::StatusCode::kDataLoss},
                   Case{99, absl::StatusCode::kInvalidArgument}}) {
      CAPTURE(c.bad);
      std::vector<Picky> some = {{1}, {2}, {c.bad}, {4}};
      auto result = map_within(mapper, some, {}, absl::Seconds(10));
      CHECK(result.status().code() == c.code);
      CHECK(message_has(result.status(), "job 2: "));
      std::vector<Picky> fine = {{1}, {2}, {3}};
      auto ok = map_within(mapper, fine, {}, absl::Seconds(10));
      REQUIRE(ok.ok());
      CHECK((*ok)[2].value == 3);
    }
    CHECK(mapper.stats().workers_restarted == 0);
  }
}

// ============================================================================================
// 3. Per-task timeouts.

TEST_CASE("a task past its timeout fails with kDeadlineExceeded; its worker is replaced; other "
          "tasks are unaffected") {
  TempDir dir;
  LogCapture logs;
  const absl::Duration timeout = absl::Milliseconds(200);
  PoolOptions options{.workers = 2, .kill_grace = absl::Milliseconds(300)};
  CallOptions call_options{.chunksize = 1};
  SUBCASE("PoolOptions.task_timeout") { options.task_timeout = timeout; }
  SUBCASE("CallOptions.task_timeout") { call_options.task_timeout = timeout; }
  SUBCASE("CallOptions.task_timeout overrides a longer PoolOptions.task_timeout") {
    options.task_timeout = absl::Seconds(30);
    call_options.task_timeout = timeout;
  }
  options.log_sink = logs.sink();
  ProcessPool<FaultyWorker> pool(testing::on_link(options), faulty_in(dir));
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  const std::set<pid_t> before = live_worker_pids(pool.stats());

  const std::vector<int64_t> jobs = jobs_with(12, {{4, kHang}});
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, call_options, absl::Seconds(10));
  const absl::Duration took = absl::Now() - start;
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(message_has(result.status(), "job 4: "));
  CHECK(message_has(result.status(), "ran past its timeout of 200ms"));
  CHECK(took >= timeout);
  CHECK(took < timeout + absl::Seconds(2));

  const Events events = read_events(dir.path());
  const pid_t victim = events.last_runner.at(kHang);
  for (int64_t job : jobs) CHECK(events.runs.at(job) == 1);
  // SIGTERM was enough: the kill grace did not run out.
  CHECK(logs.contains(absl::StrCat("(pid ", victim, ") was killed by signal 15 (SIGTERM)")));
  CHECK(pool.stats().workers_restarted == 1);
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(5)));
  const std::set<pid_t> after = live_worker_pids(pool.stats());
  CHECK(before.count(victim) == 1);
  CHECK(after.count(victim) == 0);
  CHECK(after.size() == 2);
  auto next = map_within(pool, jobs_with(6, {}), call_options, absl::Seconds(10));
  REQUIRE(next.ok());
  CHECK(*next == std::vector<int64_t>{0, 1, 4, 9, 16, 25});
}

TEST_CASE("a per-call task_timeout longer than the pool's lets a slow task finish") {
  TempDir dir;
  ProcessPool<FaultyWorker> pool(quiet({.workers = 1, .task_timeout = absl::Milliseconds(100)}),
                                 faulty_in(dir));
  const std::vector<int64_t> jobs = {kSleep300ms, 2};
  SUBCASE("the pool's timeout applies by default") {
    auto result = map_within(pool, jobs, {}, absl::Seconds(10));
    CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
  }
  SUBCASE("the call's own timeout replaces it") {
    auto result = map_within(pool, jobs, {.task_timeout = absl::Seconds(5)}, absl::Seconds(10));
    REQUIRE(result.ok());
    CHECK(*result == std::vector<int64_t>{300, 4});
    CHECK(pool.stats().workers_restarted == 0);
  }
}

TEST_CASE("a timed-out task that ignores SIGTERM is SIGKILLed after kill_grace") {
  TempDir dir;
  LogCapture logs;
  const absl::Duration timeout = absl::Milliseconds(200);
  const absl::Duration grace = absl::Milliseconds(300);
  ProcessPool<FaultyWorker> pool(
      {.workers = 2, .task_timeout = timeout, .kill_grace = grace, .log_sink = logs.sink()},
      faulty_in(dir));
  const std::vector<int64_t> jobs = jobs_with(6, {{2, kIgnoreSigtermAndHang}});
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(10));
  const absl::Duration took = absl::Now() - start;
  CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(message_has(result.status(), "job 2: "));
  CHECK(took >= timeout + grace);
  CHECK(took < timeout + grace + absl::Seconds(2));
  const pid_t victim = read_events(dir.path()).last_runner.at(kIgnoreSigtermAndHang);
  CHECK(logs.contains(absl::StrCat("(pid ", victim, ") was killed by signal 9 (SIGKILL)")));
  CHECK(pool.stats().workers_restarted == 1);
  auto next = map_within(pool, jobs_with(4, {}), {}, absl::Seconds(10));
  CHECK(next.ok());
}

// ============================================================================================
// 4. Respawn storms are bounded, and only start failures count.

struct AlwaysCrashes {
  int64_t run(int64_t) {
    ::raise(SIGKILL);
    return 0;
  }
};

struct CrashesInEnter {
  void enter() { ::raise(SIGSEGV); }
  int64_t run(int64_t x) { return x; }
};

TEST_CASE("a worker type whose every task crashes fails every task, each with its own death; the "
          "pool never gives up") {
  int retries = 0;
  SUBCASE("no retries") {}
  SUBCASE("retries run each task again, then it fails") { retries = 2; }
  OutcomePool<AlwaysCrashes> pool(quiet({.workers = 2}),
                                  [] { return std::make_unique<AlwaysCrashes>(); });
  std::vector<int64_t> jobs(50, 1);
  const absl::Time start = absl::Now();
  auto call = pool.submit(jobs, {.chunksize = 1, .retries = retries});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(60)));
  MESSAGE("50 crashing tasks with retries = ", retries, ": ", absl::FormatDuration(absl::Now() - start));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    CHECK((*call)->outcome(i).status().code() == absl::StatusCode::kAborted);
    CHECK(message_has((*call)->outcome(i).status(), "signal 9"));
  }
  // Every attempt killed one worker, and each was replaced.
  CHECK(pool.stats().workers_restarted >= static_cast<int64_t>(jobs.size()) * (retries + 1) - 2);
  CHECK(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(5)));
}

TEST_CASE("workers that crash in enter() are restarted with growing delays; calls fail fast with "
          "the cause") {
  ProcessPool<CrashesInEnter> pool(quiet({.workers = 2,
                                          .respawn_delay = absl::Milliseconds(50),
                                          .respawn_max_delay = absl::Milliseconds(400)}));
  std::vector<int64_t> jobs = {1, 2, 3};
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {}, absl::Seconds(10));
  CHECK(absl::Now() - start < absl::Seconds(5));
  CHECK(result.status().code() == absl::StatusCode::kAborted);
  CHECK(message_has(result.status(), "before it was ready"));
  CHECK(message_has(result.status(), "signal 11"));
  // Two seconds of delays that double from 50 ms up to 400 ms: at most a handful of starts.
  absl::SleepFor(absl::Seconds(2));
  const int64_t restarted = pool.stats().workers_restarted;
  MESSAGE("restarts in about 2 s: ", restarted);
  CHECK(restarted >= 2);
  CHECK(restarted <= 20);
  pool.terminate();
  CHECK(wait_until([&] { return testing::worker_children().empty(); }, absl::Seconds(5)));
}

// ============================================================================================
// 5. Parent death.

// Reads one line from `fd` within `timeout`.
std::string read_line_within(int fd, absl::Duration timeout) {
  std::string line;
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now())) + 1;
    if (::poll(&p, 1, ms) <= 0) continue;
    char c;
    const ssize_t got = ::read(fd, &c, 1);
    if (got <= 0) break;
    if (c == '\n') return line;
    line.push_back(c);
  }
  return line;
}

// Becomes the reaper of orphaned descendants while alive, so a parent-death test can reap (and
// read the death of) the workers of a parent it killed, whatever PID namespace Bazel runs it in.
class SubreaperScope {
 public:
  SubreaperScope() { REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0); }
  ~SubreaperScope() { ::prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0); }
};

// Waits until `pid` is gone: reaped by us (we are its subreaper), or otherwise absent or a zombie.
// Returns its wait status when we reaped it.
bool wait_gone(pid_t pid, absl::Duration timeout, std::optional<int>* status) {
  return wait_until([&] {
    int wait_status = 0;
    const pid_t got = ::waitpid(pid, &wait_status, WNOHANG);
    if (got == pid) {
      *status = wait_status;
      return true;
    }
    return !process_alive(pid);
  }, timeout);
}

TEST_CASE("when the parent is SIGKILLed, every worker exits within a second") {
  std::string mode;
  SUBCASE("workers busy in long tasks") { mode = "busy"; }
  SUBCASE("workers idle") { mode = "idle"; }
  const std::string helper = testing::helper_program("parent_death_helper");
  REQUIRE(testing::file_exists(helper));
  SubreaperScope subreaper;

  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  const pid_t parent = ::fork();
  REQUIRE(parent >= 0);
  if (parent == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::execl(helper.c_str(), helper.c_str(), mode.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  const std::string line = read_line_within(out[0], absl::Seconds(20));
  ::close(out[0]);
  std::vector<pid_t> workers;
  for (absl::string_view word : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
    pid_t pid = 0;
    if (absl::SimpleAtoi(word, &pid)) workers.push_back(pid);
  }
  if (workers.size() != 2) {
    ::kill(parent, SIGKILL);
    int status = 0;
    ::waitpid(parent, &status, 0);
    // Reap what it left to us, so later tests do not count its workers as ours.
    wait_until([] { return ::waitpid(-1, nullptr, WNOHANG) < 0 && errno == ECHILD; },
               absl::Seconds(2));
    FAIL("the helper printed '", line, "' and ended with wait status ", status);
  }
  for (pid_t pid : workers) REQUIRE(process_alive(pid));

  REQUIRE(::kill(parent, SIGKILL) == 0);
  int parent_status = 0;
  REQUIRE(::waitpid(parent, &parent_status, 0) == parent);
  REQUIRE(WIFSIGNALED(parent_status));
  const absl::Time killed = absl::Now();
  for (pid_t pid : workers) {
    CAPTURE(pid);
    std::optional<int> status;
    CHECK(wait_gone(pid, absl::Seconds(1), &status));
    // Reparented to us and reaped by us: it died of PR_SET_PDEATHSIG (SIGKILL), or of the end of
    // file on its channel when it was idle.
    if (status) {
      CHECK(((WIFSIGNALED(*status) && WTERMSIG(*status) == SIGKILL) ||
             (WIFEXITED(*status) && WEXITSTATUS(*status) == 0)));
    }
  }
  MESSAGE(mode, ": every worker gone ", absl::FormatDuration(absl::Now() - killed),
          " after the parent's SIGKILL");
  // Nothing of theirs is left: what else the helper's pool had (its fork server) was reparented
  // to us as well and ends too, maybe a little later on a busy machine. Reaped here, or it would
  // stay our zombie and count as a worker in the cases that follow.
  CHECK(wait_until([] {
    while (::waitpid(-1, nullptr, WNOHANG) > 0) {
    }
    return testing::worker_children().empty();
  }, absl::Seconds(2)));
}

// Returns its own pid: tells which process served a task.
struct PidWorker {
  int64_t run(int64_t job) {
    if (job < 0) ::raise(SIGKILL);
    return getpid();
  }
};

// Waits until thread `tid` of this process has fully exited (its /proc entry is gone). The kernel
// delivers PR_SET_PDEATHSIG in the exiting thread's last steps, after join() may already have
// returned, so this is the moment a wrongly tied worker would certainly be dead.
void wait_thread_gone(pid_t tid) {
  REQUIRE(wait_until([&] {
    return !testing::file_exists(absl::StrCat("/proc/self/task/", tid));
  }, absl::Seconds(5)));
}

TEST_CASE("workers outlive the short-lived thread that created the pool, or that caused a respawn") {
  SUBCASE("control: a child forked by a short-lived thread with PR_SET_PDEATHSIG dies with it") {
    // Proves the premise of the cases below: the kernel ties PR_SET_PDEATHSIG to the thread.
    pid_t child = 0;
    pid_t tid = 0;
    std::thread maker([&] {
      tid = static_cast<pid_t>(::gettid());
      int ready[2];
      REQUIRE(::pipe2(ready, O_CLOEXEC) == 0);
      child = ::fork();
      if (child == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        (void)!::write(ready[1], "x", 1);
        while (true) ::pause();
      }
      char c;
      (void)!::read(ready[0], &c, 1);  // the child has armed its death signal
      ::close(ready[0]);
      ::close(ready[1]);
    });
    maker.join();
    wait_thread_gone(tid);
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
  }

  SUBCASE("the pool is created on a thread that then exits") {
    std::unique_ptr<ProcessPool<PidWorker>> pool;
    std::set<pid_t> pids;
    pid_t tid = 0;
    std::thread maker([&] {
      tid = static_cast<pid_t>(::gettid());
      pool = std::make_unique<ProcessPool<PidWorker>>(quiet({.workers = 2}));
      wait_until([&] { return all_serving(pool->stats()); });
      pids = live_worker_pids(pool->stats());
    });
    maker.join();
    wait_thread_gone(tid);
    REQUIRE(pids.size() == 2);
    for (pid_t pid : pids) CHECK(process_alive(pid));
    // The same two processes serve a map from the main thread.
    std::vector<int64_t> jobs(20, 1);
    auto served = map_within(*pool, jobs, {.chunksize = 1}, absl::Seconds(10));
    REQUIRE(served.ok());
    for (int64_t pid : *served) CHECK(pids.count(static_cast<pid_t>(pid)) == 1);
    CHECK(pool->stats().workers_restarted == 0);
    CHECK(live_worker_pids(pool->stats()) == pids);
  }

  SUBCASE("a respawn is triggered by a map on a thread that then exits") {
    ProcessPool<PidWorker> pool(quiet({.workers = 2}));
    pid_t tid = 0;
    std::thread user([&] {
      tid = static_cast<pid_t>(::gettid());
      std::vector<int64_t> jobs = {1, -1, 2, 3};
      auto result = pool.map(jobs, {.chunksize = 1});
      CHECK(result.status().code() == absl::StatusCode::kAborted);
      wait_until([&] { return all_serving(pool.stats()) && pool.stats().workers_restarted == 1; });
    });
    user.join();
    wait_thread_gone(tid);
    REQUIRE(pool.stats().workers_restarted == 1);
    const std::set<pid_t> pids = live_worker_pids(pool.stats());
    REQUIRE(pids.size() == 2);
    for (pid_t pid : pids) CHECK(process_alive(pid));
    std::vector<int64_t> jobs(20, 1);
    auto served = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(10));
    REQUIRE(served.ok());
    for (int64_t pid : *served) CHECK(pids.count(static_cast<pid_t>(pid)) == 1);
    CHECK(pool.stats().workers_restarted == 1);
  }
}

// ============================================================================================
// 6. Never wait forever.

// Job: a large string. A job starting with "STOP" SIGSTOPs its own worker mid-task.
struct BigJobWorker {
  int64_t run(const std::string& job) {
    if (job.rfind("STOP", 0) == 0) ::raise(SIGSTOP);
    return static_cast<int64_t>(job.size());
  }
};

std::vector<std::string> big_jobs(size_t count, size_t stopper) {
  std::vector<std::string> jobs;
  for (size_t i = 0; i < count; ++i) {
    std::string job(size_t{4} << 20, static_cast<char>('a' + i % 26));
    if (i == stopper) job.replace(0, 4, "STOP");
    jobs.push_back(std::move(job));
  }
  return jobs;
}

TEST_CASE("a worker SIGSTOPped mid-task while 4 MiB jobs queue up for it: its task times out, "
          "SIGKILL (not SIGTERM) ends it, map returns") {
  LogCapture logs;
  // Long enough for a 4 MiB job on a loaded machine over TCP (300 ms timed out healthy jobs at a
  // load average of 20).
  const absl::Duration timeout = absl::Seconds(1);
  const absl::Duration grace = absl::Milliseconds(200);
  OutcomePool<BigJobWorker> pool(
      {.workers = 2, .task_timeout = timeout, .kill_grace = grace, .log_sink = logs.sink()},
      [] { return std::make_unique<BigJobWorker>(); });
  const std::vector<std::string> jobs = big_jobs(8, 1);
  const absl::Time start = absl::Now();
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(10)));
  const absl::Duration took = absl::Now() - start;
  MESSAGE("8 x 4 MiB jobs, one worker stopped: every outcome in ", absl::FormatDuration(took));
  CHECK(took < timeout + grace + absl::Seconds(3));
  CHECK((*call)->outcome(1).status().code() == absl::StatusCode::kDeadlineExceeded);
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    if (i != 1) CHECK((*call)->outcome(i).value_or(-1) == int64_t{4} << 20);
  }
  // A stopped process keeps a SIGTERM pending: only the SIGKILL after the grace ended it.
  CHECK(logs.contains("was killed by signal 9 (SIGKILL)"));
  CHECK(pool.stats().workers_restarted == 1);
}

// SIGSTOPs an idle worker of a `workers`-worker pool with a 300 ms task timeout, then maps
// `count` 4 MiB jobs with chunksize 1: each task succeeds or fails kDeadlineExceeded, and the
// call ends within `settle`. Returns the pool's restarts.
int64_t map_past_a_stopped_idle_worker(int workers, size_t count, absl::Duration settle) {
  OutcomePool<BigJobWorker> pool(quiet({.workers = workers,
                                        .join_timeout = absl::Seconds(1),
                                        .task_timeout = absl::Milliseconds(300),
                                        .kill_grace = absl::Milliseconds(200)}),
                                 [] { return std::make_unique<BigJobWorker>(); });
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  const pid_t stopped = pool.stats().workers[0].pid;
  REQUIRE(stopped > 0);  // kill(0, ...) would stop this whole process group
  REQUIRE(::kill(stopped, SIGSTOP) == 0);
  REQUIRE(wait_until([&] { return testing::process_state(stopped) == 'T'; }));
  const std::vector<std::string> jobs = big_jobs(count, 99);
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  const bool settled = (*call)->wait(settle);
  ::kill(stopped, SIGCONT);  // whatever happened, let the pool shut down
  REQUIRE(settled);
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    const auto& outcome = (*call)->outcome(i);
    CHECK((outcome.ok() || outcome.status().code() == absl::StatusCode::kDeadlineExceeded));
  }
  return pool.stats().workers_restarted;
}

TEST_CASE("a worker SIGSTOPped while idle does not hold tasks forever when a task timeout is set") {
  map_past_a_stopped_idle_worker(2, 6, absl::Seconds(5));
}

// A worker host (what the pool launched) that is SIGSTOPped never ends on its own: once join()
// has given up on its worker, the pool's destructor sends it SIGTERM and SIGKILL after kill_grace
// each, as it does a worker. It waited a fixed 2 s and then 1 s.
TEST_CASE("after join(), the destructor stops a SIGSTOPped worker host within a few kill_graces") {
  if (!testing::remote_link()) {
    MESSAGE("remote only: a forked pool's stopped worker is the case below");
    return;
  }
  const absl::Duration grace = absl::Milliseconds(200);
  absl::Time start;
  pid_t host = 0;
  {
    ProcessPool<PidWorker> pool(
        quiet({.workers = 2, .join_timeout = absl::Milliseconds(300), .kill_grace = grace}));
    REQUIRE(map_within(pool, std::vector<int64_t>(10, 1), {}, absl::Seconds(10)).ok());
    REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
    const pid_t worker = pool.stats().workers[1].pid;
    REQUIRE(worker > 0);
    host = testing::parent_of(worker);
    REQUIRE(host > 1);
    REQUIRE(host != ::getpid());
    REQUIRE(::kill(host, SIGSTOP) == 0);
    REQUIRE(wait_until([&] { return testing::process_state(host) == 'T'; }));
    REQUIRE(pool.close().ok());
    CHECK(pool.join().code() == absl::StatusCode::kDeadlineExceeded);
    start = absl::Now();
  }
  const absl::Duration took = absl::Now() - start;
  MESSAGE("the destructor after join took ", absl::FormatDuration(took));
  CHECK(took < 3 * grace + absl::Seconds(1));
  CHECK_FALSE(process_alive(host));
}

// With no other worker, the stall rule hands what it took back to the same stopped worker: the
// timeout still counts from when that worker stopped starting tasks, not from each hand-back.
TEST_CASE("the only worker, SIGSTOPped while idle, is replaced at the task timeout") {
  CHECK(map_past_a_stopped_idle_worker(1, 3, absl::Seconds(10)) >= 1);
}

TEST_CASE("join() with a SIGSTOPped worker returns within join_timeout + kill_grace and names it") {
  const absl::Duration join_timeout = absl::Milliseconds(300);
  const absl::Duration grace = absl::Milliseconds(200);
  ProcessPool<PidWorker> pool(
      quiet({.workers = 2, .join_timeout = join_timeout, .kill_grace = grace}));
  std::vector<int64_t> jobs(10, 1);
  REQUIRE(map_within(pool, jobs, {}, absl::Seconds(10)).ok());
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  const pid_t stopped = pool.stats().workers[1].pid;
  REQUIRE(stopped > 0);  // kill(0, ...) would stop this whole process group
  REQUIRE(::kill(stopped, SIGSTOP) == 0);
  REQUIRE(wait_until([&] { return testing::process_state(stopped) == 'T'; }));
  REQUIRE(pool.close().ok());
  const absl::Time start = absl::Now();
  const absl::Status joined = pool.join();
  const absl::Duration took = absl::Now() - start;
  MESSAGE("join with a stopped worker took ", absl::FormatDuration(took));
  CHECK(joined.code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(message_has(joined, "worker 1"));
  CHECK(message_has(joined, absl::StrCat("(pid ", stopped, ")")));
  CHECK(message_has(joined, "join_timeout"));
  CHECK_FALSE(message_has(joined, "worker 0"));
  CHECK(took >= join_timeout);
  CHECK(took < join_timeout + grace + absl::Seconds(1));
  CHECK(testing::worker_children().empty());
}

// ============================================================================================
// 7. Bad frames.

// Job codes for FrameVandal; others return their decimal string.
constexpr int64_t kGarbage = -1;        // bytes that cannot start a frame
constexpr int64_t kMalformed = -2;      // a well-framed message whose root pointer is garbage
constexpr int64_t kWrongBatch = -3;     // a valid FromWorker frame reporting a batch never sent
constexpr int64_t kOversized = -4;      // a segment table declaring 8 MiB (limit: 1 MiB)
constexpr int64_t kHugeResult = -5;     // a legitimate result of 2 MiB (limit: 1 MiB)
constexpr int64_t kTruncated = -6;      // a table declaring 100 words, 3 sent, then _exit(0)
// Results for the task it runs (forged_results below), then it waits to be stopped:
constexpr int64_t kWordResults = -7;    // as raw words, though its call's jobs were not words
constexpr int64_t kOutcomeOutOfBounds = -8;  // an `ok` outcome pointing out of the frame
constexpr int64_t kFlippedResults = -1000;   // minus a seed: its own result, with bits flipped

constexpr size_t kSmallFrameLimit = size_t{1} << 20;

struct FrameVandal {
  FrameVandal() : dir_(FaultyWorker::fault_dir()) {}

  // The results frame an honest worker sends for task 0 of the pool's first batch (batches are
  // numbered from 1), with the value `value`: check_forged_results runs its bad job there.
  static void forged_results(capnp::MallocMessageBuilder& message, const std::string& value) {
    auto results = message.initRoot<wire::FromWorker>().initResults();
    results.setSeq(1);
    results.setStart(0);
    results.setCount(1);
    results.initOutcomes(1)[0].initOk().setBytes(
        capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(value.data()), value.size()));
  }

  std::string run(int64_t job) {
    testing::append_line(dir_ + "/events", absl::StrCat("run ", getpid(), " ", job));
    if (job <= kFlippedResults) {
      capnp::MallocMessageBuilder message;
      forged_results(message, absl::StrCat(job));
      kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
      auto bytes = words.asBytes();
      std::mt19937 random(static_cast<uint32_t>(kFlippedResults - job));
      const int flips = 1 + static_cast<int>(random() % 4);
      for (int i = 0; i < flips; ++i) {
        const size_t bit = random() % (bytes.size() * 8);
        bytes[bit / 8] ^= static_cast<capnp::byte>(1u << (bit % 8));
      }
      write_all(kWorkerChannelFd, bytes.begin(), bytes.size());
      while (true) ::pause();
    }
    switch (job) {
      case kWordResults: {
        capnp::MallocMessageBuilder message;
        auto results = message.initRoot<wire::FromWorker>().initResults();
        results.setSeq(1);
        results.setStart(0);
        results.setCount(1);
        results.setWordKind(wire::WordKind::INTS);
        const uint64_t word = 42;
        results.setWordResults(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(&word), 8));
        capnp::writeMessageToFd(kWorkerChannelFd, message);
        while (true) ::pause();
      }
      case kOutcomeOutOfBounds: {
        capnp::MallocMessageBuilder message;
        forged_results(message, "x");
        // The outcome's pointer (right after its one-word data section, the union's tag) now
        // points half a billion words on: a struct pointer's offset is its bits 2..31 (signed).
        auto outcome = message.getRoot<wire::FromWorker>().getResults().getOutcomes()[0];
        auto* pointer = reinterpret_cast<uint64_t*>(
            capnp::AnyStruct::Builder(std::move(outcome)).getDataSection().end());
        *pointer = (*pointer & ~uint64_t{0xffffffff}) | (uint64_t{0x1fffffff} << 2);
        capnp::writeMessageToFd(kWorkerChannelFd, message);
        while (true) ::pause();
      }
      case kGarbage: {
        const char garbage[] = "\xde\xad\xbe\xef garbage, not a frame \xff\xff\xff\xff";
        write_all(kWorkerChannelFd, garbage, sizeof(garbage));
        while (true) ::pause();
      }
      case kMalformed: {
        // One segment of two words: a struct pointer far out of bounds, then junk.
        const uint32_t table[2] = {0, 2};
        const uint64_t words[2] = {0x7ffffff0'00010000ull, 0xffffffff'ffffffffull};
        write_all(kWorkerChannelFd, table, sizeof(table));
        write_all(kWorkerChannelFd, words, sizeof(words));
        while (true) ::pause();
      }
      case kWrongBatch: {
        capnp::MallocMessageBuilder message;
        auto results = message.initRoot<wire::FromWorker>().initResults();
        results.setSeq(0x7eadbeef);
        results.setStart(0);
        results.initOutcomes(1)[0].initOk().setBytes(capnp::Data::Reader(
            reinterpret_cast<const capnp::byte*>("forged"), 6));
        capnp::writeMessageToFd(kWorkerChannelFd, message);
        while (true) ::pause();
      }
      case kOversized: {
        const uint32_t table[2] = {0, uint32_t{1} << 20};  // 2^20 words = 8 MiB
        write_all(kWorkerChannelFd, table, sizeof(table));
        while (true) ::pause();
      }
      case kHugeResult:
        return std::string(size_t{2} << 20, 'x');
      case kTruncated: {
        const uint32_t table[2] = {0, 100};
        const uint64_t words[3] = {0, 0, 0};
        write_all(kWorkerChannelFd, table, sizeof(table));
        write_all(kWorkerChannelFd, words, sizeof(words));
        ::_exit(0);
      }
      default:
        return absl::StrCat(job);
    }
  }

  std::string dir_;
};

// A FrameVandal pool's options: over TCP, the bytes its worker writes by hand must reach the
// frame decoder, not TLS (which refuses them as a bad record, also kDataLoss: remote_tls_test
// covers that), so its links are plaintext, which a loopback pool may use.
PoolOptions vandal_options(PoolOptions options) {
  if (options.remote) options.remote->encrypt = false;
  return options;
}

// Runs jobs 0..9 with `bad` at index 4 through a pool with a 1 MiB frame limit; checks that only
// task 4 fails, with kDataLoss, and that its worker is replaced.
void check_bad_frame(int64_t bad, absl::string_view expected_message) {
  TempDir dir;
  ::setenv("PROCPOOL_FAULT_DIR", dir.path().c_str(), 1);
  OutcomePool<FrameVandal> pool(
      vandal_options(quiet({.workers = 2, .max_frame_bytes = kSmallFrameLimit})),
      [] { return std::make_unique<FrameVandal>(); });
  const std::vector<int64_t> jobs = jobs_with(10, {{4, bad}});
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(10)));
  const absl::Status& failed = (*call)->outcome(4).status();
  CHECK(failed.code() == absl::StatusCode::kDataLoss);
  CHECK(message_has(failed, expected_message));
  MESSAGE("task 4: ", failed.ToString());
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    if (i != 4) CHECK((*call)->outcome(i).value_or("?") == absl::StrCat(i));
  }
  const Events events = read_events(dir.path());
  for (int64_t job : jobs) CHECK(events.runs.at(job) == 1);
  CHECK(pool.stats().workers_restarted == 1);
  CHECK(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(5)));
  CHECK(live_worker_pids(pool.stats()).count(events.last_runner.at(bad)) == 0);
  // The pool carries on.
  auto again = pool.submit(jobs_with(4, {}), {.chunksize = 1});
  REQUIRE(again.ok());
  REQUIRE((*again)->wait(absl::Seconds(10)));
  for (size_t i = 0; i < 4; ++i) CHECK((*again)->outcome(i).value_or("?") == absl::StrCat(i));
}

TEST_CASE("a worker that writes a bad frame fails its task with kDataLoss and is replaced") {
  SUBCASE("garbage bytes") { check_bad_frame(kGarbage, "sent a bad frame"); }
  SUBCASE("a well-framed message with a garbage root pointer") {
    check_bad_frame(kMalformed, "sent a malformed frame");
  }
  SUBCASE("a valid frame reporting a batch it was never sent") {
    check_bad_frame(kWrongBatch, "not running");
  }
  SUBCASE("a segment table declaring more than max_frame_bytes") {
    check_bad_frame(kOversized, "max_frame_bytes");
  }
}

TEST_CASE("a result larger than max_frame_bytes fails its task with kResourceExhausted; its worker "
          "lives") {
  TempDir dir;
  ::setenv("PROCPOOL_FAULT_DIR", dir.path().c_str(), 1);
  OutcomePool<FrameVandal> pool(quiet({.workers = 2, .max_frame_bytes = kSmallFrameLimit}),
                                [] { return std::make_unique<FrameVandal>(); });
  const std::vector<int64_t> jobs = jobs_with(10, {{4, kHugeResult}});
  auto call = pool.submit(jobs, {.chunksize = 3});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(10)));
  const absl::Status& failed = (*call)->outcome(4).status();
  MESSAGE("task 4: ", failed.ToString());
  CHECK(failed.code() == absl::StatusCode::kResourceExhausted);
  CHECK(message_has(failed, "max_frame_bytes"));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    if (i != 4) CHECK((*call)->outcome(i).value_or("?") == absl::StrCat(i));
  }
  CHECK(pool.stats().workers_restarted == 0);
}

TEST_CASE("a truncated frame followed by the worker's exit fails its task with kDataLoss") {
  check_bad_frame(kTruncated, "truncated");
}

// One worker runs jobs 0..5 as one batch, `bad` first: it forges results for it (seq 1, start
// 0) and waits. The call must end, however the frame is made, with task 0 failed and the rest
// run elsewhere. Returns task 0's outcome.
absl::StatusOr<std::string> check_forged_results(int64_t bad) {
  TempDir dir;
  ::setenv("PROCPOOL_FAULT_DIR", dir.path().c_str(), 1);
  OutcomePool<FrameVandal> pool(vandal_options(quiet({.workers = 1,
                                                      .task_timeout = absl::Seconds(2),
                                                      .frame_timeout = absl::Seconds(1)})),
                                [] { return std::make_unique<FrameVandal>(); });
  const std::vector<int64_t> jobs = jobs_with(6, {{0, bad}});
  auto call = pool.submit(jobs, {.chunksize = jobs.size()});
  REQUIRE(call.ok());
  const bool ended = (*call)->wait(absl::Seconds(60));
  if (!ended) pool.core().terminate();  // so that the test fails instead of hanging
  REQUIRE_MESSAGE(ended, "the call never ended after job ", bad, "'s forged results");
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    if (i != 0) CHECK((*call)->outcome(i).value_or("?") == absl::StrCat(i));
  }
  MESSAGE("job ", bad, ": task 0: ", (*call)->outcome(0).status());
  return (*call)->outcome(0);
}

TEST_CASE("results a worker forges end the call: the task it ran fails kDataLoss, the rest run "
          "elsewhere") {
  SUBCASE("word results for a call whose jobs are not words") {
    const absl::Status failed = check_forged_results(kWordResults).status();
    CHECK(failed.code() == absl::StatusCode::kDataLoss);
    CHECK(message_has(failed, "word results"));
  }
  SUBCASE("an outcome whose pointer is out of bounds") {
    CHECK(check_forged_results(kOutcomeOutOfBounds).status().code() ==
          absl::StatusCode::kDataLoss);
  }
}

TEST_CASE("a results frame with flipped bits ends the call; the tasks its worker did not run "
          "succeed") {
  for (int64_t seed = 1; seed <= 12; ++seed) {
    CAPTURE(seed);
    (void)check_forged_results(kFlippedResults - seed);
  }
}

struct StringEcho {
  int64_t run(const std::string& job) { return static_cast<int64_t>(job.size()); }
};

TEST_CASE("a job larger than max_frame_bytes fails alone and the pool carries on") {
  ProcessPool<StringEcho> pool(quiet({.workers = 2, .max_frame_bytes = kSmallFrameLimit}));
  std::vector<std::string> jobs = {"a", std::string(size_t{2} << 20, 'x'), "ccc"};
  auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(10));
  REQUIRE_FALSE(result.ok());
  MESSAGE("a 2 MiB job with max_frame_bytes = 1 MiB: ", result.status());
  CHECK(message_has(result.status(), "job 1: "));
  CHECK(result.status().code() == absl::StatusCode::kResourceExhausted);
  std::vector<std::string> fine = {"a", "bb"};
  auto next = map_within(pool, fine, {}, absl::Seconds(10));
  REQUIRE_MESSAGE(next.ok(), next.status());
  CHECK(*next == std::vector<int64_t>{1, 2});
}

}  // namespace
}  // namespace procpool
