// The worker's side of procpool/this_worker.h: who this worker is (set once, before W's
// constructor) and the task it runs (read from its control page: the stamps the task server
// writes, the stop requests the parent or relay writes; the batch's attempt).
//
// In any other process (the program that owns a pool) nothing is set: this_worker() says slot -1
// and this_task says no stop, attempt 0.
//
// stop_token(): each task's std::stop_source is made the first time the task asks for a token.
// It is stopped by whichever comes first: stop_requested() seeing the request (no system call:
// the check that sees it requests the stop), or a watcher thread, started in the worker on the
// first stop_token(), that reads the same flag every kStopWatchInterval. Callbacks run on that
// thread, never under a lock of ours.

#ifndef PROCPOOL_LIB_WORKER_TASK_CONTEXT_H_
#define PROCPOOL_LIB_WORKER_TASK_CONTEXT_H_

#include "lib/wire/control_page.h"
#include "procpool/this_worker.h"

namespace procpool::internal {

// In a worker, before W's constructor: what this_worker() returns from now on.
void set_this_worker(WorkerInfo info);

// In a worker, before its first task: where this_task reads the running task's stamps and stop
// requests. The page outlives the process's tasks.
void bind_task_page(const ControlPage* page);

// The attempt (1 for a task's first run) of the batch about to run.
void set_task_attempt(int attempt);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WORKER_TASK_CONTEXT_H_
