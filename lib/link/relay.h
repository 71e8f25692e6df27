// The worker host's side of a remote worker: the relay that procpool::serve() runs.
//
// A remote worker program (`procpool::serve<W>(argc, argv)`) dials the pool, proves the token
// (handshake.h), and becomes a relay: a single-threaded loop that forks the actual worker process
// on request (with a ForkLauncher, exactly as a local pool does) and supervises it. The worker
// talks to the pool over a TCP connection of its own, which the relay opens for it before the
// fork (presenting the spawn's id and proving the token): the relay is not on the data path. It
// is to its worker what a local pool is to its workers: it reads the worker's control page, so it
// reports the worker's progress as it changes, takes tasks back through the same claims when
// asked, stops the worker on a task timeout of its own (the watchdog) or when told, and reports
// the worker's end exactly (its wait status, its last progress). A task that kills its worker is
// so only that task's failure: the relay forks a new worker when the pool asks, on the same
// control connection.
//
// Its life ends with the pool's: at end of file on the connection it kills its worker and returns.
// After heartbeat_timeout without a byte from the pool (the pool's host vanished, or the network
// between them broke), it kills and reaps its worker, drops the connection and dials again as at
// its start: it serves the pool again when the network heals, and returns when it cannot reach
// it for its connect timeout. No orphans are left on worker hosts. Or it
// drains: a SIGTERM (a preemption) makes it tell the pool it is leaving (FromWorker.draining); the
// pool takes back what the worker has not started, lets the running task end (the watchdog still
// enforces its timeout), shuts the worker down (exit() runs), and closes the connection: the
// relay returns 0. A second SIGTERM kills it at once.

#ifndef PROCPOOL_LIB_LINK_RELAY_H_
#define PROCPOOL_LIB_LINK_RELAY_H_

#include <functional>
#include <string>

#include "procpool/internal/worker_body.h"

namespace procpool::internal {

// What a worker program can serve: the factory of the worker type the pool names, or null.
using WorkerTypeFinder = std::function<const WorkerBodyFactory*(const std::string& worker_type)>;

// Runs a remote worker to its end: `argv` names the pool's address (--procpool-connect=HOST:PORT,
// or PROCPOOL_CONNECT), the environment the token (PROCPOOL_TOKEN) and how to speak TLS
// (tls_channel.h): keyed by the token by default; with certificates when PROCPOOL_TLS_CERT,
// PROCPOOL_TLS_KEY and PROCPOOL_TLS_CA name them; in plaintext only with PROCPOOL_ENCRYPT=0 and a
// pool on a loopback address. Its control connection and each worker's data connection are TLS
// alike: the relay completes a data connection's handshake and forks the worker on the session. `offered_type` is the one
// worker type this program serves (worker_type_name), or empty when it serves whichever `find`
// knows. Returns the program's exit status: 0 after the pool closed the connection, 2 when the
// pool refused this worker or this worker the pool (a message on stderr says why), 1 when it
// could not be reached or the connection broke.
int run_relay(int argc, char** argv, const WorkerTypeFinder& find, const std::string& offered_type);

// True if argv or the environment name a pool to dial (a process started as a remote worker).
bool relay_requested(int argc, char** argv);

// run_relay() for whichever registered worker type the pool asks for (worker_registry.h).
int serve_registered(int argc, char** argv);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_RELAY_H_
