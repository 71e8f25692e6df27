// worker_placement: who a worker is and what it starts with (its slot's generation, the pool's
// name and size, PoolOptions::worker_env and cpu_affinity), as the pool decides it, as it crosses
// to the process that forks the worker (a fork server, a remote host), and as the worker applies
// it before W's constructor (worker_main.cc; this_worker.h shows it to the task).

#ifndef PROCPOOL_LIB_WORKER_WORKER_PLACEMENT_H_
#define PROCPOOL_LIB_WORKER_WORKER_PLACEMENT_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "procpool/internal/protocol.capnp.h"

namespace procpool::internal {

// Who a worker is and what it starts with, applied before W's constructor (this_worker.h;
// PoolOptions::worker_env and cpu_affinity).
struct WorkerPlacement {
  int64_t generation = 0;  // 0 for a slot's first process, +1 per replacement
  int workers = 0;
  std::string pool_name;
  std::vector<std::pair<std::string, std::string>> env;  // set with setenv
  int cpu = -1;            // pinned to this CPU; -1: not pinned
  bool spread_cpus = false;  // (remote) pin to the slot-th CPU of this host's set instead
};

void placement_to_wire(const WorkerPlacement& placement, wire::Placement::Builder out);
// The bytes `placement` takes in a frame (its env and the pool's name, mostly).
size_t placement_wire_bytes(const WorkerPlacement& placement);
// Reads what a pool (or the process that forks for it) sent; names the env refuses are dropped.
WorkerPlacement placement_from_wire(wire::Placement::Reader in);

// PoolOptions::worker_env(slot), checked: kInvalidArgument for a name that is empty or holds '='
// or a NUL, a value that holds a NUL, or an exception the function threw. Empty without one.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> evaluate_worker_env(
    const std::function<std::vector<std::pair<std::string, std::string>>(int)>& worker_env,
    int slot);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WORKER_WORKER_PLACEMENT_H_
