// procpool on Linux 4.18 (RHEL 8 / Rocky 8), where pidfd_open, pidfd_send_signal, clone3 and
// close_range do not exist. This whole binary runs as on such a kernel: before main() it
// installs the seccomp filter of tools/enosys_run, which makes those calls fail with ENOSYS here
// and in every process it starts (workers, fork servers, remote worker hosts, their workers).
// Each case checks that the pool then behaves as it does with pidfds: workers run, a crash is
// reported with its cause, a hung worker is stopped at its timeout, terminate() stops busy
// workers, nothing is left behind, and a worker inherits none of the parent's descriptors.

#include "procpool/process_pool.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "lib/common/syscall_numbers.h"
#include "tests/fault_support.h"
#include "tests/remote_worker.h"
#include "tests/test_support.h"
#include "tools/enosys_filter.h"

namespace procpool {
namespace {

using testing::LogCapture;
using testing::map_within;
using testing::message_has;
using testing::wait_until;

// Before main(), while this process has one thread: from here on it is an old kernel.
const int filter_error = [] {
  testing::disable_core_dumps();
  return tools::install_enosys_filter();
}();

constexpr int64_t kCrash = -11;               // raise(SIGSEGV)
constexpr int64_t kForkHolderThenCrash = -12;  // a child that keeps the channel 20 s, then SIGSEGV
constexpr int64_t kHang = -100;               // sleeps until killed
constexpr int64_t kIgnoreTermAndHang = -101;  // ignores SIGTERM, sleeps until killed
constexpr int64_t kFdProbe = 1'000'000;       // kFdProbe + n: descriptor n's inode, 0 if closed

int64_t inode_of(int fd) {
  struct stat status {};
  return ::fstat(fd, &status) == 0 ? static_cast<int64_t>(status.st_ino) : 0;
}

struct Probe {
  int64_t run(int64_t job) {
    switch (job) {
      case kCrash:
        ::raise(SIGSEGV);
        return 0;
      case kForkHolderThenCrash:
        if (::fork() == 0) {
          ::sleep(20);  // holds every descriptor of the worker's, its channel included
          ::_exit(0);
        }
        ::raise(SIGSEGV);
        return 0;
      case kIgnoreTermAndHang:
        ::signal(SIGTERM, SIG_IGN);
        [[fallthrough]];
      case kHang:
        while (true) ::pause();
      default:
        break;
    }
    if (job >= kFdProbe) return inode_of(static_cast<int>(job - kFdProbe));
    return job * job;
  }
};

PoolOptions options_for(StartMethod method, PoolOptions options) {
  options.start_method = method;
  return options;
}

std::vector<int64_t> range(int64_t n) {
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < n; ++i) jobs.push_back(i);
  return jobs;
}

// Children of this process that are not yet reaped (zombies included), after a short wait for
// those on their way out.
bool no_children_left() {
  return wait_until([] { return testing::child_pids(::getpid()).empty(); }, absl::Seconds(20));
}

TEST_CASE("this binary runs as on Linux 4.18: pidfd_open, pidfd_send_signal, clone3 and "
          "close_range fail with ENOSYS") {
  REQUIRE_MESSAGE(filter_error == 0, "the seccomp filter: ", std::strerror(filter_error));
  errno = 0;
  CHECK(::syscall(SYS_pidfd_open, ::getpid(), 0) == -1);
  CHECK(errno == ENOSYS);
  errno = 0;
  CHECK(::syscall(SYS_pidfd_send_signal, 0, 0, nullptr, 0) == -1);
  CHECK(errno == ENOSYS);
  errno = 0;
  CHECK(::syscall(SYS_close_range, 1000, 1001, 0) == -1);
  CHECK(errno == ENOSYS);
  errno = 0;
  CHECK(::syscall(SYS_clone3, nullptr, 0) == -1);
  CHECK(errno == ENOSYS);
  // And in a child: the filter is inherited.
  const pid_t child = ::fork();
  if (child == 0) ::_exit(::syscall(SYS_pidfd_open, ::getpid(), 0) == -1 && errno == ENOSYS ? 0 : 1);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("without pidfds, map, imap and apply run; close and join reap every worker") {
  StartMethod method = StartMethod::kFork;
  SUBCASE("kFork") { method = StartMethod::kFork; }
  SUBCASE("kForkServer") { method = StartMethod::kForkServer; }
  {
    ProcessPool<Probe> pool(options_for(method, {.workers = 2, .log_sink = nullptr}));
    auto squares = map_within(pool, range(500), {}, absl::Seconds(30));
    REQUIRE_MESSAGE(squares.ok(), squares.status());
    for (int64_t i = 0; i < 500; ++i) CHECK((*squares)[i] == i * i);
    CHECK(pool.apply(12).value_or(-1) == 144);
    int64_t sum = 0;
    for (absl::StatusOr<int64_t> r : pool.imap(std::vector<int64_t>{1, 2, 3})) sum += r.value_or(0);
    CHECK(sum == 14);
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
  }
  CHECK(no_children_left());
}

TEST_CASE("without pidfds, a worker killed by a signal fails its task kAborted naming the "
          "signal; a replacement runs the rest") {
  StartMethod method = StartMethod::kFork;
  bool sigchld_ignored = false;
  SUBCASE("kFork") { method = StartMethod::kFork; }
  SUBCASE("kForkServer") { method = StartMethod::kForkServer; }
  SUBCASE("kFork, in a program that ignores SIGCHLD (the kernel reaps its children)") {
    sigchld_ignored = true;
  }
  struct sigaction previous {};
  if (sigchld_ignored) {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    ::sigaction(SIGCHLD, &ignore, &previous);
  }
  {
    ProcessPool<Probe> pool(options_for(method, {.workers = 2, .log_sink = nullptr}));
    std::vector<int64_t> jobs = range(20);
    jobs[7] = kCrash;
    auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(30));
    CHECK(result.status().code() == absl::StatusCode::kAborted);
    CHECK_MESSAGE(message_has(result.status(), "job 7: "), result.status());
    CHECK_MESSAGE(message_has(result.status(), "killed by signal 11 (SIGSEGV)"), result.status());
    CHECK(pool.stats().workers_restarted == 1);
    auto next = map_within(pool, range(10), {}, absl::Seconds(30));
    REQUIRE_MESSAGE(next.ok(), next.status());
    CHECK((*next)[9] == 81);
  }
  if (sigchld_ignored) ::sigaction(SIGCHLD, &previous, nullptr);
  CHECK(no_children_left());
}

TEST_CASE("without pidfds, in a program that ignores SIGCHLD, a worker that dies while a process "
          "it started holds its channel is still found gone") {
  // Its exit leaves no zombie (the kernel reaps it at once) and its channel stays open: only
  // looking at the worker itself finds it gone, not a look for any exited child.
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  struct sigaction previous {};
  ::sigaction(SIGCHLD, &ignore, &previous);
  {
    ProcessPool<Probe> pool({.workers = 2, .log_sink = nullptr});
    const absl::Time start = absl::Now();
    auto result = map_within(pool, std::vector<int64_t>{1, kForkHolderThenCrash, 3}, {.chunksize = 1},
                             absl::Seconds(60));
    const absl::Duration took = absl::Now() - start;
    CHECK_MESSAGE(result.status().code() == absl::StatusCode::kAborted, result.status());
    CHECK_MESSAGE(message_has(result.status(), "job 1: "), result.status());
    // Before its child lets the channel go, 20 s on.
    CHECK_MESSAGE(took < absl::Seconds(15), absl::FormatDuration(took));
    CHECK(map_within(pool, range(4), {}, absl::Seconds(30)).ok());
  }
  ::sigaction(SIGCHLD, &previous, nullptr);
}

TEST_CASE("without pidfds, a task past its timeout is stopped, with SIGKILL when it ignores "
          "SIGTERM, and the pool carries on") {
  StartMethod method = StartMethod::kFork;
  int64_t hang = kHang;
  std::string how = "was killed by signal 15 (SIGTERM)";
  SUBCASE("kFork") {}
  SUBCASE("kFork, SIGTERM ignored") {
    hang = kIgnoreTermAndHang;
    how = "was killed by signal 9 (SIGKILL)";
  }
  SUBCASE("kForkServer") { method = StartMethod::kForkServer; }
  SUBCASE("kForkServer, SIGTERM ignored") {
    method = StartMethod::kForkServer;
    hang = kIgnoreTermAndHang;
    how = "was killed by signal 9 (SIGKILL)";
  }
  CAPTURE(how);
  LogCapture logs;
  {
    ProcessPool<Probe> pool(options_for(method, {.workers = 2,
                                                 .task_timeout = absl::Milliseconds(200),
                                                 .kill_grace = absl::Milliseconds(300),
                                                 .log_sink = logs.sink()}));
    std::vector<int64_t> jobs = range(8);
    jobs[3] = hang;
    auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(30));
    CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK_MESSAGE(message_has(result.status(), "job 3: "), result.status());
    CHECK_MESSAGE(logs.contains(how), logs.all());
    auto next = map_within(pool, range(4), {}, absl::Seconds(30));
    REQUIRE_MESSAGE(next.ok(), next.status());
  }
  CHECK(no_children_left());
}

TEST_CASE("without pidfds, terminate() stops busy workers and reaps them") {
  StartMethod method = StartMethod::kFork;
  SUBCASE("kFork") { method = StartMethod::kFork; }
  SUBCASE("kForkServer") { method = StartMethod::kForkServer; }
  PoolOptions options = options_for(
      method, {.workers = 2, .kill_grace = absl::Milliseconds(300), .log_sink = nullptr});
  ProcessPool<Probe> pool(options);
  absl::StatusOr<std::vector<int64_t>> result;
  std::thread caller([&] {
    result = pool.map(std::vector<int64_t>{kHang, kIgnoreTermAndHang}, {.chunksize = 1});
  });
  REQUIRE(wait_until([&] {
    int busy = 0;
    for (const WorkerStats& worker : pool.stats().workers) busy += worker.state == WorkerState::kBusy;
    return busy == 2;
  }, absl::Seconds(20)));
  const absl::Time start = absl::Now();
  pool.terminate();
  caller.join();
  CHECK_FALSE(result.ok());
  CHECK(pool.join().ok());
  CHECK(absl::Now() - start < absl::Seconds(20));
  // Every worker is reaped (the fork server, a child too, lives as long as the pool).
  const std::vector<pid_t> left = testing::child_pids(::getpid());
  CHECK(left.size() == (method == StartMethod::kForkServer ? 1u : 0u));
}

TEST_CASE("without close_range, a worker inherits no descriptor of the parent's but the standard "
          "ones") {
  StartMethod method = StartMethod::kFork;
  SUBCASE("kFork") { method = StartMethod::kFork; }
  SUBCASE("kForkServer") { method = StartMethod::kForkServer; }
  // Not close-on-exec, as a careless program opens them; one far up the table.
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const int high = ::fcntl(pipe_fds[0], F_DUPFD, 900);
  REQUIRE(high >= 900);
  const int64_t pipe_inode = inode_of(pipe_fds[0]);
  REQUIRE(pipe_inode != 0);
  {
    ProcessPool<Probe> pool(options_for(method, {.workers = 1, .log_sink = nullptr}));
    // By inode: the worker's own descriptors may have taken the pipe's numbers since.
    auto inodes = map_within(pool, std::vector<int64_t>{kFdProbe + 0, kFdProbe + 1, kFdProbe + 2,
                                                       kFdProbe + pipe_fds[0],
                                                       kFdProbe + pipe_fds[1], kFdProbe + high},
                             {}, absl::Seconds(30));
    REQUIRE_MESSAGE(inodes.ok(), inodes.status());
    CHECK((*inodes)[0] != 0);
    CHECK((*inodes)[1] != 0);
    CHECK((*inodes)[2] != 0);
    CHECK((*inodes)[3] != pipe_inode);
    CHECK((*inodes)[4] != pipe_inode);
    CHECK((*inodes)[5] == 0);
  }
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
  ::close(high);
}

TEST_CASE("without pidfds, remote workers run; one killed mid-task is reported and its host "
          "forks another; a hung one is stopped at its timeout; nothing is left") {
  {
    LogCapture logs;
    PoolOptions options{.workers = 2, .task_timeout = absl::Seconds(2),
                        .kill_grace = absl::Milliseconds(300), .log_sink = logs.sink()};
    options.remote = RemoteOptions{
        .launch = {testing::worker_program(), "--procpool-connect={address}"},
        .connect_timeout = absl::Seconds(30)};
    ProcessPool<testing::RemoteWorker> pool(options);
    auto squares = map_within(pool, range(200), {}, absl::Seconds(60));
    REQUIRE_MESSAGE(squares.ok(), squares.status());
    CHECK((*squares)[199] == 199 * 199);
    std::vector<int64_t> jobs = range(10);
    jobs[4] = testing::kRemoteKillSelf;
    auto killed = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(60));
    CHECK(killed.status().code() == absl::StatusCode::kAborted);
    CHECK_MESSAGE(message_has(killed.status(), "signal 9"), killed.status());
    jobs[4] = testing::kRemoteHang;
    auto hung = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(60));
    CHECK_MESSAGE(hung.status().code() == absl::StatusCode::kDeadlineExceeded, hung.status());
    auto after = map_within(pool, range(10), {}, absl::Seconds(60));
    REQUIRE_MESSAGE(after.ok(), after.status());
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
  }
  // The launched worker hosts were reaped by the pool.
  CHECK(no_children_left());
}

}  // namespace
}  // namespace procpool
