// The kernel calls procpool makes on its own child processes, on every kernel it runs on
// (Linux 4.18 and newer): the one place that decides between pidfds and their fallback.
//
// With pidfds (Linux 5.3: pidfd_open, pidfd_send_signal) a child is polled and signalled through
// its pidfd, which names that process and no other even once its pid is reaped and reused.
// Without them (RHEL 8 / Rocky 8's 4.18, or a seccomp policy that answers ENOSYS) the same is done
// by pid, safely: a child that is not reaped yet keeps its pid, so a pid is signalled only after
// waitid(P_PID, WNOWAIT), which reaps nothing, says it is still our child and still running. Its
// exit then wakes nothing: the caller looks (child_state()) every kChildLookIntervalNs, and every
// kChildExitingLookIntervalNs once its channel has closed. No SIGCHLD handler is installed and no
// wait names any pid but the caller's own children, so the program's own children and its own
// SIGCHLD handling are left alone.
//
// The fallback's one gap: a program that reaps the pool's children itself (SIGCHLD ignored, a
// waitpid(-1) of its own) frees a worker's pid before the pool looks, and were that pid taken by
// another child of this process within the look interval (the kernel would have to cycle through
// every pid first), a stop of the dead worker would reach it. With pidfds it cannot happen.
//
// Whether the kernel has each call is learnt from its first ENOSYS and remembered for the process
// (and its forks). close_range (Linux 5.9) likewise: without it descriptors are closed by walking
// /proc/self/fd. procpool never calls clone3; glibc's fork(), posix_spawn() and pthread_create()
// fall back from it by themselves.

#ifndef PROCPOOL_LIB_COMMON_CHILD_PROCESS_H_
#define PROCPOOL_LIB_COMMON_CHILD_PROCESS_H_

#include <sys/types.h>

#include <cstdint>

#include "lib/common/unique_fd.h"

namespace procpool::internal {

// Without a pidfd, how often a watched child is looked at, and how often once its channel has
// closed (it is exiting: the kernel closes its descriptors just before it becomes a zombie).
inline constexpr int64_t kChildLookIntervalNs = 20'000'000;
inline constexpr int64_t kChildExitingLookIntervalNs = 1'000'000;
// How often a child is looked at itself even when any_child_exited() says no child has exited.
inline constexpr int64_t kChildOwnLookIntervalNs = 1'000'000'000;

// A pidfd for `pid` (O_CLOEXEC, never 0-2), or an invalid one with errno set: ENOSYS when the
// kernel has none (remembered: no further call is made), ESRCH when the process is gone.
UniqueFd open_pidfd(pid_t pid);

// False once pidfd_open has failed with ENOSYS (or EPERM, which it never returns for itself:
// a seccomp policy that refuses it) in this process.
bool pidfds_available();

// Our child `pid`, looked at without reaping it.
enum class ChildState {
  kRunning,  // not exited (a stopped child counts)
  kExited,   // exited, not reaped yet (a zombie)
  kGone,     // not our child any more: reaped (by someone else: SIGCHLD ignored, waitpid(-1))
};
ChildState child_state(pid_t pid);

// Whether any child of this process may have exited and not been reaped yet: one
// waitid(P_ALL, WNOWAIT), which reaps nothing, where looking at each child would take one call
// each. A caller that looks at many children on the same wakeup (every worker of a pool, without
// pidfds) skips them all when none has exited. The answer is kept for kAnyChildExitedReuseNs on
// the calling thread: a child that exits just after it is seen at the next look. True when the
// program has exited children of its own that it has not reaped (then each is looked at).
bool any_child_exited(int64_t now_ns);
inline constexpr int64_t kAnyChildExitedReuseNs = 500'000;

// Sends `signal` to the process of `pidfd`. False only when the kernel has no pidfd_send_signal
// (remembered); the caller then signals by other means.
bool signal_through_pidfd(int pidfd, int signal);

// Sends `signal` to our child `pid` (through `pidfd` when valid, else by pid while child_state()
// says it is running): never to a pid that was reaped, which may be another process's by now.
void signal_child(pid_t pid, int pidfd, int signal);

// Waits up to `timeout_ms` for our child `pid` to exit, without reaping it. True if it did.
bool wait_for_child_exit(pid_t pid, int pidfd, int timeout_ms);

// Closes every descriptor numbered `first` or above: close_range, or one by one as /proc/self/fd
// lists them (or up to RLIMIT_NOFILE when /proc is not mounted). Async-signal-safe: for a child
// just forked from a process with threads (no allocation, no lock).
void close_descriptors_from(int first);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_CHILD_PROCESS_H_
