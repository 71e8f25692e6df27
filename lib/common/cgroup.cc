#include "lib/common/cgroup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "lib/common/mutex.h"

namespace procpool::internal {
namespace {

// Every cgroup this process makes has a name of its own (workers of several pools, probes).
std::atomic<uint64_t> next_cgroup_number{0};

// How long remove() waits for the processes it killed to leave before it gives up on the
// directory (a process in uninterruptible sleep, say): it is then left behind, empty soon.
constexpr int kRemoveTries = 300;
constexpr useconds_t kRemoveWaitUs = 1000;
// How many taken names create() skips before it gives up.
constexpr int kNameTries = 64;
// How long a v1 freeze may take before the members are killed anyway.
constexpr int kFreezeTries = 200;

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

bool write_text(const std::string& path, absl::string_view text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t put = ::write(fd, text.data(), text.size());
  const int error = errno;
  ::close(fd);
  errno = error;
  return put == static_cast<ssize_t>(text.size());
}

bool exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// The value after `key ` in a flat keyed file (memory.events, memory.oom_control); -1 if none.
int64_t keyed_value(const std::string& text, absl::string_view key) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, key) || !absl::ConsumePrefix(&line, " ")) continue;
    int64_t value = 0;
    if (absl::SimpleAtoi(line, &value)) return value;
  }
  return -1;
}

// Where this process's cgroups are, per hierarchy: the directory of our own cgroup in a mount of
// it, or empty where that hierarchy is not mounted (or our cgroup is outside what is mounted).
struct OwnCgroups {
  std::string v2;
  std::string v1_memory;
  std::string v1_freezer;
};

// A mount's directory for cgroup `path`, given the cgroup at the mount's root.
std::string dir_in_mount(const std::string& mount_point, const std::string& mount_root,
                         const std::string& path) {
  if (mount_root == "/") return path == "/" ? mount_point : mount_point + path;
  if (path == mount_root) return mount_point;
  if (absl::StartsWith(path, mount_root + "/")) return mount_point + path.substr(mount_root.size());
  return "";
}

OwnCgroups find_own_cgroups() {
  // /proc/self/cgroup: "0::/path" (v2), "4:memory:/path", "6:freezer:/path", "1:cpu,cpuacct:/p".
  std::string v2_path, memory_path, freezer_path;
  bool have_v2 = false;
  for (absl::string_view line : absl::StrSplit(read_text("/proc/self/cgroup"), '\n')) {
    std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) continue;
    if (parts[0] == "0" && parts[1].empty()) {
      have_v2 = true;
      v2_path = parts[2];
    }
    for (absl::string_view controller : absl::StrSplit(parts[1], ',')) {
      if (controller == "memory") memory_path = parts[2];
      if (controller == "freezer") freezer_path = parts[2];
    }
  }
  // /proc/self/mountinfo: "id parent maj:min root mount-point options ... - fstype source super".
  OwnCgroups own;
  for (absl::string_view line : absl::StrSplit(read_text("/proc/self/mountinfo"), '\n')) {
    const size_t dash = line.find(" - ");
    if (dash == absl::string_view::npos) continue;
    std::vector<std::string> fields = absl::StrSplit(line.substr(0, dash), ' ');
    std::vector<std::string> tail = absl::StrSplit(line.substr(dash + 3), ' ');
    if (fields.size() < 5 || tail.size() < 3) continue;
    const std::string& root = fields[3];
    const std::string& mount_point = fields[4];
    if (mount_point.find('\\') != std::string::npos) continue;  // an escaped name: not ours
    if (tail[0] == "cgroup2" && have_v2 && own.v2.empty()) {
      own.v2 = dir_in_mount(mount_point, root, v2_path);
    } else if (tail[0] == "cgroup") {
      for (absl::string_view option : absl::StrSplit(tail[2], ',')) {
        if (option == "memory" && !memory_path.empty() && own.v1_memory.empty()) {
          own.v1_memory = dir_in_mount(mount_point, root, memory_path);
        }
        if (option == "freezer" && !freezer_path.empty() && own.v1_freezer.empty()) {
          own.v1_freezer = dir_in_mount(mount_point, root, freezer_path);
        }
      }
    }
  }
  return own;
}

// Makes a cgroup below `parent` and removes it again; `has` says which of its files exist.
struct Probe {
  bool made = false;
  bool kill = false;         // v2 cgroup.kill
  bool memory_max = false;   // v2 memory.max
  bool limit = false;        // v1 memory.limit_in_bytes
  bool memsw = false;        // v1 memory.memsw.limit_in_bytes
  bool freezer = false;      // v1 freezer.state
};

Probe probe(const std::string& parent) {
  Probe found;
  if (parent.empty()) return found;
  const std::string dir = absl::StrCat(parent, "/procpool-probe-", ::getpid(), "-",
                                       next_cgroup_number.fetch_add(1));
  if (::mkdir(dir.c_str(), 0755) != 0) return found;
  found.made = true;
  found.kill = exists(dir + "/cgroup.kill");
  found.memory_max = exists(dir + "/memory.max");
  found.limit = exists(dir + "/memory.limit_in_bytes");
  found.memsw = exists(dir + "/memory.memsw.limit_in_bytes");
  found.freezer = exists(dir + "/freezer.state");
  ::rmdir(dir.c_str());
  return found;
}

// v2: the memory controller for our children, enabled if it is not (and can be).
bool enable_v2_memory(const std::string& own) {
  auto listed = [](const std::string& text) {
    for (absl::string_view word : absl::StrSplit(text, absl::ByAnyChar(" \n"))) {
      if (word == "memory") return true;
    }
    return false;
  };
  if (listed(read_text(own + "/cgroup.subtree_control"))) return true;
  if (!listed(read_text(own + "/cgroup.controllers"))) return false;
  return write_text(own + "/cgroup.subtree_control", "+memory");
}

// Pools that were SIGKILLed (or died in exit()) could not remove their workers' cgroups. The names
// this file gives ("<prefix>-<pid>-w<slot>-<n>", "procpool-probe-<pid>-<n>") carry the maker's pid:
// a cgroup below `parent` whose maker is gone and which is older than a minute (so never one that
// a pool in another pid namespace has just made and not yet joined) is removed. rmdir() removes
// only an empty cgroup: one still holding a process stays.
constexpr time_t kAbandonedAfterSeconds = 60;

std::optional<pid_t> maker_pid(absl::string_view name) {
  const std::vector<absl::string_view> parts = absl::StrSplit(name, '-');
  auto number = [](absl::string_view text) {
    int64_t value = 0;
    return !text.empty() && absl::SimpleAtoi(text, &value) && value >= 0 ? value : int64_t{-1};
  };
  const size_t n = parts.size();
  int64_t pid = -1;
  if (n == 4 && parts[0] == "procpool" && parts[1] == "probe") {
    pid = number(parts[3]) >= 0 ? number(parts[2]) : -1;  // "procpool-probe-<pid>-<n>"
  } else if (n >= 4 && absl::StartsWith(parts[n - 2], "w") && number(parts[n - 2].substr(1)) >= 0 &&
             number(parts[n - 1]) >= 0) {
    pid = number(parts[n - 3]);  // "<prefix>-<pid>-w<slot>-<n>"
  }
  if (pid <= 0) return std::nullopt;
  return static_cast<pid_t>(pid);
}

// Sends SIGKILL to every process listed in `procs` (a cgroup.procs file). Returns how many.
int kill_listed(const std::string& procs) {
  int killed = 0;
  for (absl::string_view line : absl::StrSplit(read_text(procs), '\n')) {
    int pid = 0;
    if (absl::SimpleAtoi(line, &pid) && pid > 0 && pid != ::getpid()) {
      ::kill(pid, SIGKILL);
      ++killed;
    }
  }
  return killed;
}

// `name` as one directory's name: a '/' would put the cgroup elsewhere (above our own, after a
// "../"), and the kernel refuses a newline.
std::string directory_name(absl::string_view name) {
  std::string safe(name);
  for (char& c : safe) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      c = '_';
    }
  }
  return safe;
}

}  // namespace

void remove_abandoned_cgroups(const std::string& parent) {
  if (parent.empty()) return;
  DIR* dir = ::opendir(parent.c_str());
  if (dir == nullptr) return;
  const time_t now = ::time(nullptr);
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_type != DT_DIR) continue;
    const std::optional<pid_t> maker = maker_pid(entry->d_name);
    if (!maker || *maker == ::getpid() || ::kill(*maker, 0) == 0 || errno != ESRCH) continue;
    const std::string path = absl::StrCat(parent, "/", entry->d_name);
    struct stat info;
    if (::stat(path.c_str(), &info) != 0 || now - info.st_mtime < kAbandonedAfterSeconds) continue;
    (void)::rmdir(path.c_str());
  }
  ::closedir(dir);
}

CgroupPlan CgroupPlan::detect(bool use_cgroups, size_t memory_bytes, bool allow_v2) {
  CgroupPlan plan;
  plan.memory_bytes = memory_bytes;
  if (!use_cgroups) {
    plan.memory = memory_bytes > 0 ? Memory::kRlimitAs : Memory::kNone;
    return plan;
  }
  OwnCgroups own = find_own_cgroups();
  if (!allow_v2) own.v2.clear();
  // Probing makes and removes cgroups: done once per place this process is in (a pool made
  // often, in a loop or per request, does not pay it each time).
  static Mutex mu;
  static auto* known = new std::map<std::string, CgroupPlan>();
  const std::string key = absl::StrCat(own.v2, "|", own.v1_freezer, "|", own.v1_memory, "|",
                                       memory_bytes > 0 ? "memory" : "");
  MutexLock lock(mu);
  if (auto it = known->find(key); it != known->end()) {
    plan = it->second;
    plan.memory_bytes = memory_bytes;
    return plan;
  }
  for (const std::string* parent : {&own.v2, &own.v1_freezer, &own.v1_memory}) {
    remove_abandoned_cgroups(*parent);
  }
  const Probe v2 = probe(own.v2);
  if (v2.made && v2.kill) {
    plan.kill = Kill::kV2Kill;
    plan.kill_parent = own.v2;
  } else {
    const Probe freezer = probe(own.v1_freezer);
    if (freezer.made && freezer.freezer) {
      plan.kill = Kill::kV1Freezer;
      plan.kill_parent = own.v1_freezer;
    }
  }
  if (memory_bytes > 0) {
    if (v2.made && enable_v2_memory(own.v2) && probe(own.v2).memory_max) {
      plan.memory = Memory::kV2;
      plan.memory_parent = own.v2;
    } else if (const Probe v1 = probe(own.v1_memory); v1.made && v1.limit) {
      plan.memory = Memory::kV1;
      plan.memory_parent = own.v1_memory;
      plan.v1_memsw = v1.memsw;
    } else {
      plan.memory = Memory::kRlimitAs;
    }
  }
  (*known)[key] = plan;
  return plan;
}

std::string CgroupPlan::describe() const {
  std::string text;
  switch (kill) {
    case Kill::kV2Kill:
      text = absl::StrCat("workers' process trees are stopped through cgroup v2 cgroup.kill below ",
                          kill_parent);
      break;
    case Kill::kV1Freezer:
      text = absl::StrCat("workers' process trees are stopped through the cgroup v1 freezer below ",
                          kill_parent);
      break;
    case Kill::kNone:
      text = "workers' process trees are stopped through their process groups and /proc (no "
             "cgroup: a descendant that left the tree before its worker ended may survive)";
      break;
  }
  switch (memory) {
    case Memory::kNone:
      break;
    case Memory::kV2:
      absl::StrAppend(&text, "; max_worker_memory_bytes ", memory_bytes,
                      " is enforced through cgroup v2 memory.max below ", memory_parent);
      break;
    case Memory::kV1:
      absl::StrAppend(&text, "; max_worker_memory_bytes ", memory_bytes,
                      " is enforced through cgroup v1 memory.limit_in_bytes",
                      v1_memsw ? " (and memory.memsw.limit_in_bytes)" : "", " below ",
                      memory_parent);
      break;
    case Memory::kRlimitAs:
      absl::StrAppend(&text, "; max_worker_memory_bytes ", memory_bytes,
                      " is enforced through RLIMIT_AS (no usable memory cgroup): allocations past "
                      "it fail inside the task");
      break;
  }
  return text;
}

absl::StatusOr<WorkerCgroup> WorkerCgroup::create(const CgroupPlan& plan, const std::string& name) {
  const std::string safe_name = directory_name(name);
  WorkerCgroup made;
  made.kill_kind_ = plan.kill;
  made.memory_kind_ = plan.memory;
  made.memory_bytes_ = plan.memory_bytes;
  auto make_dir = [&](const std::string& parent) -> absl::StatusOr<std::string> {
    // The name holds our pid, so one that exists was left by an earlier process with that pid
    // (one that was killed, or one in another pid namespace): another number is taken.
    std::string dir;
    for (int tries = 0;; ++tries) {
      dir = absl::StrCat(parent, "/", safe_name, "-", next_cgroup_number.fetch_add(1));
      if (::mkdir(dir.c_str(), 0755) == 0) break;
      if (errno != EEXIST || tries == kNameTries) {
        return absl::ErrnoToStatus(errno, absl::StrCat("could not make the worker's cgroup ", dir));
      }
    }
    made.procs_files_.push_back(dir + "/cgroup.procs");
    return dir;
  };
  if (plan.kill != CgroupPlan::Kill::kNone) {
    absl::StatusOr<std::string> dir = make_dir(plan.kill_parent);
    if (!dir.ok()) return dir.status();
    made.kill_dir_ = *dir;
  }
  if (plan.memory == CgroupPlan::Memory::kV2 || plan.memory == CgroupPlan::Memory::kV1) {
    if (plan.memory_parent == plan.kill_parent && !made.kill_dir_.empty()) {
      made.memory_dir_ = made.kill_dir_;
    } else {
      absl::StatusOr<std::string> dir = make_dir(plan.memory_parent);
      if (!dir.ok()) return dir.status();  // `made` removes the kill cgroup as it goes
      made.memory_dir_ = *dir;
    }
    const std::string bytes = absl::StrCat(plan.memory_bytes);
    bool set = false;
    if (plan.memory == CgroupPlan::Memory::kV2) {
      set = write_text(made.memory_dir_ + "/memory.max", bytes);
      // Swap would let the worker grow past the cap on disk; one process OOM-killed kills all.
      (void)write_text(made.memory_dir_ + "/memory.swap.max", "0");
      (void)write_text(made.memory_dir_ + "/memory.oom.group", "1");
    } else {
      set = write_text(made.memory_dir_ + "/memory.limit_in_bytes", bytes);
      // memsw (memory + swap) must not be below the limit: set after it, to the same value.
      if (set && plan.v1_memsw) {
        set = write_text(made.memory_dir_ + "/memory.memsw.limit_in_bytes", bytes);
      }
      (void)write_text(made.memory_dir_ + "/memory.swappiness", "0");
      // The OOM watch (oom_event_fd). Without one, a child of the task that crosses the cap dies
      // alone: the cap still holds, only the task's failure is then its own to report.
      UniqueFd event = own_fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      UniqueFd control =
          own_fd(::open((made.memory_dir_ + "/memory.oom_control").c_str(), O_RDONLY | O_CLOEXEC));
      if (event && control &&
          write_text(made.memory_dir_ + "/cgroup.event_control",
                     absl::StrCat(event.get(), " ", control.get()))) {
        made.oom_event_ = std::move(event);
      }
    }
    if (!set) {
      return absl::ErrnoToStatus(errno, absl::StrCat("could not set the memory cap (",
                                                     plan.memory_bytes, " bytes) of cgroup ",
                                                     made.memory_dir_));
    }
  }
  return made;
}

WorkerCgroup::WorkerCgroup(WorkerCgroup&& other) noexcept { *this = std::move(other); }

WorkerCgroup& WorkerCgroup::operator=(WorkerCgroup&& other) noexcept {
  if (this == &other) return *this;
  remove();
  kill_kind_ = other.kill_kind_;
  memory_kind_ = other.memory_kind_;
  memory_bytes_ = other.memory_bytes_;
  kill_dir_ = std::exchange(other.kill_dir_, {});
  memory_dir_ = std::exchange(other.memory_dir_, {});
  procs_files_ = std::exchange(other.procs_files_, {});
  oom_event_ = std::move(other.oom_event_);
  return *this;
}

void WorkerCgroup::clear_oom_event() const {
  uint64_t count = 0;
  if (oom_event_) (void)!::read(oom_event_.get(), &count, sizeof(count));
}

WorkerCgroup::~WorkerCgroup() { remove(); }

void WorkerCgroup::kill() const {
  if (kill_dir_.empty()) {
    // A memory cgroup alone: kill its members one by one (a fork may slip through; remove()
    // kills again until it is empty).
    if (!memory_dir_.empty()) kill_listed(memory_dir_ + "/cgroup.procs");
    return;
  }
  if (kill_kind_ == CgroupPlan::Kill::kV2Kill) {
    (void)write_text(kill_dir_ + "/cgroup.kill", "1");
    return;
  }
  // v1: frozen, nothing in it can fork while its members are killed one by one; SIGKILL is
  // delivered as it thaws.
  const std::string state = kill_dir_ + "/freezer.state";
  (void)write_text(state, "FROZEN");
  for (int i = 0; i < kFreezeTries && !absl::StartsWith(read_text(state), "FROZEN"); ++i) {
    ::usleep(100);
    (void)write_text(state, "FROZEN");
  }
  kill_listed(kill_dir_ + "/cgroup.procs");
  (void)write_text(state, "THAWED");
}

bool WorkerCgroup::oom_killed() const {
  if (memory_dir_.empty()) return false;
  if (memory_kind_ == CgroupPlan::Memory::kV2) {
    return keyed_value(read_text(memory_dir_ + "/memory.events"), "oom_kill") > 0;
  }
  const int64_t oom_kills = keyed_value(read_text(memory_dir_ + "/memory.oom_control"), "oom_kill");
  if (oom_kills >= 0) return oom_kills > 0;
  int64_t failures = 0;
  return absl::SimpleAtoi(absl::StripAsciiWhitespace(read_text(memory_dir_ + "/memory.failcnt")),
                          &failures) &&
         failures > 0;
}

const char* WorkerCgroup::cap_name() const {
  return memory_kind_ == CgroupPlan::Memory::kV2 ? "cgroup v2 memory.max"
                                                 : "cgroup v1 memory.limit_in_bytes";
}

void WorkerCgroup::remove() {
  if (kill_dir_.empty() && memory_dir_.empty()) return;
  kill();
  for (const std::string* dir : {&memory_dir_, &kill_dir_}) {
    if (dir->empty() || (dir == &kill_dir_ && *dir == memory_dir_)) continue;
    for (int i = 0; i < kRemoveTries && ::rmdir(dir->c_str()) != 0 && errno == EBUSY; ++i) {
      // Killed processes take a moment to leave; one forked as we killed needs killing again.
      if (i % 20 == 19) kill();
      if (dir == &memory_dir_ && kill_dir_.empty()) kill_listed(*dir + "/cgroup.procs");
      ::usleep(kRemoveWaitUs);
    }
  }
  kill_dir_.clear();
  memory_dir_.clear();
  procs_files_.clear();
}

bool join_cgroups(const std::vector<std::string>& procs_files) {
  // The pid in decimal, without allocating (we may be the child of a threaded program's fork).
  char digits[24];
  char* end = digits + sizeof(digits);
  char* at = end;
  for (unsigned long pid = static_cast<unsigned long>(::getpid()); at == end || pid != 0; pid /= 10) {
    *--at = static_cast<char>('0' + pid % 10);
  }
  for (const std::string& procs : procs_files) {
    const int fd = ::open(procs.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) return false;
    const bool joined = ::write(fd, at, static_cast<size_t>(end - at)) == end - at;
    ::close(fd);
    if (!joined) return false;
  }
  return true;
}

}  // namespace procpool::internal
