// The worker host's side of a remote worker: the relay that procpool::serve() runs.
//
// A remote worker program (`procpool::serve<W>(argc, argv)`) dials the pool, proves the token
// (handshake.h), and becomes a relay: a single-threaded loop that forks the actual worker process
// on request (with a ForkLauncher, exactly as a local pool does) and passes frames between the
// pool's TCP connection and that worker's socketpair. The relay is to its worker what a local
// pool is to its workers: it reads the worker's control page, so it answers heartbeats with the
// worker's progress, takes tasks back through the same claims when asked, stops the worker on a
// task timeout of its own (the watchdog) or when told, and reports the worker's end exactly (its
// wait status, its last progress). A task that kills its worker is so only that task's failure:
// the relay forks a new worker when the pool asks, on the same connection.
//
// Its life ends with the pool's: at end of file on the connection, or after heartbeat_timeout
// without a byte from the pool (the pool's host vanished), it kills its worker and returns. No
// orphans are left on worker hosts.

#ifndef PROCPOOL_LIB_LINK_RELAY_H_
#define PROCPOOL_LIB_LINK_RELAY_H_

#include <string>

#include "procpool/internal/worker_body.h"

namespace procpool::internal {

// Runs a remote worker to its end: `argv` names the pool's address (--procpool-connect=HOST:PORT,
// or PROCPOOL_CONNECT), the environment the token (PROCPOOL_TOKEN). `worker_type` identifies W
// (worker_type_name in serve.h). Returns the program's exit status: 0 after the pool closed the
// connection, 2 when the pool refused this worker (a message on stderr says why), 1 when it could
// not be reached or the connection broke.
int run_relay(int argc, char** argv, const WorkerBodyFactory& factory,
              const std::string& worker_type);

// True if argv or the environment name a pool to dial (a process started as a remote worker).
bool relay_requested(int argc, char** argv);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_RELAY_H_
