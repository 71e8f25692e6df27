// WorkerProcess: one forked worker, seen from the parent.
//
// `spawn` forks a child that runs the worker loop (worker_main.h) on its end of a fresh
// socketpair, and returns the parent's handle: pid, the parent end of the channel (non-blocking),
// a pidfd to poll for its exit, and its status page. Signals go through the pidfd, so a pid that
// was reaped and reused can never be hit. The handle does not stop the process when destroyed:
// stopping is the pool's job (ask, wait with a deadline, SIGTERM, wait, SIGKILL, reap).

#ifndef PROCPOOL_LIB_WORKER_PROCESS_H_
#define PROCPOOL_LIB_WORKER_PROCESS_H_

#include <sys/types.h>

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "lib/status_page.h"
#include "lib/unique_fd.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {

struct WorkerLaunch {
  int slot = 0;
  std::string process_name;             // prctl(PR_SET_NAME) in the child
  bool parent_death_signal = true;      // PR_SET_PDEATHSIG: only when the forking thread lives
                                        // as long as the pool (the signal follows that thread)
  size_t max_frame_bytes = 0;
  pid_t pool_pid = 0;                   // the only process whose SIGTERM the worker obeys
  const WorkerBodyFactory* factory = nullptr;
};

class WorkerProcess {
 public:
  static absl::StatusOr<WorkerProcess> spawn(const WorkerLaunch& launch);
  // A worker forked by the fork server: not our child, so its exit status comes from the server
  // (mark_reaped) rather than waitpid.
  static absl::StatusOr<WorkerProcess> adopt(pid_t pid, UniqueFd channel, StatusPageMapping page);

  WorkerProcess() = default;
  WorkerProcess(WorkerProcess&&) = default;
  WorkerProcess& operator=(WorkerProcess&&) = default;

  pid_t pid() const { return pid_; }
  int channel_fd() const { return channel_.get(); }
  int pidfd() const { return pidfd_.get(); }
  StatusPage* page() const { return page_.get(); }

  // Sends `signal` unless the process was already reaped.
  void kill(int signal) const;
  // The wait status once the process has exited (reaping it), nullopt while it runs.
  std::optional<int> try_reap();
  bool reaped() const { return reaped_; }
  void mark_reaped() {
    reaped_ = true;
    pidfd_.reset();
  }
  void close_channel() { channel_.reset(); }

 private:
  pid_t pid_ = -1;
  UniqueFd channel_;
  UniqueFd pidfd_;
  StatusPageMapping page_;
  bool reaped_ = false;
};

// fork() for our children: stdio flushed first (else buffered output is written twice) and every
// signal blocked across it (no handler of the parent's may run in the child before the child
// resets them). Returns 0 in the child, whose mask is still all-blocked; the child's pid in the
// parent, whose mask is restored.
absl::StatusOr<pid_t> fork_child(const char* what);

// "exited with status 3", "was killed by signal 9 (Killed)".
std::string describe_wait_status(int wait_status);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WORKER_PROCESS_H_
