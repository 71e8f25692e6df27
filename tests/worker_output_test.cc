// Seeing inside workers: PoolOptions::worker_output (a worker's stdout and stderr, line by line,
// to the log sink) and procpool::log (records from worker code, before the task's outcome).
// Real workers writing to real pipes: forked, fork-server, and remote (this binary, launched over
// loopback).

#include "procpool/logging.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "doctest/doctest.h"
#include "procpool/procpool.h"
#include "tests/fault_support.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

// A job is mode + 10 * n.
enum Mode : int64_t {
  kPrintBoth = 0,    // "out n" to stdout (printf), "err n" to stderr
  kPrintAndDie = 1,  // two lines and a last one without a newline, then SIGKILL
  kLongLine = 2,     // one line of n 'x'
  kManyLines = 3,    // n lines "line i" (printf)
  kLog = 4,          // procpool::log(kWarning, "log n")
};

int64_t job(Mode mode, int64_t n) { return mode + 10 * n; }

struct Printer {
  void enter() { procpool::log(LogSeverity::kInfo, "entered"); }
  int64_t run(int64_t job) {
    const int64_t n = job / 10;
    switch (job % 10) {
      case kPrintBoth:
        std::printf("out %lld\n", static_cast<long long>(n));
        std::fprintf(stderr, "err %lld\n", static_cast<long long>(n));
        break;
      case kPrintAndDie:
        (void)!::write(STDOUT_FILENO, "last words\nreally last\n", 23);
        (void)!::write(STDOUT_FILENO, "no newline", 10);
        ::raise(SIGKILL);
        break;
      case kLongLine: {
        const std::string line(static_cast<size_t>(n), 'x');
        std::printf("%s\n", line.c_str());
        break;
      }
      case kManyLines:
        for (int64_t i = 0; i < n; ++i) std::printf("line %lld\n", static_cast<long long>(i));
        break;
      case kLog:
        procpool::log(LogSeverity::kWarning, absl::StrCat("log ", n));
        break;
    }
    return n;
  }
  void exit() { std::printf("exit() ran in %d\n", static_cast<int>(::getpid())); }
};

PoolOptions remote(PoolOptions options) {
  options.remote = testing::self_launched(absl::Seconds(60), absl::Seconds(10));
  return options;
}

std::vector<std::string> messages(const std::vector<LogEvent>& events) {
  std::vector<std::string> lines;
  for (const LogEvent& event : events) lines.push_back(event.message);
  return lines;
}

void check_lines_of_every_job(PoolOptions options, bool remote_workers) {
  testing::LogCapture events;
  options.workers = 2;
  options.log_sink = events.sink();
  {
    ProcessPool<Printer> pool(options);
    std::vector<int64_t> jobs;
    for (int64_t n = 0; n < 50; ++n) jobs.push_back(job(kPrintBoth, n));
    REQUIRE(pool.map(jobs, {.chunksize = 1}).ok());
  }  // joined: every pipe was read to its end
  std::map<std::string, int> out_seen, err_seen;
  for (const LogEvent& event : events.from(LogSource::kStdout)) {
    if (absl::StartsWith(event.message, "exit() ran")) continue;
    ++out_seen[event.message];
    CHECK(event.severity == LogSeverity::kInfo);
    CHECK(event.worker >= 0);
    CHECK(event.worker < 2);
    CHECK(event.pid > 0);
    CHECK(absl::StartsWith(event.process, "procpool-w"));
    CHECK_FALSE(event.host.empty());
  }
  for (const LogEvent& event : events.from(LogSource::kStderr)) {
    ++err_seen[event.message];
    CHECK(event.severity == LogSeverity::kWarning);
  }
  for (int n = 0; n < 50; ++n) {
    CHECK(out_seen[absl::StrCat("out ", n)] == 1);
    CHECK(err_seen[absl::StrCat("err ", n)] == 1);
  }
  CHECK(out_seen.size() == 50);
  CHECK(err_seen.size() == 50);
  // exit() runs at join: what it printed arrives too, one line per worker.
  int exits = 0;
  for (const LogEvent& event : events.from(LogSource::kStdout)) {
    if (absl::StartsWith(event.message, "exit() ran in ")) ++exits;
  }
  CHECK(exits == 2);
  if (remote_workers) CHECK(events.from(LogSource::kStdout)[0].host != "");
}

TEST_CASE("forwarded output: every line of every task reaches the sink once, whole, attributed") {
  SUBCASE("forked workers") {
    check_lines_of_every_job({.worker_output = WorkerOutput::kForward}, false);
  }
  SUBCASE("fork-server workers") {
    check_lines_of_every_job(
        {.start_method = StartMethod::kForkServer, .worker_output = WorkerOutput::kForward}, false);
  }
  SUBCASE("remote workers forward by default (kAuto), through their relay") {
    check_lines_of_every_job(remote({}), true);
  }
}

TEST_CASE("forwarded output: lines written just before a crash, and a last one without a newline, are not lost") {
  for (const bool remote_workers : {false, true}) {
    CAPTURE(remote_workers);
    testing::LogCapture events;
    PoolOptions options{.workers = 1, .log_sink = events.sink(),
                        .worker_output = WorkerOutput::kForward};
    ProcessPool<Printer> pool(remote_workers ? remote(options) : options);
    absl::StatusOr<int64_t> died = pool.apply(job(kPrintAndDie, 0));
    REQUIRE_FALSE(died.ok());
    CHECK(died.status().code() == absl::StatusCode::kAborted);
    // Delivered before the death is reported, in the order written.
    const std::vector<std::string> out = messages(events.from(LogSource::kStdout));
    CHECK(out == std::vector<std::string>{"last words", "really last", "no newline"});
    const std::vector<LogEvent> all = events.events();
    size_t last_line = 0, death = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i].message == "no newline") last_line = i;
      if (all[i].source == LogSource::kPool && absl::StrContains(all[i].message, "SIGKILL")) death = i;
    }
    CHECK(last_line < death);
  }
}

TEST_CASE("forwarded output: a line over 64 KiB arrives in pieces of 64 KiB") {
  testing::LogCapture events;
  {
    ProcessPool<Printer> pool(
        {.workers = 1, .log_sink = events.sink(), .worker_output = WorkerOutput::kForward});
    REQUIRE(pool.apply(job(kLongLine, 100'000)).ok());
  }
  std::vector<std::string> out = messages(events.from(LogSource::kStdout));
  REQUIRE(out.size() == 3);  // two pieces, then exit()'s line
  CHECK(out[0] == std::string(65536, 'x'));
  CHECK(out[1] == std::string(100'000 - 65536, 'x'));
}

void check_many_lines(PoolOptions options) {
  // 100,000 lines from 2 workers: all of them, each worker's in the order it wrote them.
  testing::LogCapture events;
  options.workers = 2;
  options.log_sink = events.sink();
  {
    ProcessPool<Printer> pool(options);
    std::vector<int64_t> jobs = {job(kManyLines, 50'000), job(kManyLines, 50'000)};
    REQUIRE(pool.map(jobs, {.chunksize = 1}).ok());
  }
  std::map<int, int64_t> next_of_pid;
  int64_t lines = 0;
  for (const LogEvent& event : events.from(LogSource::kStdout)) {
    if (!absl::StartsWith(event.message, "line ")) continue;
    int64_t i = -1;
    REQUIRE(absl::SimpleAtoi(event.message.substr(5), &i));
    // A worker may run both jobs: its lines then go 0..49999 twice.
    int64_t& next = next_of_pid[event.pid];
    if (next == 50'000) next = 0;
    REQUIRE(i == next);
    ++next;
    ++lines;
  }
  CHECK(lines == 100'000);
}

TEST_CASE("forwarded output: 100,000 lines from 2 workers arrive complete and in each worker's order") {
  SUBCASE("forked") { check_many_lines({.worker_output = WorkerOutput::kForward}); }
  SUBCASE("remote") { check_many_lines(remote({})); }
}

TEST_CASE("inherited output (kInherit, and kAuto for forked workers) never reaches the sink") {
  for (WorkerOutput output : {WorkerOutput::kAuto, WorkerOutput::kInherit}) {
    testing::LogCapture events;
    {
      ProcessPool<Printer> pool({.workers = 1, .log_sink = events.sink(), .worker_output = output});
      REQUIRE(pool.apply(job(kPrintBoth, 7)).ok());
    }
    CHECK(events.from(LogSource::kStdout).empty());
    CHECK(events.from(LogSource::kStderr).empty());
  }
}

void check_log_before_outcome(PoolOptions options) {
  testing::LogCapture events;
  options.workers = 2;
  options.log_sink = events.sink();
  ProcessPool<Printer> pool(options);
  std::vector<int64_t> jobs;
  for (int64_t n = 0; n < 200; ++n) jobs.push_back(job(kLog, n));
  int64_t i = 0;
  for (absl::StatusOr<int64_t> result : pool.imap(jobs, {.chunksize = 3})) {
    REQUIRE(result.ok());
    REQUIRE(*result == i);
    // Its record reached the sink before its outcome reached us.
    bool found = false;
    for (const LogEvent& event : events.from(LogSource::kWorker)) {
      if (event.message != absl::StrCat("log ", i)) continue;
      found = true;
      CHECK(event.severity == LogSeverity::kWarning);
      CHECK(event.task.value_or(~uint64_t{0}) == static_cast<uint64_t>(i));
      CHECK(event.worker >= 0);
      CHECK(event.pid > 0);
      CHECK(absl::StartsWith(event.process, "procpool-w"));
    }
    REQUIRE(found);
    ++i;
  }
  CHECK(i == 200);
  // enter() logs outside any task. A worker that started late (a fork server's second) may have
  // run none of the tasks above, its record not in yet.
  auto entered = [&events] { return events.events([](const LogEvent& event) {
    return event.source == LogSource::kWorker && event.message == "entered";
  }); };
  CHECK(testing::wait_until([&] { return entered().size() >= 2; }, absl::Seconds(30)));
  for (const LogEvent& event : entered()) CHECK_FALSE(event.task.has_value());
}

TEST_CASE("procpool::log in a task reaches the sink, naming worker and task, before the task's outcome") {
  SUBCASE("forked") { check_log_before_outcome({}); }
  SUBCASE("fork server") { check_log_before_outcome({.start_method = StartMethod::kForkServer}); }
  SUBCASE("remote") { check_log_before_outcome(remote({})); }
}

TEST_CASE("procpool::log outside a worker writes to stderr as the default sink does") {
  testing::TempDir dir;
  const std::string path = dir.file("stderr");
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::FILE* file = std::freopen(path.c_str(), "w", stderr);
    if (file == nullptr) ::_exit(1);
    procpool::log(LogSeverity::kInfo, "said outside any pool");
    std::fflush(stderr);
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  const std::vector<std::string> lines = testing::read_lines(path);
  REQUIRE(lines.size() == 1);
  CHECK(absl::StrContains(lines[0], "info: said outside any pool"));
  CHECK(absl::StrContains(lines[0], absl::StrCat("pid ", child)));
}

}  // namespace
}  // namespace procpool
