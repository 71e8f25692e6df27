// A program whose pool is SIGKILLed (kill -9, the OOM killer, a CI job's timeout) leaves nothing
// its tasks started running (issue 17, item 1): each worker dies with its parent, and takes its
// whole process tree with it — the children in its process group, and setsid daemons (through
// its cgroup, or, without cgroups, as the subreaper they were reparented to).
//
// The "program" is a child this test forks: it makes a pool whose task starts a tree, and is
// SIGKILLed once the tree runs. Every process a task starts carries PROCPOOL_KILL_TREE_MARK=<mark>
// in its environment, so the test finds them in /proc whoever their parent is by then.

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/process_pool.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::wait_until;

// Made before any process is forked: the program, its workers and their trees share it.
const std::string& mark_of_this_test() {
  static const std::string mark =
      absl::StrCat("kill-tree-", ::getpid(), "-", absl::ToUnixNanos(absl::Now()));
  return mark;
}
[[maybe_unused]] const bool mark_made_at_start = !mark_of_this_test().empty();

[[noreturn]] void exec_marked(const char* const* argv) {
  ::setenv("PROCPOOL_KILL_TREE_MARK", mark_of_this_test().c_str(), 1);
  ::execvp(argv[0], const_cast<char* const*>(argv));
  ::_exit(127);
}

constexpr int64_t kShellTree = 1;    // sh -c 'sleep 1000 & sleep 1000'; the task waits
constexpr int64_t kSetsidDaemon = 2;  // a double-forked setsid `sleep 1000`; the task hangs

struct TreeWorker {
  using Job = int64_t;
  using Result = int64_t;

  int64_t run(int64_t job) {
    if (job == kShellTree) {
      if (::fork() == 0) {
        const char* argv[] = {"sh", "-c", "sleep 1000 & sleep 1000", nullptr};
        exec_marked(argv);
      }
    } else {
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
    }
    while (true) ::pause();
  }
};

// The living processes, anywhere on the machine, that carry this test's mark.
std::vector<pid_t> marked_processes() {
  return testing::processes_with_environment(absl::StrCat("PROCPOOL_KILL_TREE_MARK=", mark_of_this_test()));
}

// Forks the program: a pool of one worker running `job`. Returns its pid once its task's tree
// is up (`expected` marked processes), or -1.
pid_t start_program(int64_t job, Cgroups cgroups, StartMethod start_method, size_t expected) {
  // The program's pool flushes stdio before it forks: not this test's output again.
  std::cout.flush();
  std::fflush(nullptr);
  const pid_t program = ::fork();
  if (program == 0) {
    ProcessPool<TreeWorker> pool({.workers = 1,
                                  .cgroups = cgroups,
                                  .name = "killtree",
                                  .start_method = start_method,
                                  .log_sink = nullptr});
    AsyncResult<int64_t> running = pool.apply_async(job);
    while (true) ::pause();
  }
  if (program < 0) return -1;
  if (!wait_until([&] { return marked_processes().size() >= expected; }, absl::Seconds(20))) {
    ::kill(program, SIGKILL);
    ::waitpid(program, nullptr, 0);
    return -1;
  }
  return program;
}

TEST_CASE("a program SIGKILLed while its tasks run leaves none of the processes they started") {
  struct Variant {
    const char* name;
    int64_t job;
    size_t processes;
    Cgroups cgroups;
    StartMethod start_method;
  };
  for (const Variant& variant : {
           Variant{"sh -c 'sleep 1000 & sleep 1000'", kShellTree, 3, Cgroups::kAuto, StartMethod::kFork},
           Variant{"a setsid daemon", kSetsidDaemon, 1, Cgroups::kAuto, StartMethod::kFork},
           Variant{"sh, without cgroups", kShellTree, 3, Cgroups::kOff, StartMethod::kFork},
           Variant{"a setsid daemon, without cgroups", kSetsidDaemon, 1, Cgroups::kOff, StartMethod::kFork},
           Variant{"a setsid daemon, fork server", kSetsidDaemon, 1, Cgroups::kAuto,
                   StartMethod::kForkServer},
       }) {
    SUBCASE(variant.name) {
      const pid_t program =
          start_program(variant.job, variant.cgroups, variant.start_method, variant.processes);
      REQUIRE_MESSAGE(program > 0, "the task's processes never started");
      ::kill(program, SIGKILL);
      ::waitpid(program, nullptr, 0);
      const absl::Time killed = absl::Now();
      const bool gone = wait_until([] { return marked_processes().empty(); }, absl::Seconds(10));
      MESSAGE(std::string(variant.name), ": ", marked_processes().size(), " left running ",
              absl::FormatDuration(absl::Now() - killed), " after the program was killed");
      CHECK(gone);
      for (pid_t pid : marked_processes()) ::kill(pid, SIGKILL);  // nothing for the next case
    }
  }
}

}  // namespace
}  // namespace procpool
