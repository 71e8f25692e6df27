// WorkerProcess: one forked worker process, seen from the parent: its pid, a pidfd to poll for
// its exit and to signal it through (a pid that was reaped and reused can never be hit), and its
// wait status once it is gone. Without pidfds (before Linux 5.3) it is watched and signalled by
// pid only while it is not reaped (lib/common/child_process.h), and a fork server's worker is
// signalled by its server. The handle does not stop the process when destroyed: stopping is
// supervision's job (ask, wait with a deadline, SIGTERM, wait, SIGKILL, reap).

#ifndef PROCPOOL_LIB_LINK_WORKER_PROCESS_H_
#define PROCPOOL_LIB_LINK_WORKER_PROCESS_H_

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "lib/common/unique_fd.h"
#include "lib/wire/control_page.h"

namespace procpool::internal {

class WorkerProcess {
 public:
  WorkerProcess() = default;
  // Signals an adopted process through its parent, which alone knows whether it was reaped.
  using ParentSignal = std::function<void(int signal)>;
  // `pid` is our child unless `adopted` (a fork server's child, whose exit the server reports;
  // without pidfds it is signalled through `parent_signal`).
  WorkerProcess(pid_t pid, bool adopted, ParentSignal parent_signal = nullptr);
  WorkerProcess(WorkerProcess&&) = default;
  WorkerProcess& operator=(WorkerProcess&&) = default;

  pid_t pid() const { return pid_; }
  // Poll for POLLIN: the process has exited. -1 for an adopted process whose pidfd could not be
  // opened (it is gone already; its server reports it), and on a kernel without pidfds: then
  // exited() tells.
  int pidfd() const { return pidfd_.get(); }
  // Our child has exited (or was reaped by the program), looked at without reaping it.
  bool exited() const;
  bool adopted() const { return adopted_; }

  // Sends `signal` unless the process was already reaped.
  void kill(int signal) const;
  // Its tree (lib/common/process_tree.h), unless it was already reaped. kill_tree stops the
  // worker (SIGSTOP: it can neither report a task whose children it sees die, nor die and let
  // them go to init), SIGKILLs every living descendant, then sends it `signal` and SIGCONT.
  // kill_group sends `signal` to its process group (its pid, held until it is reaped).
  void kill_tree(int signal) const;
  void kill_group(int signal) const;
  // Our child's wait status once it has exited (reaping it); nullopt while it runs. When the
  // program reaped it first (SIGCHLD ignored, or a waitpid(-1) of its own), the status is
  // unknowable here: returns kNoWaitStatus and the caller asks the control page.
  static constexpr int kNoWaitStatus = -1;
  std::optional<int> try_reap();
  bool reaped() const { return reaped_; }
  // An adopted process's status arrived from its server.
  void mark_reaped() {
    reaped_ = true;
    pidfd_.reset();
  }

 private:
  pid_t pid_ = -1;
  bool adopted_ = false;
  UniqueFd pidfd_;
  ParentSignal parent_signal_;
  bool reaped_ = false;
};

// fork() for our children: stdout and stderr flushed first (unless another thread holds them: this
// never waits for a stream's lock), and every signal blocked across it (no handler of
// the parent's may run in the child before the child resets them). Returns 0 in the child, whose
// mask is still all-blocked; the child's pid in the parent, whose mask is restored. A failure is
// kResourceExhausted when the process limit is reached (EAGAIN: RLIMIT_NPROC or the pids
// cgroup), naming `what`.
absl::StatusOr<pid_t> fork_child(const char* what);

// "exited with status 3", "was killed by signal 9 (SIGKILL)". For kNoWaitStatus, what the
// control page recorded, or that it is unknown and why.
std::string describe_exit(int wait_status, const ControlPage* page);

// True when the worker left on its own with a status the protocol expects after a shutdown.
bool clean_exit(int wait_status, const ControlPage* page);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_WORKER_PROCESS_H_
