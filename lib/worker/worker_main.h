// worker_main: what a forked worker process does from the moment fork() returns in the child
// until it exits. It never returns: a worker must not unwind into the parent's stack or run the
// parent's destructors and atexit handlers, so every way out is _exit() (child_setup.h: leave).

#ifndef PROCPOOL_LIB_WORKER_WORKER_MAIN_H_
#define PROCPOOL_LIB_WORKER_WORKER_MAIN_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "procpool/internal/protocol.capnp.h"

#include "lib/wire/control_page.h"
#include "lib/wire/shared_region.h"
#include "lib/wire/tls_channel.h"
#include "lib/worker/worker_placement.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {

// The CPUs this process may run on (sched_getaffinity), ascending; empty if unknown.
std::vector<int> allowed_cpus();
// CpuAffinity::kSpread: slot i's CPU is the i-th of `cpus`, round robin; -1 if there are none.
int spread_cpu(const std::vector<int>& cpus, int slot);

// What a forked worker starts with.
struct WorkerLaunch {
  int slot = 0;
  std::string process_name;         // prctl(PR_SET_NAME) in the child
  bool parent_death_signal = true;  // PR_SET_PDEATHSIG: only when the forking thread lives as
                                    // long as the pool (the signal follows that thread)
  size_t max_frame_bytes = 0;
  pid_t pool_pid = 0;               // the only process whose SIGTERM the worker obeys
  const WorkerBodyFactory* factory = nullptr;
  // Results may be held back for one write in the held-frames area after the control page, where
  // the pool finds them if the worker dies (control_page.h). Only where the pool maps that page:
  // a remote worker's page is its relay's, so it sends every piece at once.
  bool hold_results = true;
  // Its process tree (lib/common/cgroup.h, process_tree.h): the cgroup.procs files it joins
  // before anything else, and its RLIMIT_AS (0: none) where no memory cgroup caps it.
  std::vector<std::string> cgroup_procs;
  size_t address_space_limit = 0;
  WorkerPlacement placement;
  bool crash_backtraces = true;  // record the stack of a crash (child_setup.h)
  // Forwarded output (PoolOptions::worker_output): the write ends of the pipes its stdout and
  // stderr become in the child, or -1 to keep what it inherits. Owned by whoever forks.
  int stdout_fd = -1;
  int stderr_fd = -1;
  // Its output pipes are read by its relay, not by whoever reads its frames (a remote worker):
  // before a frame goes out, the worker gives the relay a moment to read what is in them
  // (ChannelTransport), so that lines are read while its record still names the task that wrote
  // them (lib/link/worker_link.h, OutputPlace).
  bool output_read_elsewhere = false;
};

// Prepares the child (child_setup.h) around `channel_fd`, then serves tasks on it
// (task_server.h) and leaves with the status that gives. `page` was mapped by ControlPageMapping:
// its held frames (control_page.h) follow it.
// `region`: the worker's blob region (lib/wire/shared_region.h), or null.
// `tls`: the session over `channel_fd` (a remote worker's data connection), which the worker
// reads and writes through from then on; null for a plain channel.
[[noreturn]] void worker_main(int channel_fd, ControlPage* page, const WorkerLaunch& launch,
                              pid_t parent_pid, SharedRegion* region = nullptr,
                              TlsChannel* tls = nullptr);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WORKER_WORKER_MAIN_H_
