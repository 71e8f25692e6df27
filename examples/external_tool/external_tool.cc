// Run an external program per job, under a timeout and a memory cap, and leave nothing behind.
//
// Each job is a shell command. The worker runs it (`sh -c`) and returns its exit status. A command
// that hangs has its worker stopped at task_timeout, and with it everything the command started:
// its background children, and a double-forked setsid daemon too where the worker has a cgroup
// (Cgroups::kAuto, where this process may make cgroups). max_worker_memory_bytes caps the worker
// and every process it starts: over it, the kernel kills the biggest (v1: the command, exit
// status 137) or the whole worker (v2: kResourceExhausted); with RLIMIT_AS instead (no memory
// cgroup), the command's allocation fails and it exits with an error. At the end the program looks through /proc for any process still
// carrying this run's mark in its environment: there are none.
//
// Run: bazel run //examples/external_tool   (as root, or in a delegated cgroup, for the cgroups)

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "procpool/procpool.h"

namespace {

// Every process the commands start inherits this in its environment.
const std::string kMark = absl::StrCat("EXTERNAL_TOOL_MARK=", ::getpid());

struct Shell {
  using Job = std::string;
  using Result = int;

  // The command's wait status as sh's exit code would say it: its status, or 128 + its signal.
  int run(const std::string& command) {
    const pid_t child = ::fork();
    if (child == 0) {
      ::putenv(const_cast<char*>(kMark.c_str()));
      ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    int status = 0;
    if (child < 0 || ::waitpid(child, &status, 0) < 0) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
};

// Processes anywhere on the machine whose environment carries kMark.
int processes_left() {
  int found = 0;
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return -1;
  while (dirent* entry = ::readdir(proc)) {
    if (std::atoi(entry->d_name) <= 0 || std::atoi(entry->d_name) == ::getpid()) continue;
    std::ifstream in(absl::StrCat("/proc/", entry->d_name, "/environ"), std::ios::binary);
    const std::string environment((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (environment.find(kMark) != std::string::npos) ++found;
  }
  ::closedir(proc);
  return found;
}

}  // namespace

int main() {
  // The mechanisms in force (cgroups, or process groups and RLIMIT_AS) are an info event.
  auto log = [](const procpool::LogEvent& event) {
    if (event.process == "procpool" || event.severity != procpool::LogSeverity::kInfo) {
      std::printf("[pool] %s\n", event.message.c_str());
    }
  };
  std::vector<std::string> commands = {
      "echo hello from $$",
      "exit 3",
      "sleep 1000 & sleep 1000",                        // a tree that never ends
      "setsid sh -c 'sleep 1000' & sleep 1000",         // a daemon outside the process group
      // tail holds the last 1 GiB of a pipe in memory: over the cap, something gives.
      "head -c 1073741824 /dev/zero | tail -c 1073741824 > /dev/null",
  };
  {
    procpool::ProcessPool<Shell> pool({.workers = 2,
                                       .max_worker_memory_bytes = size_t{256} << 20,
                                       .log_sink = log});
    std::vector<procpool::AsyncResult<int>> results;
    for (const std::string& command : commands) {
      // The memory hog gets time to reach the cap on a slow machine.
      const bool hog = command.rfind("head", 0) == 0;
      results.push_back(pool.apply_async(
          command, {.task_timeout = hog ? absl::Seconds(30) : absl::Seconds(2)}));
    }
    for (size_t i = 0; i < commands.size(); ++i) {
      absl::StatusOr<int> status = results[i].get();
      std::printf("%-60s -> %s\n", commands[i].c_str(),
                  status.ok() ? absl::StrCat("exit status ", *status).c_str()
                              : status.status().ToString().c_str());
    }
    std::printf("processes of this run still alive while the pool lives: %d\n", processes_left());
  }
  const int left = processes_left();
  std::printf("processes of this run left behind: %d\n", left);
  return left == 0 ? 0 : 1;
}
