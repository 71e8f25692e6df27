#include "lib/common/process_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unordered_map>
#include <vector>

namespace procpool::internal {
namespace {

constexpr int kKillPasses = 100;
constexpr useconds_t kPassWaitUs = 1000;

struct ProcessEntry {
  pid_t parent = 0;
  bool alive = false;  // not a zombie
};

// Every process's parent and whether it still runs, from /proc/PID/stat ("pid (comm) S ppid ...":
// the name may hold spaces and parentheses, so the fields after the last ')' are read).
std::unordered_map<pid_t, ProcessEntry> read_processes() {
  std::unordered_map<pid_t, ProcessEntry> processes;
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return processes;
  while (dirent* entry = ::readdir(proc)) {
    char* end = nullptr;
    const long pid = std::strtol(entry->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    char text[512];
    const ssize_t got = ::read(fd, text, sizeof(text) - 1);
    ::close(fd);
    if (got <= 0) continue;
    text[got] = '\0';
    const char* after_name = std::strrchr(text, ')');
    if (after_name == nullptr) continue;
    char state = 0;
    long parent = 0;
    if (std::sscanf(after_name + 1, " %c %ld", &state, &parent) != 2) continue;
    processes[static_cast<pid_t>(pid)] = {static_cast<pid_t>(parent), state != 'Z' && state != 'X'};
  }
  ::closedir(proc);
  return processes;
}

}  // namespace

void become_tree_root() {
  ::setpgid(0, 0);
  ::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
}

int kill_descendants(pid_t root) {
  int signalled = 0;
  for (int pass = 0; pass < kKillPasses; ++pass) {
    const std::unordered_map<pid_t, ProcessEntry> processes = read_processes();
    std::unordered_map<pid_t, std::vector<pid_t>> children;
    for (const auto& [pid, entry] : processes) children[entry.parent].push_back(pid);
    std::vector<pid_t> below = {root};
    bool any_alive = false;
    for (size_t i = 0; i < below.size(); ++i) {
      auto it = children.find(below[i]);
      if (it == children.end()) continue;
      for (pid_t child : it->second) {
        below.push_back(child);
        if (!processes.at(child).alive) continue;
        any_alive = true;
        ::kill(child, SIGKILL);
        ++signalled;
      }
    }
    if (!any_alive) break;
    ::usleep(kPassWaitUs);
  }
  return signalled;
}

void end_own_tree() {
  // No child at all, living or zombie: no descendant either (each would have an ancestor among
  // our children). The usual case, and it spares the scan of /proc.
  if (::waitpid(-1, nullptr, WNOHANG | __WALL) < 0 && errno == ECHILD) return;
  kill_descendants(::getpid());
  // Our children, ours and adopted: every one is dead or dying now. One that cannot die (stuck
  // in the kernel) is not waited for long: it is reparented when we exit.
  for (int pass = 0; pass < kKillPasses;) {
    const pid_t reaped = ::waitpid(-1, nullptr, WNOHANG | __WALL);
    if (reaped < 0 && errno == ECHILD) break;
    if (reaped <= 0) {
      ::usleep(kPassWaitUs);
      ++pass;
    }
  }
}

}  // namespace procpool::internal
