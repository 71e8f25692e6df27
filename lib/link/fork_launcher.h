// ForkLauncher: makes forked workers (StartMethod::kFork), or has the fork server make them
// (kForkServer), each behind a ForkLink.
//
// Threads: a worker dies with the thread that forked it (PR_SET_PDEATHSIG follows the thread), so
// launch() must be called from a thread that lives as long as the pool: the program's main thread
// in the pool's constructor, or the pool thread.

#ifndef PROCPOOL_LIB_LINK_FORK_LAUNCHER_H_
#define PROCPOOL_LIB_LINK_FORK_LAUNCHER_H_

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "lib/wire/tls_channel.h"
#include "lib/common/cgroup.h"
#include "lib/link/fork_link.h"
#include "lib/link/fork_server.h"
#include "lib/link/launcher.h"
#include "lib/worker/worker_main.h"
#include "procpool/internal/worker_body.h"
#include "procpool/pool_options.h"

namespace procpool::internal {

class ForkLauncher final : public Launcher {
 public:
  struct Config {
    std::string process_name_prefix;  // "procpool": workers are "procpool-w3", the server "-fs"
    bool fork_server = false;
    size_t max_frame_bytes = 0;
    absl::Duration frame_timeout;
    const WorkerBodyFactory* factory = nullptr;  // must outlive the launcher and its workers
    // Give each worker forked here a shared region for blobs (lib/wire/shared_region.h): for pools
    // whose jobs or results may hold byte strings. (Workers of the fork server have none.)
    bool blob_regions = false;
    // Each worker's process tree and memory cap (lib/common/cgroup.h): cgroups where they can be
    // made (kAuto), and the cap (0: none), as PoolOptions says.
    Cgroups cgroups = Cgroups::kOff;
    size_t max_worker_memory_bytes = 0;
    // Who the workers are and what they start with (WorkerPlacement): the pool's size and
    // PoolOptions::worker_env and cpu_affinity (kSpread: `spread_cpus`).
    int workers = 0;
    std::function<std::vector<std::pair<std::string, std::string>>(int)> worker_env;
    bool spread_cpus = false;
    // Workers' stdout and stderr are pipes their links read (PoolOptions::worker_output).
    bool forward_output = false;
    // Workers record the stack of a crash (PoolOptions::crash_backtraces).
    bool crash_backtraces = true;
  };
  explicit ForkLauncher(Config config);

  absl::StatusOr<std::unique_ptr<WorkerLink>> launch(int slot, const std::string& name) override;
  // Forks a worker whose channel is `channel` (a remote worker's data connection, which its relay
  // opened, its TLS handshake done): the worker goes on with the session; ours is dropped without
  // a word on the wire. The link returned has no channel of its own, only the process and its
  // control page. Direct fork only.
  absl::StatusOr<std::unique_ptr<ForkLink>> launch_on(int slot, const std::string& name,
                                                      std::unique_ptr<TlsChannel> channel,
                                                      WorkerPlacement placement = {});
  void watch_with(PollSet& set, uint32_t group) override;
  void service(const std::vector<PollSet::Fired>& fired, LauncherEvents& events) override;
  bool has_pending_events() const override;
  void set_workers(int workers) override { workers_ = workers; }

  // Starts the fork server now if the pool uses one and it is not running (a pool does so in its
  // constructor: the zygote should copy the program as early as possible).
  absl::Status ensure_server();

  // What stops its workers' trees and caps their memory here (for the pool's log).
  const CgroupPlan& cgroup_plan() const { return cgroup_plan_; }

 private:
  WorkerLaunch launch_for(int slot) const;
  // The cgroups of the worker about to start in `launch` (none where the plan has none); its
  // cgroup.procs files go into `launch`.
  absl::StatusOr<std::optional<WorkerCgroup>> make_cgroup(WorkerLaunch& launch);
  // launch_for(slot) with the slot's next process's placement (its generation counted once it
  // starts); kInvalidArgument when worker_env refuses.
  absl::StatusOr<WorkerLaunch> placed_launch_for(int slot);
  void take_server_reports(LauncherEvents& events);
  // Watches the fork server's reports, if it runs and the loop's set is known.
  void watch_server();

  const Config config_;
  const pid_t pool_pid_;
  const CgroupPlan cgroup_plan_;
  std::unique_ptr<ForkServer> server_;
  // The loop's set, and server_'s descriptor in it (after server_: it goes first).
  PollSet* poll_set_ = nullptr;
  uint32_t poll_group_ = 0;
  PollSet::Watch server_watch_;
  std::map<pid_t, ForkLink*> adopted_;  // workers of the server, by pid, while their link lives
  std::map<int, int64_t> generations_;  // processes started so far, by slot
  const std::vector<int> cpus_;         // for spread_cpus: the CPUs this process may use
  int workers_ = config_.workers;       // the pool's size now (set_workers)
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_FORK_LAUNCHER_H_
