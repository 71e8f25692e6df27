/// \file
/// `serve()`: the main of a worker program that serves a pool from another machine.
///
/// ```cpp
/// // indexer.cc, the worker program (started by srun, ssh, mpirun, a Kubernetes Job, ...):
/// int main(int argc, char** argv) { return procpool::serve<Indexer>(argc, argv); }
///
/// // A program that is both the pool and its workers checks first (serve(argc, argv) without a
/// // type serves whichever of its ProcessPool types the pool asks for):
/// int main(int argc, char** argv) {
///   if (procpool::launched_as_worker(argc, argv)) return procpool::serve<Indexer>(argc, argv);
///   procpool::ProcessPool<Indexer> pool({.workers = 64, .remote = procpool::RemoteOptions{}});
///   // ...
/// }
/// ```
///
/// `serve()` dials the pool named by `--procpool-connect=HOST:PORT` in argv (or PROCPOOL_CONNECT
/// in the environment), retrying for up to 60 s (PROCPOOL_CONNECT_TIMEOUT seconds) while the pool
/// is not yet listening; proves the token read from PROCPOOL_TOKEN, or from the file
/// PROCPOOL_TOKEN_FILE names (never from argv: argv shows in ps), without sending it; and then
/// forks the worker process the pool asks for. Both variables leave its environment (their bytes
/// erased) before anything is forked: the worker and its tasks cannot read the token there. That worker builds
/// W (from its default constructor or from `factory`), runs enter(), serves tasks and runs exit()
/// at the pool's close-then-join, exactly as a forked worker does; if it dies, the pool charges
/// the task it ran and asks for another on the same connection. `serve()` returns when the pool
/// closes the connection (0), refuses this program or has no token (2: a different W or protocol
/// version, a wrong token, no PROCPOOL_TOKEN, a PROCPOOL_TOKEN_FILE it cannot read; stderr says
/// which), or cannot be reached (1). A pool silent for its heartbeat_timeout (its host died, or
/// the network between them broke) has given this host's worker up: serve() stops that worker at
/// once and dials again as at its start, serving the pool again when it answers (a partition
/// healed), and returning 1 when it cannot be reached within PROCPOOL_CONNECT_TIMEOUT.
/// Either way, the worker it forked is gone when it returns: nothing is left running on the host.
///
/// SIGTERM (a Slurm preemption or scancel, a Kubernetes eviction) drains it: the pool is told, takes
/// back the tasks the worker has not started, lets it finish its running task (within the
/// task_timeout), has it run exit(), and closes the connection: serve() returns 0. A second
/// SIGTERM ends the process at once. serve() holds SIGTERM's disposition while it serves (from its
/// handshake on) and gives the program's own back when it returns.
///
/// Blocks until then. Call it from the main thread, before starting threads of your own: it forks.

#ifndef PROCPOOL_SERVE_H_
#define PROCPOOL_SERVE_H_

#include <concepts>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "procpool/internal/typed_worker_body.h"
#include "procpool/internal/worker_body.h"

namespace procpool {

namespace internal {
int run_relay(int argc, char** argv,
              const std::function<const WorkerBodyFactory*(const std::string&)>& find,
              const std::string& offered_type);
bool relay_requested(int argc, char** argv);
int serve_registered(int argc, char** argv);
}  // namespace internal

/// True if this process was started to serve a pool: argv has `--procpool-connect=...`, or
/// PROCPOOL_CONNECT is set. Never blocks; reads argv and the environment only.
inline bool launched_as_worker(int argc, char** argv) {
  return internal::relay_requested(argc, argv);
}

/// Serves a pool of W workers; each worker process gets its W from `factory` (W or
/// `std::unique_ptr<W>`), called in that process. Blocks until the pool is done with this
/// program, then returns the program's exit status: 0 when the pool closed the connection, 1 when
/// it could not be reached (at its start, or again after the pool went silent), 2 when it refused
/// this program (see the file comment).
/// Call it from the main thread, before starting threads: it forks.
template <typename W, typename Factory>
  requires std::invocable<Factory&>
int serve(int argc, char** argv, Factory factory) {
  using Made = std::remove_cvref_t<std::invoke_result_t<Factory&>>;
  std::function<std::unique_ptr<W>()> make_worker;
  if constexpr (std::is_same_v<Made, std::unique_ptr<W>>) {
    make_worker = std::move(factory);
  } else {
    static_assert(std::is_same_v<Made, W>, "the factory must return W or std::unique_ptr<W>");
    make_worker = [factory = std::move(factory)]() mutable { return std::make_unique<W>(factory()); };
  }
  const internal::WorkerBodyFactory body = [&make_worker] {
    return std::make_unique<internal::TypedWorkerBody<W>>(&make_worker);
  };
  const std::string type = internal::worker_type_name<W>();
  return internal::run_relay(
      argc, argv,
      [&](const std::string& wanted) { return wanted == type ? &body : nullptr; }, type);
}

/// Serves a pool of W workers, each default-constructing its W. As the overload above.
template <typename W>
  requires std::default_initializable<W>
int serve(int argc, char** argv) {
  return serve<W>(argc, argv, [] { return std::make_unique<W>(); });
}

/// Serves a pool of whichever worker type it asks for, among the `ProcessPool<W>` types this
/// program uses with a default-constructible W (a program that is both the pool and its workers,
/// with several pools). A pool of a type it does not have is refused (exit status 2). Otherwise as
/// the overloads above.
inline int serve(int argc, char** argv) { return internal::serve_registered(argc, argv); }

}  // namespace procpool

#endif  // PROCPOOL_SERVE_H_
