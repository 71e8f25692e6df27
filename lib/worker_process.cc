#include "lib/worker_process.h"

#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lib/worker_main.h"

namespace procpool::internal {

absl::StatusOr<pid_t> fork_child(const char* what) {
  // Anything buffered in stdio now would be written twice: once by us, once by the child.
  std::fflush(nullptr);
  // Block every signal across fork() so no handler of the parent's runs in the child before the
  // child has reset them.
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  const pid_t pid = ::fork();
  if (pid == 0) return pid;
  const int fork_errno = errno;
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (pid < 0) return absl::ErrnoToStatus(fork_errno, absl::StrCat("fork of ", what));
  return pid;
}

absl::StatusOr<WorkerProcess> WorkerProcess::spawn(const WorkerLaunch& launch) {
  absl::StatusOr<SocketPair> channel = make_socket_pair();
  if (!channel.ok()) return channel.status();
  absl::StatusOr<StatusPageMapping> page = StatusPageMapping::create();
  if (!page.ok()) return page.status();

  const pid_t parent = ::getpid();
  absl::StatusOr<pid_t> pid = fork_child("a worker");
  if (!pid.ok()) return pid.status();
  if (*pid == 0) {
    channel->parent_end.release();  // closed below with every other inherited descriptor
    worker_main(channel->child_end.release(), page->get(), launch, parent);
  }

  WorkerProcess worker;
  worker.pid_ = *pid;
  worker.channel_ = std::move(channel->parent_end);
  worker.page_ = *std::move(page);
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, *pid, 0));  // always O_CLOEXEC
  if (pidfd < 0) {
    const int open_errno = errno;
    ::kill(*pid, SIGKILL);
    ::waitpid(*pid, nullptr, 0);
    return absl::ErrnoToStatus(open_errno, "pidfd_open of a new worker");
  }
  worker.pidfd_.reset(pidfd);
  if (absl::Status nonblocking = set_nonblocking(worker.channel_.get(), true); !nonblocking.ok()) {
    worker.kill(SIGKILL);
    ::waitpid(*pid, nullptr, 0);
    return nonblocking;
  }
  return worker;
}

absl::StatusOr<WorkerProcess> WorkerProcess::adopt(pid_t pid, UniqueFd channel,
                                                   StatusPageMapping page) {
  WorkerProcess worker;
  worker.pid_ = pid;
  worker.channel_ = std::move(channel);
  worker.page_ = std::move(page);
  // It may already be gone (ESRCH): then the fork server's report says so shortly.
  worker.pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (absl::Status nonblocking = set_nonblocking(worker.channel_.get(), true); !nonblocking.ok()) {
    worker.kill(SIGKILL);
    return nonblocking;
  }
  return worker;
}

void WorkerProcess::kill(int signal) const {
  if (reaped_ || pid_ <= 0) return;
  // Through the pidfd: a pid reaped and reused meanwhile cannot be hit.
  if (pidfd_.valid()) {
    ::syscall(SYS_pidfd_send_signal, pidfd_.get(), signal, nullptr, 0);
  } else {
    ::kill(pid_, signal);
  }
}

std::optional<int> WorkerProcess::try_reap() {
  if (reaped_) return std::nullopt;
  int status = 0;
  while (true) {
    pid_t got = ::waitpid(pid_, &status, WNOHANG);
    if (got == pid_) break;
    if (got == 0) return std::nullopt;
    if (errno == EINTR) continue;
    // ECHILD: someone else (a wait(-1) in the program) reaped our child. It is gone either way.
    status = 0;
    break;
  }
  reaped_ = true;
  pidfd_.reset();
  return status;
}

std::string describe_wait_status(int wait_status) {
  if (WIFSIGNALED(wait_status)) {
    int signal = WTERMSIG(wait_status);
    const char* name = ::sigabbrev_np(signal);
    return absl::StrFormat("was killed by signal %d (SIG%s)%s", signal, name ? name : "?",
                           WCOREDUMP(wait_status) ? ", core dumped" : "");
  }
  if (WIFEXITED(wait_status)) {
    return absl::StrFormat("exited with status %d", WEXITSTATUS(wait_status));
  }
  return absl::StrFormat("ended with wait status %d", wait_status);
}

}  // namespace procpool::internal
