// What every child procpool forks does first (workers and the fork server), and how it leaves.
//
// A child is a copy of a program that may run threads, hold buffered output and have its standard
// descriptors closed. Before it runs anything of its own it:
//   - discards every stdio buffer it inherited: bytes the program's threads buffered between the
//     flush before fork() and fork() itself belong to the parent, and flushing them here would
//     write them twice;
//   - names itself (prctl PR_SET_NAME), and dies with its parent (PR_SET_PDEATHSIG, where the
//     forking thread lives as long as the pool);
//   - resets every signal handler: SIGINT is ignored (the parent decides what Ctrl-C means),
//     SIGTERM is obeyed only when its pool (or its fork server, for the pool) sent it, and fatal
//     signals are recorded in its control page before they kill it (so a death is described
//     right even when the program reaps children itself and waitpid cannot tell the parent);
//   - with crash_backtraces, records the crashing thread's stack in its control page (each frame
//     as a file and an offset, named by whoever reads the page: control_page.h) when SIGSEGV,
//     SIGBUS, SIGFPE, SIGILL or SIGABRT kills it, then calls the handler the program
//     had installed for that signal, if any (the one it inherited at fork; see on_fatal_signal);
//   - keeps exactly one inherited descriptor, its channel, at fd 3, closes every other (close_range,
//     or by walking /proc/self/fd on kernels before 5.9: lib/common/child_process.h), and opens
//     /dev/null on whichever of 0, 1, 2 is closed, so a printf can never reach the channel; or, when
//     its output is forwarded, puts the pipes it was given on 1 and 2.

#ifndef PROCPOOL_LIB_WORKER_CHILD_SETUP_H_
#define PROCPOOL_LIB_WORKER_CHILD_SETUP_H_

#include <sys/types.h>

#include <string>

#include "lib/wire/control_page.h"

namespace procpool::internal {

// The channel's descriptor in every child.
inline constexpr int kChildChannelFd = 3;

// Exit statuses a worker uses itself.
inline constexpr int kWorkerExitOk = 0;
inline constexpr int kWorkerExitEnterFailed = 70;
inline constexpr int kWorkerExitExitHookFailed = 71;
inline constexpr int kWorkerExitProtocolError = 72;

struct ChildSetup {
  std::string process_name;         // at most 15 bytes are kept
  bool parent_death_signal = true;  // PR_SET_PDEATHSIG: only when the forking thread outlives us
  pid_t parent_pid = 0;             // who forked us: if it is already gone, leave at once
  pid_t pool_pid = 0;               // whose SIGTERM is obeyed (and parent_pid's: a fork server's)
  int channel_fd = -1;              // moved to kChildChannelFd
  ControlPage* page = nullptr;      // where exits and fatal signals are recorded (may be null)
  bool crash_backtraces = true;     // record the stack of a crash in `page`
  int stdout_fd = -1;               // forwarded output: the write ends of its pipes, moved to 1
  int stderr_fd = -1;               // and 2; -1: keep the inherited ones
};

// Loads what recording a crash stack needs (the unwinder, which glibc loads on first use) into
// this process, so that a worker's signal handler never has to: call before forking workers.
void prepare_crash_stacks();

// Call first thing after fork() returns 0 (signals are still all blocked there: fork_child).
void prepare_child(const ChildSetup& setup);

// Leaves the process with `status`, recorded in the control page first; flushes only the child's
// own stdio output (the inherited buffers were discarded at the start).
[[noreturn]] void leave(int status);

// Says on stderr that an exception escaped a forked process's own code: "procpool <who> (pid N):
// <the exception>; it leaves", or a fixed line when describing it fails as the throw did (an
// allocation). Never throws. For the last catch-all of such a process (worker_main, the fork
// server), called inside its catch block.
void report_escaped_exception(const char* who) noexcept;

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WORKER_CHILD_SETUP_H_
