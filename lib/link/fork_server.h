// ForkServer: StartMethod::kForkServer's zygote, a single-threaded process forked when the pool
// is made, that forks every worker (replacements too) on request.
//
// Why: a process with threads can be forked at a moment another thread holds a lock (in malloc,
// in a logging library, in the user's code); the child inherits the lock held, with no thread
// left to release it, and deadlocks when it takes it. The zygote has no threads, so a worker
// forked from it never inherits a lock held by another thread, however busy the program's threads
// are later. The workers are the zygote's children: it reaps them and reports their wait status
// to the parent. If the zygote dies its workers die with it (PR_SET_PDEATHSIG); if the parent
// dies the zygote sees end of file and exits.
//
// What it does not protect against: the zygote itself is a fork of the program, made when the
// pool is made (or, if it could not start then or died, when the pool thread starts it again). A
// lock another thread holds at that moment is held in the zygote and in every worker it forks.
// Make kForkServer pools early, before the threads that take such locks.

#ifndef PROCPOOL_LIB_LINK_FORK_SERVER_H_
#define PROCPOOL_LIB_LINK_FORK_SERVER_H_

#include <sys/types.h>

#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "lib/common/unique_fd.h"
#include "lib/wire/control_page.h"
#include "lib/worker/worker_main.h"

namespace procpool::internal {

class ForkServer {
 public:
  // Forks the zygote from the calling thread. `launch` is what every worker starts with (its
  // factory, limits, pool pid); `launch.process_name` names the zygote itself.
  static absl::StatusOr<std::unique_ptr<ForkServer>> start(const WorkerLaunch& launch);
  // Closes the control socket and reaps the zygote (SIGKILL after a short grace).
  ~ForkServer();

  // A worker forked by the server: its pid, the parent's end of its channel, its control page.
  struct Spawned {
    pid_t pid = -1;
    UniqueFd channel;
    ControlPageMapping page;
  };
  // Asks the zygote for a worker for `launch.slot`, named `launch.process_name`; waits (at most
  // a few seconds) for its pid. The zygote's own fork failing is its error.
  absl::StatusOr<Spawned> spawn(const WorkerLaunch& launch);

  // Asks the zygote to send `signal` to its worker `pid` of `slot`, unless it has reaped it
  // already (then the pid may be another process's). Does not wait. For kernels without pidfds.
  void signal(pid_t pid, int slot, int signal);

  // Poll this for reports.
  int fd() const { return control_.get(); }
  // Collects the (pid, wait status) of workers reaped since the last call. kUnavailable once the
  // zygote is gone.
  absl::Status take_exits(std::vector<std::pair<pid_t, int>>& exits);
  // True when reports read while waiting for a spawn reply are queued: the socket will not poll
  // readable for them, so take_exits() must be called without waiting for it.
  bool has_queued_exits() const { return !exits_.empty(); }

  pid_t pid() const { return pid_; }

 private:
  ForkServer() = default;
  // Reads one report, blocking up to `timeout_ms` (0: not at all). kUnavailable at end of file.
  absl::StatusOr<bool> read_report(int timeout_ms, pid_t* spawned, absl::Status* failed);

  pid_t pid_ = -1;
  UniqueFd control_;
  UniqueFd pidfd_;
  std::vector<std::pair<pid_t, int>> exits_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_FORK_SERVER_H_
