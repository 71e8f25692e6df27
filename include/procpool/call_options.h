/// \file
/// `CallOptions`: per-call settings for map and its relatives.
///
/// ```cpp
/// pool.map(jobs, {.chunksize = 64, .task_timeout = absl::Seconds(2)});
/// ```
///
/// Designed for designated initializers, which C++ requires in declaration order: `.chunksize`,
/// `.task_timeout`, `.retries`, `.max_in_flight`, `.progress`, `.soft_timeout`, `.retry_on`,
/// `.retry_backoff` (docs/guide.md lists the order of every option struct). A value out of range
/// (a negative `retries`, a `task_timeout` or `soft_timeout` that is not positive, a code in
/// `retry_on` that cannot be retried, a bad backoff) fails that call with kInvalidArgument naming
/// the field.

#ifndef PROCPOOL_CALL_OPTIONS_H_
#define PROCPOOL_CALL_OPTIONS_H_

#include <cstddef>
#include <functional>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace procpool {

/// How long a task sent back by `CallOptions::retry_on` waits before it may run again: `initial`
/// before the first retry, multiplied by `multiplier` for each one after, at most `max`; each wait
/// is then spread by up to +-`jitter` of itself at random (seeded afresh in each pool), and is
/// never longer than `max` (a wait at `max` is spread downwards only). The wait is a timer in the pool: other
/// tasks run meanwhile. Initial and max not negative, max not less than initial, multiplier at
/// least 1, jitter from 0 to 1.
struct RetryBackoff {
  absl::Duration initial = absl::ZeroDuration();  ///< wait before the first retry
  absl::Duration max = absl::Seconds(30);         ///< no wait is longer than this
  double multiplier = 2;                          ///< each wait is the one before times this
  double jitter = 0.1;                            ///< spread, as a fraction of the wait (0 to 1)
};

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
  /// Called after each task finishes, with (tasks finished, total). Runs on the pool thread (or a
  /// caller's, holding the pool): keep it quick and do not call back into the pool from it (such
  /// calls fail kFailedPrecondition, `stats()` is empty and `terminate()` does nothing there:
  /// the thread holding the pool cannot wait for itself). An exception it throws is logged as an
  /// error and the call goes on.
  /// `procpool::ProgressBar` is a ready one.
  std::function<void(size_t done, size_t total)> progress;
  /// A task running longer than this is asked to stop (procpool::this_task::stop_requested()):
  /// if it returns within `PoolOptions::cancel_grace` its value is discarded, it fails with
  /// kDeadlineExceeded and its worker lives on; if not, its worker is killed (with a zero
  /// cancel_grace, at once: then this is a task_timeout). Infinite by default; positive.
  absl::Duration soft_timeout = absl::InfiniteDuration();
  /// The codes that send a failed task back to run again, up to `retries` times, after
  /// `retry_backoff`: a worker's death (kAborted), a timeout (kDeadlineExceeded), or a status the
  /// task itself returned (a user's own kUnavailable). Empty: the rule above `retries` (a worker
  /// that died; never an error the task returned, nor a timeout). kOk and kCancelled cannot be
  /// listed (kInvalidArgument). Tasks that may run twice must be idempotent;
  /// procpool::this_task::attempt() tells a task which run it is.
  std::vector<absl::StatusCode> retry_on;
  /// The wait before each retry (RetryBackoff). The default waits for none.
  RetryBackoff retry_backoff;
};

}  // namespace procpool

#endif  // PROCPOOL_CALL_OPTIONS_H_
