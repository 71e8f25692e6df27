// worker_main: what a worker process does from the moment fork() returns in the child until it
// exits. It never returns: a worker must not unwind into the parent's stack or run the parent's
// destructors and atexit handlers, so every way out is _exit().
//
// In order: name the process, arrange to die with the parent, reset signal handlers (SIGINT is
// ignored and SIGTERM obeyed only from the pool: the parent decides what a Ctrl-C means), close every inherited descriptor but the
// channel, make the body and run enter(), then serve batches until told to shut down (exit()
// runs, status 0) or until the channel reaches end of file (the parent is gone: exit at once).

#ifndef PROCPOOL_LIB_WORKER_MAIN_H_
#define PROCPOOL_LIB_WORKER_MAIN_H_

#include <sys/types.h>

#include "lib/status_page.h"
#include "lib/worker_process.h"

namespace procpool::internal {

// Exit statuses a worker uses itself.
inline constexpr int kWorkerExitOk = 0;
inline constexpr int kWorkerExitEnterFailed = 70;
inline constexpr int kWorkerExitExitHookFailed = 71;
inline constexpr int kWorkerExitProtocolError = 72;

// Every handler back to its default, the signal mask empty, SIGINT ignored, and SIGTERM obeyed
// only when `pool` sent it. For worker processes and the fork server.
void reset_signals_for_child(pid_t pool);

[[noreturn]] void worker_main(int channel_fd, StatusPage* page, const WorkerLaunch& launch,
                              pid_t parent_pid);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WORKER_MAIN_H_
