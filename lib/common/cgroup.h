// Cgroups for workers: one child cgroup per worker process, below the cgroups this process is in,
// through which the worker and everything it started (double-forked setsid daemons included) are
// killed at once, and which may hold it to a memory cap.
//
// Three kinds of host are served, as each mounts its hierarchies:
//   - cgroup v2 (one hierarchy, /sys/fs/cgroup): killed through `cgroup.kill` (Linux 5.14); the
//     cap is `memory.max` (swap kept out: `memory.swap.max` 0; `memory.oom.group` 1, so the whole
//     worker goes when one of its processes is OOM-killed), where the memory controller can be
//     enabled below our cgroup (it cannot when our own cgroup holds processes and is not a root:
//     the "no internal processes" rule).
//   - cgroup v1 (RHEL 7/8): frozen through the `freezer` hierarchy, every member killed, thawed;
//     the cap is the `memory` hierarchy's `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`
//     at the same value where the kernel accounts swap, so that nothing is swapped out instead).
//   - hybrid (v1 controllers plus a v2 `unified` mount without controllers): killed through the
//     v2 `cgroup.kill`, capped through v1 `memory`.
// Whatever is usable is found once (CgroupPlan::detect) by making a probe cgroup and removing it:
// "usable" means this process may create cgroups below its own (root, or a delegated subtree).
//
// The worker joins its cgroups itself, first thing after fork() (join_cgroups), before it runs
// anything that could fork: nothing it starts is ever outside them.
//
// Threads: CgroupPlan is immutable once made; a WorkerCgroup is not thread-safe.

#ifndef PROCPOOL_LIB_COMMON_CGROUP_H_
#define PROCPOOL_LIB_COMMON_CGROUP_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {

// The smallest max_worker_memory_bytes (but 0, no cap): less leaves no room to start a worker.
// Under RLIMIT_AS it is also the least room a worker must have above the address space it starts
// with (lib/worker/worker_main.cc).
inline constexpr size_t kMinWorkerMemoryBytes = size_t{16} << 20;

// Which cgroup mechanisms a pool's workers get on this host.
struct CgroupPlan {
  enum class Kill { kNone, kV2Kill, kV1Freezer };
  enum class Memory { kNone, kV2, kV1, kRlimitAs };

  Kill kill = Kill::kNone;
  Memory memory = Memory::kNone;
  size_t memory_bytes = 0;    // the cap (0: none)
  std::string kill_parent;    // the directory the kill cgroups are made in (our own cgroup)
  std::string memory_parent;  // the same for memory cgroups (equal to kill_parent for kV2 + kV2)
  bool v1_memsw = false;      // kV1: the kernel accounts swap (memory.memsw.limit_in_bytes)

  // Finds what is usable. `use_cgroups` false (Cgroups::kOff): none, and the cap, if any, is
  // RLIMIT_AS. Never fails: what cannot be used is left out. `allow_v2` false ignores a v2
  // hierarchy (tests use it to exercise v1 on a hybrid host).
  static CgroupPlan detect(bool use_cgroups, size_t memory_bytes, bool allow_v2 = true);
  bool uses_cgroups() const { return kill != Kill::kNone || memory == Memory::kV1 || memory == Memory::kV2; }
  // For a log line: "process trees are stopped through cgroup v2 cgroup.kill below
  // /sys/fs/cgroup/unified; memory cap 268435456 bytes through cgroup v1 memory.limit_in_bytes".
  std::string describe() const;
};

// One worker's cgroups: made by create(), killed and removed by the destructor (it waits, at most
// a few hundred milliseconds, for the killed processes to leave). Move-only.
class WorkerCgroup {
 public:
  // Makes the cgroups `plan` asks for, named `name` ("procpool-4242-w3-17"), and sets the cap.
  // `name` comes from PoolOptions::name: each byte that cannot be in one directory's name (a '/',
  // a newline, anything but letters, digits, '.', '_' and '-') is made a '_', so that the cgroup
  // is always one directory right below `plan`'s parents.
  static absl::StatusOr<WorkerCgroup> create(const CgroupPlan& plan, const std::string& name);
  WorkerCgroup(WorkerCgroup&& other) noexcept;
  WorkerCgroup& operator=(WorkerCgroup&& other) noexcept;
  WorkerCgroup(const WorkerCgroup&) = delete;
  WorkerCgroup& operator=(const WorkerCgroup&) = delete;
  ~WorkerCgroup();

  // The cgroup.procs files the worker writes its pid into (join_cgroups).
  const std::vector<std::string>& procs_files() const { return procs_files_; }
  // True when kill() stops the whole tree at once (a kill or freezer cgroup), not only the
  // members of a memory cgroup one by one.
  bool stops_tree() const { return !kill_dir_.empty(); }
  // SIGKILLs every process in the worker's cgroup (the worker too): through cgroup.kill, or by
  // freezing it, killing each member and thawing it. Does not wait for them to die.
  void kill() const;
  // The kernel's OOM killer killed a process of this cgroup because it reached the cap (v2
  // memory.events oom_kill, v1 memory.oom_control oom_kill or, on kernels without that line,
  // memory.failcnt).
  bool oom_killed() const;
  // "cgroup v2 memory.max" / "cgroup v1 memory.limit_in_bytes", for messages.
  const char* cap_name() const;
  // cgroup v1 memory: an eventfd that becomes readable when the OOM killer acts in the worker's
  // memory cgroup (its memory.oom_control, registered through cgroup.event_control). v1 has no
  // memory.oom.group: the killer takes the largest process, often a child of the task, and the
  // worker lives on; the pool, woken by this, kills the whole worker as v2 does. -1 otherwise.
  int oom_event_fd() const { return oom_event_.get(); }
  // Reads the eventfd's count out, so that a level-triggered wait does not report it again.
  void clear_oom_event() const;
  size_t memory_bytes() const { return memory_bytes_; }

 private:
  WorkerCgroup() = default;
  void remove();

  CgroupPlan::Kill kill_kind_ = CgroupPlan::Kill::kNone;
  CgroupPlan::Memory memory_kind_ = CgroupPlan::Memory::kNone;
  size_t memory_bytes_ = 0;
  std::string kill_dir_;
  std::string memory_dir_;  // empty without a memory cgroup; may equal kill_dir_
  std::vector<std::string> procs_files_;
  UniqueFd oom_event_;
};

// Removes the cgroups below `parent` that a pool which is gone left behind (one SIGKILLed cannot
// remove its workers'): named as create() and the probes name them, their maker's pid no longer
// exists, older than a minute, and empty. CgroupPlan::detect does it once per place.
void remove_abandoned_cgroups(const std::string& parent);

// In a worker just forked, before it runs anything that could fork: writes its pid into each of
// `procs_files`. Returns false if one could not be joined. Only open/write/close: safe after a
// fork from a threaded program.
bool join_cgroups(const std::vector<std::string>& procs_files);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_CGROUP_H_
