// Seeing inside workers: PoolOptions::worker_output (a worker's stdout and stderr, line by line,
// to the log sink) and procpool::log (records from worker code, before the task's outcome).
// Real workers writing to real pipes: forked, fork-server, and remote (this binary, launched over
// loopback).

#include "procpool/logging.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
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
  kPattern = 5,      // pattern_line(0 .. n-1), in one write() of them all
  kFlood = 6,        // n MiB of 'x' without a newline, then one newline, in writes of 1 MiB
  kWholePieces = 7,  // a line of exactly 64 KiB, one of 128 KiB, then "after"
  kLogPieces = 8,    // procpool::log of views that do not end a string: "piece n", 100 KiB of 'P'
  kThreadLogs = 9,   // kLogThreads threads each procpool::log kLogsPerThread "n/thread/i", joined;
                     // n = kThenDie: one thread logs "last words of a thread", then SIGKILL
};

constexpr int64_t kThenDie = 1000;

constexpr int kLogThreads = 4;
constexpr int kLogsPerThread = 250;

int64_t job(Mode mode, int64_t n) { return mode + 10 * n; }

// Line i of kPattern: short ones of every length up to 300, an empty one now and then and a run
// of 2,000 of them (more lines than one read hands on in one call), and one of 150,000 bytes.
std::string pattern_line(int64_t i) {
  if (i % 10 == 0 || (i >= 3000 && i < 5000)) return "";
  if (i == 1234) return std::string(150'000, 'L');
  std::string line = absl::StrCat(i, ":");
  line.append(static_cast<size_t>((i * 7919) % 300), static_cast<char>('a' + i % 26));
  return line;
}

void write_all(std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t wrote = ::write(STDOUT_FILENO, bytes.data(), bytes.size());
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) ::_exit(3);
    bytes.remove_prefix(static_cast<size_t>(wrote));
  }
}

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
      case kPattern: {
        std::string all;
        for (int64_t i = 0; i < n; ++i) absl::StrAppend(&all, pattern_line(i), "\n");
        write_all(all);
        break;
      }
      case kFlood: {
        const std::string mebibyte(size_t{1} << 20, 'x');
        for (int64_t i = 0; i < n; ++i) write_all(mebibyte);
        write_all("\n");
        break;
      }
      case kWholePieces:
        write_all(std::string(65536, 'A') + "\n" + std::string(131072, 'B') + "\nafter\n");
        break;
      case kLogPieces: {
        // Views into longer strings: no NUL after their last byte.
        const std::string text = absl::StrCat("piece ", n, " and what follows it");
        procpool::log(LogSeverity::kInfo, std::string_view(text).substr(0, text.find(" and")));
        procpool::log(LogSeverity::kInfo, std::string(100 << 10, 'P'));
        procpool::log(LogSeverity::kInfo, absl::StrCat("after ", n));
        break;
      }
      case kThreadLogs: {
        if (n == kThenDie) {
          std::thread([] { procpool::log(LogSeverity::kError, "last words of a thread"); }).join();
          ::raise(SIGKILL);
        }
        std::vector<std::thread> threads;
        for (int t = 0; t < kLogThreads; ++t) {
          threads.emplace_back([n, t] {
            for (int i = 0; i < kLogsPerThread; ++i) {
              procpool::log(LogSeverity::kInfo, absl::StrCat(n, "/", t, "/", i));
            }
          });
        }
        for (std::thread& thread : threads) thread.join();
        // One more, after the task returned, while its worker waits for work: it is sent then,
        // not held until another task comes.
        std::thread([n] {
          absl::SleepFor(absl::Milliseconds(20));
          procpool::log(LogSeverity::kInfo, absl::StrCat(n, "/late"));
        }).detach();
        break;
      }
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
    // Both workers serve first: one still dialling at join would be ended unstarted, without an
    // exit() to print (remote workers come when they come).
    REQUIRE(testing::wait_until([&] { return testing::all_serving(pool.stats()); },
                                absl::Seconds(30)));
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

// Each task says its number three ways, and logs it: the log record's task is exact (it is
// stamped in the worker), so each line must name the same task.
struct Announcer {
  int64_t run(int64_t n) {
    write_all(absl::StrCat("raw ", n, "\n"));           // straight into the pipe
    std::printf("stdio %lld\n", static_cast<long long>(n));  // buffered, flushed with the result
    std::fprintf(stderr, "err %lld\n", static_cast<long long>(n));
    procpool::log(LogSeverity::kInfo, absl::StrCat("log ", n));
    return n;
  }
};

void check_lines_name_their_task(PoolOptions options) {
  testing::LogCapture events;
  options.workers = 1;
  options.log_sink = events.sink();
  constexpr int64_t kTasks = 40;
  {
    ProcessPool<Announcer> pool(options);
    // One at a time, as a caller that waits for each result does: quick tasks, back to back.
    for (int64_t n = 0; n < kTasks; ++n) REQUIRE(pool.apply(n).value_or(-1) == n);
  }
  std::map<int64_t, uint64_t> task_of;  // n -> the task its log record names
  for (const LogEvent& event : events.from(LogSource::kWorker)) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(absl::StripPrefix(event.message, "log "), &n)) continue;
    REQUIRE(event.task.has_value());
    task_of[n] = *event.task;
  }
  REQUIRE(task_of.size() == kTasks);
  int lines = 0;
  for (const LogSource source : {LogSource::kStdout, LogSource::kStderr}) {
    for (const LogEvent& event : events.from(source)) {
      const std::vector<std::string> words = absl::StrSplit(event.message, ' ');
      int64_t n = 0;
      if (words.size() != 2 || !absl::SimpleAtoi(words[1], &n)) continue;
      CAPTURE(event.message);
      ++lines;
      REQUIRE(event.task.has_value());
      CHECK(*event.task == task_of[n]);
    }
  }
  CHECK(lines == 3 * kTasks);
}

TEST_CASE("forwarded output: each line names the task that wrote it, when tasks run one at a time") {
  SUBCASE("forked workers") { check_lines_name_their_task({.worker_output = WorkerOutput::kForward}); }
  SUBCASE("fork-server workers") {
    check_lines_name_their_task(
        {.start_method = StartMethod::kForkServer, .worker_output = WorkerOutput::kForward});
  }
  SUBCASE("remote workers, through their relay") { check_lines_name_their_task(remote({})); }
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

// The lines of `job` a worker printed, without those exit() printed.
std::vector<std::string> stdout_lines_of(PoolOptions options, int64_t job) {
  testing::LogCapture events;
  options.workers = 1;
  options.log_sink = events.sink();
  {
    ProcessPool<Printer> pool(options);
    const absl::Status ran = pool.apply(job).status();
    INFO(ran.ToString());
    REQUIRE(ran.ok());
  }  // joined: its pipes were read to their end
  std::vector<std::string> lines;
  for (const LogEvent& event : events.from(LogSource::kStdout)) {
    if (!absl::StartsWith(event.message, "exit() ran in ")) lines.push_back(event.message);
  }
  return lines;
}

TEST_CASE("forwarded output: lines of every length, empty ones by the thousand, written at once, arrive each once and in order") {
  std::vector<std::string> expected;
  for (int64_t i = 0; i < 10'000; ++i) {
    const std::string line = pattern_line(i);
    for (size_t at = 0; at == 0 || at < line.size(); at += 65536) {
      expected.push_back(line.substr(at, 65536));
    }
  }
  SUBCASE("forked") {
    CHECK(stdout_lines_of({.worker_output = WorkerOutput::kForward}, job(kPattern, 10'000)) ==
          expected);
  }
  SUBCASE("remote") {
    CHECK(stdout_lines_of(remote({}), job(kPattern, 10'000)) == expected);
  }
}

TEST_CASE("forwarded output: a line of exactly 64 KiB is one line, one of 128 KiB two pieces, with no empty line after them") {
  const std::vector<std::string> expected = {std::string(65536, 'A'), std::string(65536, 'B'),
                                             std::string(65536, 'B'), "after"};
  SUBCASE("forked") {
    CHECK(stdout_lines_of({.worker_output = WorkerOutput::kForward}, job(kWholePieces, 0)) ==
          expected);
  }
  SUBCASE("remote") { CHECK(stdout_lines_of(remote({}), job(kWholePieces, 0)) == expected); }
}

// This process's resident memory now.
int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * ::sysconf(_SC_PAGESIZE);
}

TEST_CASE("forwarded output: a worker that floods its stdout without a newline is held back; the pool's memory stays bounded") {
  constexpr int64_t kMebibytes = 64;
  std::atomic<int64_t> pieces{0}, piece_bytes{0}, others{0}, peak{0};
  const int64_t before = resident_bytes();
  {
    ProcessPool<Printer> pool(
        {.workers = 1,
         .log_sink =
             [&](const LogEvent& event) {
               if (event.source != LogSource::kStdout) return;
               if (absl::StartsWith(event.message, "exit() ran in ")) return;
               if (event.message.size() == 65536 &&
                   std::all_of(event.message.begin(), event.message.end(),
                               [](char c) { return c == 'x'; })) {
                 ++pieces;
                 piece_bytes += static_cast<int64_t>(event.message.size());
               } else {
                 ++others;
               }
               const int64_t now = resident_bytes();
               if (now > peak) peak = now;
             },
         .worker_output = WorkerOutput::kForward});
    REQUIRE(pool.apply(job(kFlood, kMebibytes)).ok());
  }
  // Every byte, in pieces of 64 KiB, the newline at the end making no line of its own.
  CHECK(piece_bytes == kMebibytes << 20);
  CHECK(pieces == kMebibytes * 16);
  CHECK(others == 0);
  // What the worker wrote waited in its pipe, not here: a fraction of it at most.
  CHECK(peak - before < (kMebibytes << 20) / 4);
}

// While it lives, what this process writes to `fd` (1 or 2) goes to a file.
class Redirect {
 public:
  Redirect(int fd, const std::string& path) : fd_(fd), saved_(::dup(fd)) {
    std::fflush(nullptr);
    const int file = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    REQUIRE(saved_ >= 0);
    REQUIRE(file >= 0);
    REQUIRE(::dup2(file, fd_) == fd_);
    ::close(file);
  }
  ~Redirect() {
    std::fflush(nullptr);
    ::dup2(saved_, fd_);
    ::close(saved_);
  }

 private:
  const int fd_;
  const int saved_;
};

// The default sink (log_to_stderr) prints a forwarded line to the program's own stdout or
// stderr, where the worker wrote it, once, whole, with the worker's name before it. The pool
// hands it a read's lines at once (lib/output_sink.h); called line by line it prints the same.
TEST_CASE("forwarded output: the default sink prints each line once, where the worker wrote it, named after it") {
  PoolOptions options{.workers = 1, .worker_output = WorkerOutput::kForward};
  SUBCASE("the default sink") {}
  SUBCASE("log_to_stderr called by the program's own sink, a line at a time") {
    options.log_sink = [](const LogEvent& event) { log_to_stderr(event); };
  }
  testing::TempDir dir;
  const std::string out_path = dir.file("stdout"), err_path = dir.file("stderr");
  absl::Status ran;
  {
    Redirect out(STDOUT_FILENO, out_path);
    Redirect err(STDERR_FILENO, err_path);
    ProcessPool<Printer> pool(options);
    ran = pool.apply(job(kManyLines, 10'000)).status();
    if (ran.ok()) ran = pool.apply(job(kLongLine, 100'000)).status();
    if (ran.ok()) ran = pool.apply(job(kPrintBoth, 5)).status();
  }
  REQUIRE(ran.ok());
  const std::string name = "[procpool-w0] ";
  const std::vector<std::string> out = testing::read_lines(out_path);
  REQUIRE(out.size() == 10'000 + 2 + 2);
  for (size_t i = 0; i < 10'000; ++i) REQUIRE(out[i] == absl::StrCat(name, "line ", i));
  CHECK(out[10'000] == name + std::string(65536, 'x'));
  CHECK(out[10'001] == name + std::string(100'000 - 65536, 'x'));
  CHECK(out[10'002] == name + "out 5");
  CHECK(absl::StartsWith(out[10'003], name + "exit() ran in "));
  std::vector<std::string> err = testing::read_lines(err_path);
  // (The pool's own warnings, if any, go to stderr too.)
  err.erase(std::remove_if(err.begin(), err.end(),
                           [](const std::string& line) { return absl::StartsWith(line, "[procpool +"); }),
            err.end());
  CHECK(err == std::vector<std::string>{name + "err 5"});
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

void check_logs_from_threads(PoolOptions options) {
  testing::LogCapture events;
  options.workers = 2;
  options.log_sink = events.sink();
  ProcessPool<Printer> pool(options);
  std::vector<int64_t> jobs;
  for (int64_t n = 0; n < 6; ++n) jobs.push_back(job(kThreadLogs, n));
  int64_t n = 0;
  for (absl::StatusOr<int64_t> result : pool.imap(jobs, {.chunksize = 1})) {
    REQUIRE_MESSAGE(result.ok(), result.status().ToString());
    REQUIRE(*result == n);
    // Every record its threads logged reached the sink once, before its outcome reached us.
    std::map<std::string, int> seen;
    for (const LogEvent& event : events.from(LogSource::kWorker)) {
      if (!absl::StartsWith(event.message, absl::StrCat(n, "/")) ||
          absl::EndsWith(event.message, "/late")) {
        continue;
      }
      ++seen[event.message];
      CHECK(event.task.value_or(~uint64_t{0}) == static_cast<uint64_t>(n));
    }
    CHECK(seen.size() == size_t{kLogThreads} * kLogsPerThread);
    for (const auto& entry : seen) CHECK_MESSAGE(entry.second == 1, entry.first);
    ++n;
  }
  CHECK(n == 6);
  // Each task's late record, logged while its worker waited for work.
  auto late = [&events] {
    return events.events([](const LogEvent& event) {
      return event.source == LogSource::kWorker && absl::EndsWith(event.message, "/late");
    });
  };
  CHECK(testing::wait_until([&] { return late().size() == 6; }, absl::Seconds(30)));
}

TEST_CASE("procpool::log from several threads of a task at once: every record, once, before the task's outcome") {
  SUBCASE("forked") { check_logs_from_threads({}); }
  SUBCASE("remote") { check_logs_from_threads(remote({})); }
}

TEST_CASE("procpool::log from a thread of a forked worker that dies at once still reaches the sink") {
  testing::LogCapture events;
  ProcessPool<Printer> pool({.workers = 1, .log_sink = events.sink()});
  absl::StatusOr<int64_t> died = pool.apply(job(kThreadLogs, kThenDie));
  REQUIRE_FALSE(died.ok());
  CHECK(died.status().code() == absl::StatusCode::kAborted);
  // Before the death was reported: it waited where the pool reads what a dead worker left.
  CHECK(events.contains("last words of a thread"));
}

TEST_CASE("procpool::log takes any string_view: a piece of a longer string, and one over 64 KiB (cut)") {
  testing::LogCapture events;
  {
    ProcessPool<Printer> pool({.workers = 1, .log_sink = events.sink()});
    absl::StatusOr<int64_t> logged = pool.apply(job(kLogPieces, 5));
    REQUIRE_MESSAGE(logged.ok(), logged.status().ToString());
    CHECK(*logged == 5);
  }
  std::vector<std::string> records;
  for (const LogEvent& event : events.from(LogSource::kWorker)) {
    if (event.message != "entered") records.push_back(event.message);
  }
  REQUIRE(records.size() == 3);
  CHECK(records[0] == "piece 5");
  CHECK(records[1] == std::string(64 << 10, 'P'));
  CHECK(records[2] == "after 5");
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
