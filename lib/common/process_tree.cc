#include "lib/common/process_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
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

// "/proc/<pid>/stat" into `path`.
void stat_path(pid_t pid, char (&path)[32]) {
  char digits[16];
  int n = 0;
  for (unsigned long rest = static_cast<unsigned long>(pid); n == 0 || rest != 0; rest /= 10) {
    digits[n++] = static_cast<char>('0' + rest % 10);
  }
  std::memcpy(path, "/proc/", 6);
  int at = 6;
  while (n > 0) path[at++] = digits[--n];
  std::memcpy(path + at, "/stat", 6);
}

// A process's parent and whether it still runs (not a zombie), from /proc/PID/stat: "pid (comm)
// S ppid ...", where the name may hold anything, so the fields after the last ')' are read. System
// calls and stack buffers only: the parent-death handler reads processes with it too.
bool read_process_entry(pid_t pid, ProcessEntry* entry) {
  char path[32];
  stat_path(pid, path);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char text[512];
  const ssize_t length = ::read(fd, text, sizeof(text));
  ::close(fd);
  if (length <= 0) return false;
  const char* after_name = nullptr;
  for (ssize_t i = 0; i < length; ++i) {
    if (text[i] == ')') after_name = text + i;
  }
  if (after_name == nullptr || after_name + 4 >= text + length) return false;
  const char state = after_name[2];
  long parent = 0;
  for (const char* p = after_name + 4; p < text + length && *p >= '0' && *p <= '9'; ++p) {
    parent = parent * 10 + (*p - '0');
  }
  *entry = {static_cast<pid_t>(parent), state != 'Z' && state != 'X'};
  return true;
}

// Every process's entry (read_process_entry).
std::unordered_map<pid_t, ProcessEntry> read_processes() {
  std::unordered_map<pid_t, ProcessEntry> processes;
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return processes;
  while (dirent* dir_entry = ::readdir(proc)) {
    char* end = nullptr;
    const long pid = std::strtol(dir_entry->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    ProcessEntry entry;
    if (read_process_entry(static_cast<pid_t>(pid), &entry)) {
      processes[static_cast<pid_t>(pid)] = entry;
    }
  }
  ::closedir(proc);
  return processes;
}

// What the parent-death handler kills (end_tree_with_parent sets them before the signal can
// come; the handler only reads them).
constexpr size_t kMaxPath = 4096;
char tree_kill_file[kMaxPath];   // the worker's v2 cgroup.kill, or empty
char tree_procs_file[kMaxPath];  // one of its cgroup.procs (each lists the same members), or empty
pid_t tree_root = 0;
constexpr int kDeathKillPasses = 200;

bool copy_path(char (&to)[kMaxPath], const std::string& from) {
  if (from.size() >= kMaxPath) return false;
  std::memcpy(to, from.c_str(), from.size() + 1);
  return true;
}

// The rest of this namespace runs in a signal handler that may have interrupted anything (malloc
// included): system calls and stack buffers only.

// SIGKILLs every process a cgroup.procs file lists but `self`. Returns how many.
int kill_listed_members(const char* procs, pid_t self) {
  const int fd = ::open(procs, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  int killed = 0;
  long pid = 0;
  bool in_number = false;
  char buffer[4096];
  for (ssize_t got; (got = ::read(fd, buffer, sizeof(buffer))) > 0;) {
    for (ssize_t i = 0; i < got; ++i) {
      if (buffer[i] >= '0' && buffer[i] <= '9') {
        pid = pid * 10 + (buffer[i] - '0');
        in_number = true;
        continue;
      }
      if (in_number && pid > 0 && pid != self) {
        ::kill(static_cast<pid_t>(pid), SIGKILL);
        ++killed;
      }
      pid = 0;
      in_number = false;
    }
  }
  if (in_number && pid > 0 && pid != self) {
    ::kill(static_cast<pid_t>(pid), SIGKILL);
    ++killed;
  }
  ::close(fd);
  return killed;
}

// SIGKILLs every living child of `self` (found through /proc: each process's parent) and reaps
// those that died. Returns how many were living.
int kill_living_children(pid_t self) {
  while (::waitpid(-1, nullptr, WNOHANG | __WALL) > 0) {
  }
  const int proc = ::open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (proc < 0) return 0;
  struct Entry {  // linux_dirent64
    uint64_t inode;
    int64_t offset;
    unsigned short length;
    unsigned char type;
    char name[1];
  };
  int living = 0;
  alignas(8) char entries[8192];
  for (long got; (got = ::syscall(SYS_getdents64, proc, entries, sizeof(entries))) > 0;) {
    for (long at = 0; at < got;) {
      const Entry* entry = reinterpret_cast<const Entry*>(entries + at);
      at += entry->length;
      long pid = 0;
      const char* c = entry->name;
      for (; *c >= '0' && *c <= '9'; ++c) pid = pid * 10 + (*c - '0');
      if (*c != '\0' || pid <= 0 || pid == self) continue;
      ProcessEntry process;
      if (!read_process_entry(static_cast<pid_t>(pid), &process)) continue;
      if (process.parent != self || !process.alive) continue;
      ::kill(static_cast<pid_t>(pid), SIGKILL);
      ++living;
    }
  }
  ::close(proc);
  return living;
}

void on_parent_death(int signal) {
  const pid_t self = ::getpid();
  if (self != tree_root) {
    // A process the task forked (without exec) inherits this handler, not the death signal.
    ::signal(signal, SIG_DFL);
    ::raise(signal);
    return;
  }
  if (tree_kill_file[0] != '\0') {
    // cgroup v2: everything in the worker's cgroup, the worker too, at once.
    const int fd = ::open(tree_kill_file, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
      (void)!::write(fd, "1", 1);
      ::close(fd);
    }
  }
  // Members of its cgroup one by one; every descendant: those of killed children are orphans,
  // reparented to us (the subreaper), and found in the next pass.
  for (int pass = 0; pass < kDeathKillPasses; ++pass) {
    int signalled = kill_living_children(self);
    if (tree_procs_file[0] != '\0') signalled += kill_listed_members(tree_procs_file, self);
    if (signalled == 0) break;
    const timespec pause{0, 1'000'000};
    ::nanosleep(&pause, nullptr);
  }
  if (::getpgrp() == self) ::kill(-self, SIGKILL);
  ::kill(self, SIGKILL);
}

}  // namespace

int tree_death_signal() { return SIGRTMAX - 3; }

void end_tree_with_parent(const std::vector<std::string>& cgroup_procs) {
  int death_signal = 0;
  if (::prctl(PR_GET_PDEATHSIG, &death_signal, 0, 0, 0) != 0 || death_signal == 0) return;
  tree_root = ::getpid();
  tree_kill_file[0] = '\0';
  tree_procs_file[0] = '\0';
  for (const std::string& procs : cgroup_procs) {
    if (tree_procs_file[0] == '\0') (void)copy_path(tree_procs_file, procs);
    const size_t slash = procs.rfind('/');
    if (slash == std::string::npos || tree_kill_file[0] != '\0') continue;
    const std::string kill_file = procs.substr(0, slash) + "/cgroup.kill";
    if (::access(kill_file.c_str(), W_OK) == 0) (void)copy_path(tree_kill_file, kill_file);
  }
  struct sigaction action {};
  action.sa_handler = on_parent_death;
  sigfillset(&action.sa_mask);
  ::sigaction(tree_death_signal(), &action, nullptr);
  sigset_t death;
  sigemptyset(&death);
  sigaddset(&death, tree_death_signal());
  ::sigprocmask(SIG_UNBLOCK, &death, nullptr);
  // A parent that died before this line sent SIGKILL, the signal set until now.
  ::prctl(PR_SET_PDEATHSIG, tree_death_signal(), 0, 0, 0);
}

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

bool reap_exited_children() {
  while (true) {
    const pid_t reaped = ::waitpid(-1, nullptr, WNOHANG | __WALL);
    if (reaped > 0) continue;
    if (reaped == 0) return true;  // children left, none exited
    if (errno == EINTR) continue;
    return false;  // ECHILD: none
  }
}

void end_own_tree() {
  // No child left once the exited ones are reaped: no descendant either (each would have an
  // ancestor among our children). The usual case, and it spares the scan of /proc.
  if (!reap_exited_children()) return;
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
