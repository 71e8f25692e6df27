#include "lib/link/worker_process.h"

#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lib/common/child_process.h"
#include "lib/common/process_tree.h"
#include "lib/fault_injection.h"
#include "lib/worker/child_setup.h"

namespace procpool::internal {
namespace {

// Flushes the streams a child shares with us, stdout and stderr, so that what we printed before
// the fork comes out before what the child prints. Never waits for a stream's lock: a thread of
// the program may hold it for as long as it likes (an fgets() on stdin until a line is typed, a
// printf() into a full pipe), and fflush(nullptr) would wait for every stream's lock while holding
// glibc's list of streams, so the pool's lock, its forks and every fopen() of the program would
// wait with it. A stream skipped here loses nothing: the child discards its copy of the buffer
// (child_setup.h) and we write it later. Every other stream's descriptor is closed in the child,
// so flushing it first would change nothing.
void flush_shared_streams() {
  for (FILE* stream : {stdout, stderr}) {
    if (::ftrylockfile(stream) != 0) continue;
    ::fflush_unlocked(stream);
    ::funlockfile(stream);
  }
}

// How long kill_tree waits for SIGSTOP to take: 100 µs at a time, 100 ms in all.
constexpr int kStopWaitTries = 1000;

std::string signal_name(int signal) {
  const char* name = ::sigabbrev_np(signal);
  return absl::StrFormat("signal %d (SIG%s)", signal, name ? name : "?");
}

}  // namespace

WorkerProcess::WorkerProcess(pid_t pid, bool adopted, ParentSignal parent_signal)
    : pid_(pid), adopted_(adopted), parent_signal_(std::move(parent_signal)) {
  // An adopted process may be gone already (ESRCH): its server reports it.
  pidfd_ = open_pidfd(pid);
}

void WorkerProcess::kill(int signal) const {
  if (reaped_ || pid_ <= 0) return;
  // Through the pidfd: a pid reaped and reused meanwhile cannot be hit. Without one, our child
  // by pid while it is not reaped; an adopted one by its parent, which knows whether it reaped it.
  if (!adopted_) {
    signal_child(pid_, pidfd_.get(), signal);
    return;
  }
  if (pidfd_.valid() && signal_through_pidfd(pidfd_.get(), signal)) return;
  if (parent_signal_) parent_signal_(signal);
}

bool WorkerProcess::exited() const {
  return !reaped_ && !adopted_ && child_state(pid_) != ChildState::kRunning;
}

void WorkerProcess::kill_tree(int signal) const {
  if (reaped_ || pid_ <= 0) return;
  // A worker stopped by someone else stays stopped (its SIGTERM waits, and SIGKILL comes after
  // kill_grace, as without a tree); one stopped here is continued.
  const std::string stat_path = absl::StrCat("/proc/", pid_, "/stat");
  auto state = [&stat_path]() -> char {
    char text[512];
    std::FILE* stat = std::fopen(stat_path.c_str(), "re");
    if (stat == nullptr) return 'X';
    const size_t got = std::fread(text, 1, sizeof(text) - 1, stat);
    std::fclose(stat);
    text[got] = '\0';
    const char* after_name = std::strrchr(text, ')');
    return after_name == nullptr || after_name[1] == '\0' ? 'X' : after_name[2];
  };
  auto stopped = [](char s) { return s == 'T' || s == 't' || s == 'Z' || s == 'X'; };
  const bool stopped_before = stopped(state());
  kill(SIGSTOP);
  // SIGSTOP takes effect when the worker next leaves the kernel: wait (briefly) until it has.
  for (int i = 0; i < kStopWaitTries && !stopped(state()); ++i) ::usleep(100);
  internal::kill_descendants(pid_);
  kill(signal);
  if (!stopped_before) kill(SIGCONT);
}

void WorkerProcess::kill_group(int signal) const {
  // Not once reaped: the group's number may then belong to another process's group.
  if (!reaped_ && pid_ > 0) ::kill(-pid_, signal);
}

std::optional<int> WorkerProcess::try_reap() {
  if (reaped_ || adopted_) return std::nullopt;
  int status = 0;
  while (true) {
    const pid_t got = ::waitpid(pid_, &status, WNOHANG);
    if (got == pid_) break;
    if (got == 0) {
      // Still running, unless the pidfd says it has exited and someone else reaped it: with
      // SIGCHLD ignored, waitpid only reports ECHILD once it is gone, so check the pidfd too.
      return std::nullopt;
    }
    if (errno == EINTR) continue;
    // ECHILD: the program reaped our child itself. It is gone; how, waitpid cannot say.
    status = kNoWaitStatus;
    break;
  }
  reaped_ = true;
  pidfd_.reset();
  return status;
}

absl::StatusOr<pid_t> fork_child(const char* what) {
  if (const int injected = take_injected_fork_failure(); injected != 0) {
    errno = injected;
  } else {
    // Anything buffered now would be written by us; the child discards its copy (child_setup.h).
    flush_shared_streams();
    // Block every signal across fork() so no handler of the parent's runs in the child before
    // the child has reset them.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    const pid_t pid = ::fork();
    if (pid == 0) return pid;
    const int fork_errno = errno;
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    if (pid > 0) return pid;
    errno = fork_errno;
  }
  const int error = errno;
  if (error == EAGAIN || error == ENOMEM) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "could not fork ", what, ": ", std::strerror(error),
        error == EAGAIN ? " (the process limit is reached: RLIMIT_NPROC or the pids cgroup's "
                          "pids.max)"
                        : ""));
  }
  return absl::ErrnoToStatus(error, absl::StrCat("could not fork ", what));
}

std::string describe_exit(int wait_status, const ControlPage* page) {
  if (wait_status == WorkerProcess::kNoWaitStatus) {
    if (page != nullptr) {
      if (const int signal = page->fatal_signal.load(std::memory_order_relaxed); signal != 0) {
        return absl::StrCat("was killed by ", signal_name(signal));
      }
      if (const int status = page->exit_status.load(std::memory_order_relaxed); status >= 0) {
        return absl::StrFormat("exited with status %d", status);
      }
    }
    return "ended, how is unknown: this program reaps its children itself (SIGCHLD ignored, or "
           "a waitpid(-1) of its own), and the worker recorded no exit or fatal signal; most "
           "likely it was killed by SIGKILL";
  }
  if (WIFSIGNALED(wait_status)) {
    return absl::StrCat("was killed by ", signal_name(WTERMSIG(wait_status)),
                        WCOREDUMP(wait_status) ? ", core dumped" : "");
  }
  if (WIFEXITED(wait_status)) {
    return absl::StrFormat("exited with status %d", WEXITSTATUS(wait_status));
  }
  return absl::StrFormat("ended with wait status %d", wait_status);
}

bool clean_exit(int wait_status, const ControlPage* page) {
  int status = -1;
  if (wait_status == WorkerProcess::kNoWaitStatus) {
    if (page != nullptr && page->fatal_signal.load(std::memory_order_relaxed) == 0) {
      status = page->exit_status.load(std::memory_order_relaxed);
    }
  } else if (WIFEXITED(wait_status)) {
    status = WEXITSTATUS(wait_status);
  }
  return status == kWorkerExitOk || status == kWorkerExitExitHookFailed;
}

}  // namespace procpool::internal
