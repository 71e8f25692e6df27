// A task's process tree is its worker's (issue 17, items 1 and 2): when procpool stops a worker
// (task_timeout, cancel(), terminate(), join) nothing the task started is left running, not even
// a double-forked setsid daemon; and max_worker_memory_bytes caps a worker with the cause in the
// error (kResourceExhausted through a memory cgroup, RLIMIT_AS where none can be made).
//
// Every process a task starts carries PROCPOOL_TREE_MARK=<mark> in its environment, so the test
// finds them in /proc whoever their parent is by then (tests run as root: every environ is
// readable).

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "lib/common/cgroup.h"
#include "procpool/process_pool.h"
#include "tests/remote_worker.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::wait_until;
using testing::worker_program;

// Jobs: a positive job is answered with itself.
constexpr int64_t kShellTree = -1;    // sh -c 'sleep 1000 & sleep 1000', waited for
constexpr int64_t kSetsidDaemon = -2;  // a double-forked setsid `sleep 1000`; then hangs
constexpr int64_t kDaemonAndReturn = -3;  // the same daemon, then returns 0
constexpr int64_t kAllocate = -4;     // touches 512 MiB, returns 0
constexpr int64_t kPid = -5;          // returns its pid
constexpr int64_t kAllocateTwoGiB = -6;  // 1 if allocating 2 GiB (untouched) failed, else 0
constexpr int64_t kExecSleep = -7;    // the worker itself execs `sleep 1000`
constexpr int64_t kCloseChannel = -8;  // closes the worker's channel (fd 3), then hangs
constexpr int64_t kChildAllocates = -9;  // a child of the task touches 512 MiB; its wait status
constexpr int64_t kLeaveOrphan = -10;  // system("sh -c 'sleep 0.01 &'"): an orphan that exits soon
constexpr int64_t kLeaveChild = -11;   // forks a child that exits at once, and returns unwaited

constexpr size_t kAllocateBytes = size_t{512} << 20;

// Made when the test program starts, before any worker is forked: every worker sees this one.
const std::string& mark_of_this_test() {
  static const std::string mark = absl::StrCat("tree-", ::getpid(), "-", absl::ToUnixNanos(absl::Now()));
  return mark;
}
[[maybe_unused]] const bool mark_made_at_start =
    // Remote workers (tests/remote_worker.h) mark what they start with this too.
    ::setenv("REMOTE_TREE_MARK", mark_of_this_test().c_str(), 1) == 0;

// Execs `argv` in the current (forked) process with the mark in its environment.
[[noreturn]] void exec_marked(const char* const* argv) {
  ::setenv("PROCPOOL_TREE_MARK", mark_of_this_test().c_str(), 1);
  ::execvp(argv[0], const_cast<char* const*>(argv));
  ::_exit(127);
}

struct TreeWorker {
  using Job = int64_t;
  using Result = int64_t;

  int64_t run(int64_t job) {
    switch (job) {
      case kShellTree: {
        const pid_t shell = ::fork();
        if (shell == 0) {
          const char* argv[] = {"sh", "-c", "sleep 1000 & sleep 1000", nullptr};
          exec_marked(argv);
        }
        int status = 0;
        if (::waitpid(shell, &status, 0) < 0) return -errno;
        return status;
      }
      case kSetsidDaemon:
      case kDaemonAndReturn: {
        const pid_t first = ::fork();
        if (first == 0) {
          ::setsid();
          if (::fork() == 0) {
            const char* argv[] = {"sleep", "1000", nullptr};
            exec_marked(argv);
          }
          ::_exit(0);
        }
        ::waitpid(first, nullptr, 0);
        if (job == kDaemonAndReturn) return 0;
        while (true) ::pause();
      }
      case kChildAllocates: {
        const pid_t child = ::fork();
        if (child == 0) ::_exit(static_cast<int>(run(kAllocate)));
        int status = 0;
        if (::waitpid(child, &status, 0) < 0) return -errno;
        return status;
      }
      case kAllocate: {
        auto* bytes = new char[kAllocateBytes];
        for (size_t i = 0; i < kAllocateBytes; i += 4096) bytes[i] = static_cast<char>(i);
        const int64_t sum = bytes[kAllocateBytes - 4096];
        delete[] bytes;
        return sum * 0;
      }
      case kPid:
        return ::getpid();
      case kExecSleep: {
        const char* argv[] = {"sleep", "1000", nullptr};
        exec_marked(argv);
      }
      case kCloseChannel:
        ::close(3);
        while (true) ::pause();
      case kAllocateTwoGiB: {
        char* bytes = new (std::nothrow) char[size_t{2} << 30];
        delete[] bytes;
        return bytes == nullptr ? 1 : 0;
      }
      case kLeaveOrphan:
        return std::system("sh -c 'sleep 0.01 &'");
      case kLeaveChild:
        if (::fork() == 0) ::_exit(0);
        return 0;
      default:
        return job;
    }
  }
};

// The living processes, anywhere on the machine, that carry this test's mark.
std::vector<pid_t> marked_processes() {
  return testing::processes_with_environment(absl::StrCat("PROCPOOL_TREE_MARK=", mark_of_this_test()));
}

// Waits (generously) for the tree to vanish; returns how long it took, or an infinite duration.
absl::Duration time_until_no_marked_process() {
  const absl::Time start = absl::Now();
  if (!wait_until([] { return marked_processes().empty(); }, absl::Seconds(2))) {
    for (pid_t pid : marked_processes()) ::kill(pid, SIGKILL);  // leave nothing for the next case
    return absl::InfiniteDuration();
  }
  return absl::Now() - start;
}

// Events the pool logs, kept for the test to read.
class LogCapture {
 public:
  LogSink sink() {
    return [this](const LogEvent& event) {
      absl::MutexLock lock(&mu_);
      messages_.push_back(event.message);
    };
  }
  std::string find(const std::string& part) {
    absl::MutexLock lock(&mu_);
    for (const std::string& message : messages_) {
      if (absl::StrContains(message, part)) return message;
    }
    return "";
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> messages_;
};

void check_tree_gone(const char* what) {
  const absl::Duration took = time_until_no_marked_process();
  MESSAGE(absl::StrCat(what, ": the task's processes were gone ", absl::FormatDuration(took),
                       " after the call returned"));
  CHECK(took < absl::Seconds(2));
}

TEST_CASE("a task that times out leaves none of the processes it started behind") {
  struct Variant {
    const char* name;
    int64_t job;
    Cgroups cgroups;
    StartMethod start_method;
  };
  for (const Variant& variant :
       {Variant{"sh -c 'sleep 1000 & sleep 1000'", kShellTree, Cgroups::kAuto, StartMethod::kFork},
        Variant{"a double-forked setsid daemon", kSetsidDaemon, Cgroups::kAuto, StartMethod::kFork},
        Variant{"sh, without cgroups", kShellTree, Cgroups::kOff, StartMethod::kFork},
        Variant{"a setsid daemon, without cgroups", kSetsidDaemon, Cgroups::kOff, StartMethod::kFork},
        Variant{"a setsid daemon, fork server", kSetsidDaemon, Cgroups::kAuto,
                StartMethod::kForkServer}}) {
    SUBCASE(variant.name) {
      ProcessPool<TreeWorker> pool({.workers = 1,
                                    .task_timeout = absl::Seconds(1),
                                    .cgroups = variant.cgroups,
                                    .name = "tree",
                                    .start_method = variant.start_method,
                                    .log_sink = nullptr});
      AsyncResult<int64_t> running = pool.apply_async(variant.job);
      // It started them: the test sees them before the timeout (1 s) stops it.
      CHECK(wait_until([&] { return marked_processes().size() >= (variant.job == kShellTree ? 2u : 1u); },
                       absl::Seconds(5)));
      absl::StatusOr<int64_t> result = running.get();
      // Not a result the task made up when it saw its children die: it was stopped first.
      CHECK_MESSAGE(result.status().code() == absl::StatusCode::kDeadlineExceeded,
                    "the task returned ", result.value_or(-1000));
      check_tree_gone(variant.name);
      // The pool goes on with a fresh worker.
      CHECK(pool.apply(7).value_or(0) == 7);
    }
  }
}

// A worker's channel closes when it exits, and it is gone moments later. One that lives on without
// it can never report again: a task that exec()s another program (the channel is close-on-exec)
// or closes fd 3. Its task fails within frame_timeout, and what it runs is stopped.
TEST_CASE("a task that execs another program, or closes its worker's channel, fails at frame_timeout") {
  for (const int64_t job : {kExecSleep, kCloseChannel}) {
    SUBCASE(job == kExecSleep ? "exec sleep 1000" : "close fd 3, then hang") {
      ProcessPool<TreeWorker> pool({.workers = 1,
                                    .join_timeout = absl::Seconds(5),
                                    .name = "tree",
                                    .log_sink = nullptr,
                                    .frame_timeout = absl::Milliseconds(500)});
      AsyncResult<int64_t> running = pool.apply_async(job);
      // Past the bound, this wait ends the test instead (the pool kills the program at join).
      absl::StatusOr<int64_t> result = running.get(absl::Seconds(30));
      REQUIRE_MESSAGE(running.done(), "the call did not end: ", result.status().ToString());
      CHECK(result.status().code() == absl::StatusCode::kDataLoss);
      CHECK_MESSAGE(absl::StrContains(result.status().message(), "closed its channel"),
                    result.status().ToString());
      check_tree_gone("the exec'd program");
      CHECK(pool.apply(7).value_or(0) == 7);
    }
  }
}

TEST_CASE("cancel() and terminate() stop everything the task started") {
  SUBCASE("cancel()") {
    ProcessPool<TreeWorker> pool({.workers = 1, .name = "tree", .log_sink = nullptr});
    AsyncResult<int64_t> running = pool.apply_async(kSetsidDaemon);
    REQUIRE(wait_until([] { return marked_processes().size() >= 1; }, absl::Seconds(5)));
    running.cancel();
    CHECK(running.get().status().code() == absl::StatusCode::kCancelled);
    check_tree_gone("cancel()");
    CHECK(pool.apply(7).value_or(0) == 7);
  }
  SUBCASE("terminate()") {
    ProcessPool<TreeWorker> pool({.workers = 2, .name = "tree", .log_sink = nullptr});
    AsyncResult<int64_t> daemon = pool.apply_async(kSetsidDaemon);
    AsyncResult<int64_t> shell = pool.apply_async(kShellTree);
    REQUIRE(wait_until([] { return marked_processes().size() >= 3; }, absl::Seconds(5)));
    pool.terminate();
    check_tree_gone("terminate()");
  }
  SUBCASE("terminate(), without cgroups") {
    ProcessPool<TreeWorker> pool(
        {.workers = 1, .cgroups = Cgroups::kOff, .name = "tree", .log_sink = nullptr});
    AsyncResult<int64_t> daemon = pool.apply_async(kSetsidDaemon);
    REQUIRE(wait_until([] { return marked_processes().size() >= 1; }, absl::Seconds(5)));
    pool.terminate();
    check_tree_gone("terminate(), without cgroups");
  }
}

TEST_CASE("a worker that leaves (join, recycling) takes what its tasks left running with it") {
  for (Cgroups cgroups : {Cgroups::kAuto, Cgroups::kOff}) {
    SUBCASE(cgroups == Cgroups::kAuto ? "with cgroups" : "without cgroups") {
      {
        ProcessPool<TreeWorker> pool(
            {.workers = 1, .max_tasks_per_worker = 1, .cgroups = cgroups, .name = "tree",
             .log_sink = nullptr});
        // The task returns with its daemon running; the worker is recycled after it.
        REQUIRE(pool.apply(kDaemonAndReturn).ok());
        check_tree_gone("recycling");
        REQUIRE(pool.apply(kDaemonAndReturn).ok());
      }
      check_tree_gone("join");
    }
  }
}

TEST_CASE("a task that crosses max_worker_memory_bytes fails kResourceExhausted, and the pool goes on") {
  LogCapture log;
  constexpr size_t kCap = size_t{128} << 20;
  ProcessPool<TreeWorker> pool({.workers = 1,
                                .max_worker_memory_bytes = kCap,
                                .name = "tree",
                                .log_sink = log.sink()});
  const absl::StatusOr<int64_t> first_pid = pool.apply(kPid);
  REQUIRE(first_pid.ok());
  const std::string in_force = log.find("max_worker_memory_bytes");
  MESSAGE(absl::StrCat("at start: ", in_force));
  if (!absl::StrContains(in_force, "through cgroup")) {
    MESSAGE(absl::StrCat("skipped: no memory cgroup can be made here (", in_force, ")"));
    return;
  }
  // One batch: the allocation, then tasks that have not started when its worker dies.
  std::vector<int64_t> jobs = {kAllocate, 1, 2, 3};
  std::vector<absl::StatusOr<int64_t>> results;
  for (absl::StatusOr<int64_t> result : pool.imap(jobs, {.chunksize = 4})) results.push_back(result);
  REQUIRE(results.size() == 4);
  const absl::Status failed = results[0].status();
  CHECK(failed.code() == absl::StatusCode::kResourceExhausted);
  CHECK(absl::StrContains(failed.message(), "worker 0"));
  CHECK(absl::StrContains(failed.message(), absl::StrCat(kCap)));
  CHECK(absl::StrContains(failed.message(), "max_worker_memory_bytes"));
  MESSAGE(failed);
  for (size_t i = 1; i < results.size(); ++i) {
    CHECK_MESSAGE(results[i].ok(), results[i].status());
    if (results[i].ok()) CHECK(*results[i] == static_cast<int64_t>(i));
  }
  // A fresh worker replaced it.
  const absl::StatusOr<int64_t> second_pid = pool.apply(kPid);
  REQUIRE(second_pid.ok());
  CHECK(*second_pid != *first_pid);

  SUBCASE("so does one whose child process crosses it: the cap is the task's whole tree's") {
    // The kernel's OOM killer picks the largest process: the child. As under cgroup v2's
    // memory.oom.group (and on cgroup v1 by the pool's own watch), the whole worker goes with it
    // and the task fails for the cap, not for whatever its child's death made it return.
    const absl::StatusOr<int64_t> by_child = pool.apply(kChildAllocates);
    MESSAGE(by_child.status());
    REQUIRE_FALSE(by_child.ok());
    CHECK(by_child.status().code() == absl::StatusCode::kResourceExhausted);
    CHECK(absl::StrContains(by_child.status().message(), "max_worker_memory_bytes"));
    const absl::StatusOr<int64_t> third_pid = pool.apply(kPid);
    REQUIRE(third_pid.ok());
    CHECK(*third_pid != *second_pid);
  }
}

TEST_CASE("without a memory cgroup, max_worker_memory_bytes is RLIMIT_AS: the allocation fails in the task") {
#if defined(PROCPOOL_TEST_ASAN)
  MESSAGE("skipped: AddressSanitizer's shadow memory exceeds any RLIMIT_AS");
  return;
#endif
  LogCapture log;
  constexpr size_t kCap = size_t{1} << 30;
  ProcessPool<TreeWorker> pool({.workers = 1,
                                .max_worker_memory_bytes = kCap,
                                .cgroups = Cgroups::kOff,
                                .name = "tree",
                                .log_sink = log.sink()});
  const absl::StatusOr<int64_t> pid = pool.apply(kPid);
  REQUIRE(pid.ok());
  CHECK(absl::StrContains(log.find("max_worker_memory_bytes"), "RLIMIT_AS"));
  // Twice the cap cannot be had: the allocation fails inside the task, and the worker lives on.
  CHECK(pool.apply(kAllocateTwoGiB).value_or(-1) == 1);
  const absl::StatusOr<int64_t> same = pool.apply(kPid);
  REQUIRE(same.ok());
  CHECK(*same == *pid);
}

TEST_CASE("an RLIMIT_AS cap below the program's address space fails each task by name, and the pool stops") {
  // The program holds more address space than the cap (as one with many threads' malloc arenas,
  // or a GPU runtime's reservations, does): a worker under it could allocate nothing, so it
  // refuses to start and says why, instead of failing somewhere in its own code.
  constexpr size_t kReserved = size_t{1} << 30;
  constexpr size_t kCap = size_t{64} << 20;
  void* reserved =
      ::mmap(nullptr, kReserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  REQUIRE(reserved != MAP_FAILED);
  {
    ProcessPool<TreeWorker> pool({.workers = 2,
                                  .max_worker_memory_bytes = kCap,
                                  .cgroups = Cgroups::kOff,
                                  .name = "tree",
                                  .log_sink = nullptr});
    for (int i = 0; i < 2; ++i) {
      const absl::StatusOr<int64_t> result = pool.apply(kPid);
      CAPTURE(result.status());
      REQUIRE_FALSE(result.ok());
      CHECK(result.status().code() == absl::StatusCode::kFailedPrecondition);
      CHECK(absl::StrContains(result.status().message(), "max_worker_memory_bytes (67108864)"));
      CHECK(absl::StrContains(result.status().message(), "RLIMIT_AS"));
    }
    const absl::Time start = absl::Now();
    CHECK(pool.close().ok());
    (void)pool.join();  // every worker refused its start: join says so, and must not wait
    CHECK(absl::Now() - start < absl::Seconds(10));
  }
  ::munmap(reserved, kReserved);
}

// The zombies among `parent`'s children (/proc/<pid>/stat: state Z, that parent).
int zombies_of(pid_t parent) {
  int zombies = 0;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    const std::string name = entry.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string stat = testing::read_file(entry.path() / "stat");
    // "pid (comm) S ppid ...": the command may hold spaces and parentheses; the last ')' ends it.
    const size_t end = stat.rfind(')');
    if (end == std::string::npos || end + 4 >= stat.size()) continue;
    char state = 0;
    long ppid = 0;
    if (std::sscanf(stat.c_str() + end + 1, " %c %ld", &state, &ppid) != 2) continue;
    if (state == 'Z' && ppid == parent) ++zombies;
  }
  return zombies;
}

TEST_CASE("a worker reaps the orphans its tasks leave, and children they leave unwaited: no zombies pile up") {
  // It is their subreaper: what an intermediate parent leaves (system("tool &"), a daemon's
  // double fork) is reparented to it, not to init, and only it can reap them.
  for (const StartMethod method : {StartMethod::kFork, StartMethod::kForkServer}) {
    for (const Cgroups cgroups : {Cgroups::kAuto, Cgroups::kOff}) {
      CAPTURE(static_cast<int>(method));
      CAPTURE(static_cast<int>(cgroups));
      ProcessPool<TreeWorker> pool(
          {.workers = 1, .cgroups = cgroups, .name = "tree", .start_method = method, .log_sink = nullptr});
      const absl::StatusOr<int64_t> pid = pool.apply(kPid);
      REQUIRE(pid.ok());
      for (int i = 0; i < 60; ++i) {
        REQUIRE(pool.apply(i % 2 == 0 ? kLeaveOrphan : kLeaveChild).ok());
      }
      // Busy with other work, and then idle: either way they are reaped, within moments.
      CHECK(wait_until([&] { return zombies_of(static_cast<pid_t>(*pid)) == 0; }, absl::Seconds(5)));
      CHECK(pool.apply(kPid).value_or(-1) == *pid);  // the same worker all along
    }
  }
}

// Remote workers: the worker program (tests/remote_worker_helper) launched by the pool; its relay
// forks the worker and stops its tree on its host.
PoolOptions remote_options(PoolOptions options) {
  options.workers = 1;
  options.name = "tree";
  options.remote = RemoteOptions{.launch = {worker_program(), "--procpool-connect={address}"},
                                 .connect_timeout = absl::Seconds(20)};
  return options;
}

TEST_CASE("a remote worker's relay stops its task's whole tree on its host") {
  ProcessPool<testing::RemoteWorker> pool(
      remote_options({.task_timeout = absl::Seconds(1), .log_sink = nullptr}));
  AsyncResult<int64_t> running = pool.apply_async(testing::kRemoteSetsidDaemon);
  CHECK(wait_until([] { return marked_processes().size() >= 1; }, absl::Seconds(10)));
  CHECK(running.get().status().code() == absl::StatusCode::kDeadlineExceeded);
  check_tree_gone("a remote worker's timeout");
  CHECK(pool.apply(7).value_or(0) == 49);
}

TEST_CASE("a remote worker that crosses max_worker_memory_bytes fails kResourceExhausted") {
  LogCapture log;
  constexpr size_t kCap = size_t{128} << 20;
  ProcessPool<testing::RemoteWorker> pool(
      remote_options({.max_worker_memory_bytes = kCap, .log_sink = log.sink()}));
  // The relay runs here, in this process's cgroups: what the pool could make, it can.
  const std::string local = internal::CgroupPlan::detect(true, kCap).describe();
  if (!absl::StrContains(local, "through cgroup")) {
    MESSAGE(absl::StrCat("skipped: no memory cgroup can be made here (", local, ")"));
    return;
  }
  const absl::StatusOr<int64_t> failed = pool.apply(testing::kRemoteAllocate512MiB);
  CHECK(failed.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(absl::StrContains(failed.status().message(), "max_worker_memory_bytes"));
  CHECK(absl::StrContains(failed.status().message(), absl::StrCat(kCap)));
  MESSAGE(failed.status());
  CHECK(pool.apply(7).value_or(0) == 49);
}

// The path of `pid`'s cgroup in the hierarchy that stops trees here: v2's ("0::/a/b"), or the v1
// freezer's ("7:freezer:/a/b").
std::string kill_cgroup_of(pid_t pid, internal::CgroupPlan::Kill kill) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/cgroup"));
  const std::string wanted = kill == internal::CgroupPlan::Kill::kV2Kill ? "0::" : ":freezer:";
  for (std::string line; std::getline(in, line);) {
    const size_t at = line.find(wanted);
    if (at != std::string::npos && (wanted != "0::" || at == 0)) return line.substr(at + wanted.size());
  }
  return "";
}

TEST_CASE("a pool named with '/', '..' or a newline still gives each worker a cgroup of its own, right below the pool's") {
  const internal::CgroupPlan plan = internal::CgroupPlan::detect(true, 0);
  if (plan.kill == internal::CgroupPlan::Kill::kNone) {
    MESSAGE(absl::StrCat("skipped: no kill cgroup can be made here (", plan.describe(), ")"));
    return;
  }
  // A cgroup's name is one directory: the kernel refuses a newline, and a '/' would name one
  // elsewhere (above the pool's own, with "../").
  ProcessPool<TreeWorker> pool({.workers = 1, .name = "../../nightly/db\nsync", .log_sink = nullptr});
  AsyncResult<int64_t> pid = pool.apply_async(kPid);
  REQUIRE_MESSAGE(pid.wait(absl::Seconds(30)), "the worker never started");
  REQUIRE_MESSAGE(pid.get().ok(), pid.get().status());
  const std::string own = kill_cgroup_of(::getpid(), plan.kill);
  const std::string worker = kill_cgroup_of(static_cast<pid_t>(*pid.get()), plan.kill);
  const std::string own_dir = own == "/" ? "/" : own + "/";
  INFO("the pool's cgroup: ", own, "; its worker's: ", worker);
  REQUIRE(absl::StartsWith(worker, own_dir));
  const std::string name = worker.substr(own_dir.size());
  CHECK_FALSE(name.empty());
  CHECK(name.find('/') == std::string::npos);
  CHECK(absl::StrContains(name, "nightly"));
}

TEST_CASE("max_worker_memory_bytes below 16 MiB is refused by name") {
  ProcessPool<TreeWorker> pool({.workers = 1, .max_worker_memory_bytes = 4096, .log_sink = nullptr});
  const absl::StatusOr<int64_t> result = pool.apply(1);
  CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(absl::StrContains(result.status().message(), "max_worker_memory_bytes"));
}

}  // namespace
}  // namespace procpool
