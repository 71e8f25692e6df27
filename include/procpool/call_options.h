/// \file
/// `CallOptions`: per-call settings for map and its relatives.
///
/// ```cpp
/// pool.map(jobs, {.chunksize = 64, .task_timeout = absl::Seconds(2)});
/// ```
///
/// Designed for designated initializers, which C++ requires in declaration order: `.chunksize`,
/// `.task_timeout`, `.retries`, `.max_in_flight`, `.progress` (docs/guide.md lists the order of
/// every option struct). A value out of range (a negative `retries`, a `task_timeout` that is not
/// positive) fails that call with kInvalidArgument naming the field.

#ifndef PROCPOOL_CALL_OPTIONS_H_
#define PROCPOOL_CALL_OPTIONS_H_

#include <cstddef>
#include <functional>
#include <optional>

#include "absl/time/time.h"

namespace procpool {

/// Per-call settings of `map`, `imap`, `apply` and their relatives. Every field has a default
/// that keeps the pool's behaviour (`{}`: the pool's options, no retries).
struct CallOptions {
  /// Tasks sent to a worker in one frame. 0 chooses like Python's Pool: about four chunks per
  /// worker for map, 1 for lazy calls.
  size_t chunksize = 0;
  /// Overrides `PoolOptions::task_timeout` for this call's tasks.
  std::optional<absl::Duration> task_timeout;
  /// Runs a task again, up to this many times, when its worker died while running it, or after
  /// running it but before its result reached the parent (a worker holds back the results of
  /// tasks shorter than 200 us for up to 2 ms). Not when it returned an error or timed out.
  /// Tasks that may run twice must be idempotent.
  int retries = 0;
  /// imap and imap_unordered only: at most this many tasks are taken from the input and not yet
  /// consumed at once; 0 means 4 per worker, or 4 chunks per worker and one more if that is more.
  /// Bounds the parent's memory on an endless input.
  size_t max_in_flight = 0;
  /// map and starmap (and their `_async` forms) only; apply and imap, whose callers see each
  /// result as it comes, do not call it.
  /// Called after each task finishes, with (tasks finished, total). Runs on the pool thread: keep
  /// it quick and do not call back into the pool from it. An exception it throws is logged as an
  /// error and the call goes on. `procpool::ProgressBar` is a ready one.
  std::function<void(size_t done, size_t total)> progress;
};

}  // namespace procpool

#endif  // PROCPOOL_CALL_OPTIONS_H_
