// Checks of PoolOptions and per-call settings: a value that cannot work is kInvalidArgument
// naming the field, returned by the first call rather than discovered as a hang or a respawn loop.

#ifndef PROCPOOL_LIB_OPTIONS_CHECK_H_
#define PROCPOOL_LIB_OPTIONS_CHECK_H_

#include <cstddef>

#include "absl/status/status.h"
#include "lib/common/cgroup.h"
#include "procpool/internal/call.h"
#include "procpool/pool_options.h"

namespace procpool::internal {

// The smallest max_frame_bytes any frame fits in, with room for a one-task batch.
inline constexpr size_t kMinFrameBytes = 4096;
// The most workers a pool may have (PoolOptions::workers, resize()).
inline constexpr int kMaxWorkers = 4096;

// `remote_allowed`: the pool can have remote workers (a ProcessPool; procpool::Pool cannot).
absl::Status check_pool_options(const PoolOptions& options, bool remote_allowed = true);
absl::Status check_call_settings(const CallSettings& settings);
// The size asked of resize(): kInvalidArgument outside 1..kMaxWorkers.
absl::Status check_resize(int workers);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_OPTIONS_CHECK_H_
