// Memory a worker shares with the parent (its blob region, its control page): a memfd mapped
// MAP_SHARED, that no process forked afterwards inherits except the worker it is for.
//
// Why: a worker forked later would otherwise copy every earlier sibling's mappings. A stray write
// in it could reach a sibling's memory, and a replaced worker's pages would stay allocated until
// every sibling forked after it had exited. So the parent's mapping is left out of every fork
// (MADV_DONTFORK: siblings, the fork server, the program's own forks), and the worker it is for,
// just forked, maps the memfd again at the same address (its descriptor survives fork; it closes
// with the other inherited ones), so every pointer into it stays valid there.

#ifndef PROCPOOL_LIB_COMMON_SHARED_MEMORY_H_
#define PROCPOOL_LIB_COMMON_SHARED_MEMORY_H_

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {

struct SharedMemory {
  UniqueFd fd;
  char* base = nullptr;
};

// A new memfd of `bytes` (sparse: a page costs memory once written), named `name` (what
// /proc/<pid>/maps shows), mapped read-write and left out of every fork. `what` names it in errors.
absl::StatusOr<SharedMemory> create_shared_memory(const std::string& name, size_t bytes,
                                                  const char* what);

// In the child just forked from the process that made it: maps `bytes` of `fd` again at `base`,
// where create_shared_memory mapped it. Call before anything else maps memory in the child. This
// mapping is inherited by the child's own forks (user code's), like any other.
absl::Status map_again_after_fork(int fd, char* base, size_t bytes, const char* what);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_SHARED_MEMORY_H_
