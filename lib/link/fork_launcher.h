// ForkLauncher: makes forked workers (StartMethod::kFork), or has the fork server make them
// (kForkServer), each behind a ForkLink.
//
// Threads: a worker dies with the thread that forked it (PR_SET_PDEATHSIG follows the thread), so
// launch() must be called from a thread that lives as long as the pool: the program's main thread
// in the pool's constructor, or the pool thread.

#ifndef PROCPOOL_LIB_LINK_FORK_LAUNCHER_H_
#define PROCPOOL_LIB_LINK_FORK_LAUNCHER_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "lib/link/fork_link.h"
#include "lib/link/fork_server.h"
#include "lib/link/launcher.h"
#include "lib/worker/worker_main.h"
#include "procpool/internal/worker_body.h"

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
    // Workers' stdout and stderr are pipes their links read (PoolOptions::worker_output).
    bool forward_output = false;
    // Workers record the stack of a crash (PoolOptions::crash_backtraces).
    bool crash_backtraces = true;
  };
  explicit ForkLauncher(Config config);

  absl::StatusOr<std::unique_ptr<WorkerLink>> launch(int slot, const std::string& name) override;
  // Forks a worker whose channel is `channel` (a remote worker's data connection, which its relay
  // opened): the link returned has no channel of its own, only the process and its control page.
  // Direct fork only.
  absl::StatusOr<std::unique_ptr<ForkLink>> launch_on(int slot, const std::string& name,
                                                      UniqueFd channel);
  void add_pollfds(std::vector<pollfd>& fds) override;
  void service(const pollfd* polled, size_t count, LauncherEvents& events) override;
  bool has_pending_events() const override;

  // Starts the fork server now if the pool uses one and it is not running (a pool does so in its
  // constructor: the zygote should copy the program as early as possible).
  absl::Status ensure_server();

 private:
  WorkerLaunch launch_for(int slot) const;
  void take_server_reports(LauncherEvents& events);

  const Config config_;
  const pid_t pool_pid_;
  std::unique_ptr<ForkServer> server_;
  std::map<pid_t, ForkLink*> adopted_;  // workers of the server, by pid, while their link lives
  bool polled_server_ = false;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_FORK_LAUNCHER_H_
