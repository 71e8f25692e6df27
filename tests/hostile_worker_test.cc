// Hostile workers: tasks that do to their own process what careless or hostile user code does
// (fork and return from both sides, scribble on or replace the channel, set signal handlers and
// timers, change limits): every call ends with a clear status, other tasks keep their values,
// nothing hangs, and the pool carries on.

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/logging.h"
#include "procpool/process_pool.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

constexpr int64_t kForkReturnBoth = -1;   // fork(); both processes return from run()
constexpr int64_t kGarbageChannel = -2;   // writes bytes that are no frame to the channel (fd 3)
constexpr int64_t kDevNullChannel = -3;   // dup2s /dev/null over the channel
constexpr int64_t kAlarmStorm = -4;       // SIGALRM handler without SA_RESTART, a 1 ms itimer
constexpr int64_t kBlockAll = -5;         // blocks every signal, returns
constexpr int64_t kNoFiles = -6;          // RLIMIT_NOFILE to 4, returns
constexpr int64_t kNonBlocking = -7;      // O_NONBLOCK on the channel
constexpr int64_t kThrowInForkChild = -8; // fork(); the child throws out of run()
constexpr int64_t kKillSelf = -9;         // SIGKILLs its own process
constexpr int64_t kForkChildExits = -12;  // fork(); the child calls exit(0), the task waits for it
constexpr int64_t kCloseOthers = -13;     // closes every descriptor of its worker above the channel
constexpr int64_t kCloseReopen = -14;     // the same, then opens /dev/zero on those numbers
constexpr int64_t kJoinPoolGroup = -15;   // moves into the pool's process group, then hangs
constexpr int64_t kLogFlood = -10;        // starts a thread that logs 4 KiB records without end
constexpr int64_t kLogFloodHere = -11;    // logs 4 KiB records for 1 s, then returns

void on_alarm(int) {}

struct Hostile {
  int64_t run(int64_t job) {
    switch (job) {
      case kForkReturnBoth:
        (void)::fork();
        return job;
      case kThrowInForkChild:
        if (::fork() == 0) throw std::runtime_error("from the child");
        return job;
      case kGarbageChannel: {
        const char garbage[] = "\xff\xff\xff\x7fnot a frame at all, just bytes";
        (void)!::write(3, garbage, sizeof(garbage));
        return job;
      }
      case kDevNullChannel: {
        const int null_fd = ::open("/dev/null", O_RDWR);
        ::dup2(null_fd, 3);
        ::close(null_fd);
        return job;
      }
      case kAlarmStorm: {
        struct sigaction action {};
        action.sa_handler = on_alarm;  // no SA_RESTART
        sigemptyset(&action.sa_mask);
        ::sigaction(SIGALRM, &action, nullptr);
        const itimerval every_ms{{0, 1000}, {0, 1000}};
        ::setitimer(ITIMER_REAL, &every_ms, nullptr);
        return job;
      }
      case kBlockAll: {
        sigset_t all;
        sigfillset(&all);
        ::sigprocmask(SIG_SETMASK, &all, nullptr);
        return job;
      }
      case kNoFiles: {
        const rlimit few{4, 4};
        ::setrlimit(RLIMIT_NOFILE, &few);
        return job;
      }
      case kForkChildExits: {
        const pid_t child = ::fork();
        if (child == 0) {
          std::printf("from the child\n");
          std::exit(0);  // destructors and atexit handlers of the worker's copy run
        }
        int status = 0;
        ::waitpid(child, &status, 0);
        return WIFEXITED(status) ? job : 1000;
      }
      case kCloseOthers:
        // As code about to exec, or a double close() that hits a number it does not own.
        for (int fd = 4; fd < 1024; ++fd) ::close(fd);
        return ::getpid();
      case kCloseReopen:
        for (int fd = 4; fd < 1024; ++fd) ::close(fd);
        for (int i = 0; i < 16; ++i) (void)::open("/dev/zero", O_RDONLY);  // always readable
        return ::getpid();
      case kJoinPoolGroup:
        ::setpgid(0, ::getpgid(::getppid()));
        absl::SleepFor(absl::Seconds(60));
        return job;
      case kKillSelf:
        ::kill(::getpid(), SIGKILL);
        return job;
      case kLogFlood:
        std::thread([] {
          const std::string record(4096, 'x');
          while (true) procpool::log(LogSeverity::kInfo, record);
        }).detach();
        return job;
      case kLogFloodHere: {
        const std::string record(4096, 'y');
        const absl::Time until = absl::Now() + absl::Seconds(1);
        while (absl::Now() < until) procpool::log(LogSeverity::kInfo, record);
        return job;
      }
      case kNonBlocking:
        ::fcntl(3, F_SETFL, ::fcntl(3, F_GETFL) | O_NONBLOCK);
        return job;
      default:
        return job * 2;
    }
  }
};

PoolOptions options(int workers) {
  PoolOptions options;
  options.workers = workers;
  options.log_sink = nullptr;
  options.frame_timeout = absl::Seconds(3);
  options.join_timeout = absl::Seconds(20);
  return options;
}

// The same over the listed path (strings are not sent as words).
struct HostileText {
  std::string run(const std::string& job) {
    if (job == "fork") {
      (void)::fork();
      return job;
    }
    return job + job;
  }
};

// Remote workers: this binary, launched over loopback (tests/test_main.cc serves).
PoolOptions remote(PoolOptions options) {
  options.remote = testing::self_launched(absl::Seconds(60), absl::Seconds(10));
  return options;
}

// Runs `hostile` among ordinary jobs, several times; each call must end, ordinary jobs keep their
// values, and the pool answers a plain call after.
void check_survives(int64_t hostile, bool hostile_may_succeed, bool hostile_succeeds = false,
                    bool remote_workers = false) {
  ProcessPool<Hostile> pool(remote_workers ? remote(options(2)) : options(2));
  // A fork's answers race the worker's: several rounds, so that one shows.
  const bool forks = hostile == kForkReturnBoth || hostile == kThrowInForkChild;
  for (int round = 0; round < (forks ? 8 : 3); ++round) {
    std::vector<AsyncResult<int64_t>> results;
    for (int64_t i = 0; i < 20; ++i) {
      results.push_back(pool.apply_async(i == 5 ? hostile : i, {.task_timeout = absl::Seconds(20)}));
    }
    for (int64_t i = 0; i < 20; ++i) {
      absl::StatusOr<int64_t> got = results[i].get();
      if (i == 5) {
        INFO("hostile task: " << got.status());
        if (!hostile_may_succeed) CHECK_FALSE(got.ok());
        if (hostile_succeeds) CHECK((got.ok() && *got == hostile));
        continue;
      }
      INFO("job " << i << ": " << got.status());
      REQUIRE(got.ok());
      CHECK(*got == i * 2);
    }
  }
  absl::StatusOr<std::vector<int64_t>> after = pool.map(std::vector<int64_t>{1, 2, 3, 4, 5, 6});
  REQUIRE(after.ok());
  CHECK(*after == std::vector<int64_t>{2, 4, 6, 8, 10, 12});
}

// The fork leaves as it returns into procpool: the worker's answer is the only one.
TEST_CASE("a task that forks and returns from both processes: its value and every other arrive") {
  check_survives(kForkReturnBoth, true, /*hostile_succeeds=*/true);
}
TEST_CASE("a task whose forked child throws: its value and every other arrive") {
  check_survives(kThrowInForkChild, true, /*hostile_succeeds=*/true);
}
// A remote worker's fork shares its TLS session too: its records would break the connection.
TEST_CASE("a remote task that forks and returns from both processes: its value and every other "
          "arrive") {
  check_survives(kForkReturnBoth, true, /*hostile_succeeds=*/true, /*remote_workers=*/true);
}
TEST_CASE("a listed task that forks and returns from both processes: every value arrives") {
  ProcessPool<HostileText> pool(options(2));
  for (int round = 0; round < 8; ++round) {
    std::vector<std::string> jobs;
    for (int i = 0; i < 20; ++i) jobs.push_back(i == 5 ? "fork" : absl::StrCat(i));
    absl::StatusOr<std::vector<std::string>> got = pool.map(jobs, {.task_timeout = absl::Seconds(20)});
    INFO(got.status());
    REQUIRE(got.ok());
    for (int i = 0; i < 20; ++i) CHECK((*got)[i] == (i == 5 ? "fork" : absl::StrCat(i, i)));
  }
}
// A pool made inside a worker forks workers of its own there: they serve, not leave.
struct Nesting {
  int64_t run(int64_t job) {
    ProcessPool<Hostile> inner(options(1));
    absl::StatusOr<std::vector<int64_t>> got = inner.map(std::vector<int64_t>{job, job + 1});
    return got.ok() ? (*got)[0] + (*got)[1] : -1000;
  }
};
TEST_CASE("a pool made inside a worker still works") {
  ProcessPool<Nesting> pool(options(1));
  absl::StatusOr<std::vector<int64_t>> got = pool.map(std::vector<int64_t>{1, 10});
  REQUIRE(got.ok());
  CHECK(*got == std::vector<int64_t>{6, 42});
}
TEST_CASE("a task whose forked child calls exit()") {
  check_survives(kForkChildExits, true, /*hostile_succeeds=*/true);
}
TEST_CASE("a task that writes garbage to the channel") { check_survives(kGarbageChannel, false); }
TEST_CASE("a task that puts /dev/null over the channel") { check_survives(kDevNullChannel, false); }
TEST_CASE("a task that starts a SIGALRM storm") { check_survives(kAlarmStorm, true); }
TEST_CASE("a task that blocks every signal") { check_survives(kBlockAll, true); }
TEST_CASE("a task that lowers RLIMIT_NOFILE") { check_survives(kNoFiles, true); }
TEST_CASE("a task that makes the channel non-blocking") { check_survives(kNonBlocking, true); }

// Hooks that fork and return from both processes: the worker starts once and leaves once.
struct ForkingHooks {
  bool fork_in_exit = false;
  void enter() { (void)::fork(); }
  int64_t run(int64_t job) { return job * 3; }
  void exit() {
    if (fork_in_exit) (void)::fork();
  }
};

TEST_CASE("enter() and exit() that fork and return from both processes: the pool serves, joins "
          "cleanly, and no worker start failed") {
  for (bool fork_in_exit : {false, true}) {
    CAPTURE(fork_in_exit);
    ProcessPool<ForkingHooks> pool(options(2), [fork_in_exit] {
      ForkingHooks hooks;
      hooks.fork_in_exit = fork_in_exit;
      return hooks;
    });
    for (int round = 0; round < 5; ++round) {
      std::vector<int64_t> jobs(200);
      for (size_t i = 0; i < jobs.size(); ++i) jobs[i] = static_cast<int64_t>(i);
      absl::StatusOr<std::vector<int64_t>> got = pool.map(jobs);
      INFO(got.status());
      REQUIRE(got.ok());
      for (size_t i = 0; i < jobs.size(); ++i) CHECK((*got)[i] == jobs[i] * 3);
    }
    for (const WorkerStats& worker : pool.stats().workers) CHECK(worker.restarts == 0);
    CHECK(pool.close().ok());
    const absl::Status joined = pool.join();
    CHECK_MESSAGE(joined.ok(), joined);
  }
}

// CPU seconds `pid` has used (user + system), from /proc/<pid>/stat.
double cpu_seconds(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const size_t after_name = text.rfind(')');
  if (after_name == std::string::npos) return -1;
  std::istringstream fields(text.substr(after_name + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

TEST_CASE("a task that closes its worker's other descriptors leaves it idle, not spinning; it "
          "serves on") {
  for (const int64_t hostile : {kCloseOthers, kCloseReopen}) {
    CAPTURE(hostile);
    ProcessPool<Hostile> pool(options(1));
    absl::StatusOr<int64_t> pid = pool.apply(hostile);
    REQUIRE(pid.ok());
    // Idle now, waiting for work: it must wait, not poll a closed descriptor (or a file opened on
    // its number) again and again.
    absl::SleepFor(absl::Milliseconds(200));
    const double before = cpu_seconds(static_cast<pid_t>(*pid));
    absl::SleepFor(absl::Milliseconds(1500));
    const double used = cpu_seconds(static_cast<pid_t>(*pid)) - before;
    MESSAGE("the idle worker used ", used, " s of CPU in 1.5 s");
    CHECK(used < 0.3);  // a spinning worker takes most of a core, even on a loaded machine
    absl::StatusOr<std::vector<int64_t>> after = pool.map(std::vector<int64_t>{1, 2, 3});
    REQUIRE(after.ok());
    CHECK(*after == std::vector<int64_t>{2, 4, 6});
  }
}

// Stopping a worker stops its process group, the one it was started in: a task that moved its
// worker into the pool's own group is stopped alone, not the pool with it.
TEST_CASE("a task that moves its worker into the pool's process group and hangs: it ends at its "
          "timeout, and only it") {
  ProcessPool<Hostile> pool(options(2));
  absl::StatusOr<int64_t> hung = pool.apply(kJoinPoolGroup, {.task_timeout = absl::Seconds(1)});
  CHECK(hung.status().code() == absl::StatusCode::kDeadlineExceeded);
  absl::StatusOr<std::vector<int64_t>> after = pool.map(std::vector<int64_t>{1, 2, 3});
  REQUIRE(after.ok());
  CHECK(*after == std::vector<int64_t>{2, 4, 6});
}

// One worker floods the log (from a thread its task left running, or from the task itself):
// the other serves a long call meanwhile, and the pool closes and joins.
void check_log_flood(int64_t flood) {
  std::atomic<int64_t> records{0};
  PoolOptions opts = options(2);
  opts.log_sink = [&records](const LogEvent&) { records.fetch_add(1, std::memory_order_relaxed); };
  ProcessPool<Hostile> pool(opts);
  AsyncResult<int64_t> flooding = pool.apply_async(flood);
  REQUIRE(testing::wait_until([&] { return records.load() > 100; }, absl::Seconds(30)));
  std::vector<int64_t> jobs(20000);
  for (size_t i = 0; i < jobs.size(); ++i) jobs[i] = static_cast<int64_t>(i);
  absl::StatusOr<std::vector<int64_t>> got = pool.map(jobs, {.task_timeout = absl::Seconds(60)});
  INFO(got.status());
  REQUIRE(got.ok());
  for (size_t i = 0; i < jobs.size(); ++i) REQUIRE((*got)[i] == jobs[i] * 2);
  const absl::StatusOr<int64_t> flooded = flooding.get();
  CHECK_MESSAGE(flooded.value_or(0) == flood, flooded.status());
  MESSAGE(records.load() << " records");
  CHECK(pool.close().ok());
  CHECK(pool.join().ok());
}

TEST_CASE("a thread a task left logging without end does not starve the pool; join ends") {
  check_log_flood(kLogFlood);
}
TEST_CASE("a task that floods the log does not starve the pool") { check_log_flood(kLogFloodHere); }

// The program around the pool reaps children itself (a server's SIGCHLD handler, or SIGCHLD
// ignored): the pool's workers are reaped behind its back.
void reap_all(int) {
  const int saved = errno;
  while (::waitpid(-1, nullptr, WNOHANG) > 0) {
  }
  errno = saved;
}

void check_with_sigchld(void (*handler)(int), StartMethod method) {
  struct sigaction action {};
  action.sa_handler = handler;
  action.sa_flags = SA_RESTART;
  sigemptyset(&action.sa_mask);
  struct sigaction before {};
  ::sigaction(SIGCHLD, &action, &before);
  {
    PoolOptions opts = options(2);
    opts.start_method = method;
    ProcessPool<Hostile> pool(opts);
    for (int round = 0; round < 3; ++round) {
      std::vector<int64_t> jobs;
      for (int64_t i = 0; i < 10; ++i) jobs.push_back(i == 3 ? kKillSelf : i);
      std::vector<absl::StatusOr<int64_t>> got;
      for (int64_t job : jobs) got.push_back(pool.apply(job, {.task_timeout = absl::Seconds(20)}));
      for (size_t i = 0; i < jobs.size(); ++i) {
        INFO("job " << i << ": " << got[i].status());
        if (i == 3) {
          CHECK(got[i].status().code() == absl::StatusCode::kAborted);
        } else {
          REQUIRE(got[i].ok());
          CHECK(*got[i] == jobs[i] * 2);
        }
      }
    }
  }
  ::sigaction(SIGCHLD, &before, nullptr);
}

TEST_CASE("a program that reaps every child in its SIGCHLD handler: deaths are still reported") {
  SUBCASE("fork") { check_with_sigchld(reap_all, StartMethod::kFork); }
  SUBCASE("fork server") { check_with_sigchld(reap_all, StartMethod::kForkServer); }
}

TEST_CASE("a program that ignores SIGCHLD: deaths are still reported") {
  SUBCASE("fork") { check_with_sigchld(SIG_IGN, StartMethod::kFork); }
  SUBCASE("fork server") { check_with_sigchld(SIG_IGN, StartMethod::kForkServer); }
}

}  // namespace
}  // namespace procpool
