// Call: one user call (a map, an imap, an apply_async) as the pool core sees it.
//
// The core schedules tasks by (call, index) and never sees user types: it asks the call to encode
// job `index` when it builds a batch, and hands back exactly one outcome per submitted index, as
// a value to decode or a status. Both callbacks run on the pool's thread with the core's lock
// held: they must be quick and must never call back into the pool.

#ifndef PROCPOOL_INTERNAL_CALL_H_
#define PROCPOOL_INTERNAL_CALL_H_

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "capnp/orphan.h"
#include "procpool/call_options.h"
#include "procpool/internal/protocol.capnp.h"

namespace procpool::internal {

// A task of a piece of word results that failed (ResultBatch.errors, read by the scheduler before
// any outcome of the piece is handed on): its place in the piece and its status (never OK).
struct WordFailure {
  uint32_t index = 0;
  absl::Status status;
};

struct CallSettings {
  // Tasks per batch sent to a worker; 0 lets the core choose.
  size_t chunksize = 1;
  // Per-task timeout for this call; the pool's when unset (InfiniteDuration means none).
  absl::Duration task_timeout = absl::InfiniteDuration();
  bool has_task_timeout = false;
  // How many times a task whose worker died is run again before it fails.
  int retries = 0;
  // CallOptions::soft_timeout, retry_on and retry_backoff.
  absl::Duration soft_timeout = absl::InfiniteDuration();
  std::vector<absl::StatusCode> retry_on;
  RetryBackoff retry_backoff;
  // For plain-function pools: addresses valid in every worker (a fork of this image).
  uint64_t trampoline = 0;
  uint64_t function = 0;
};

class Call {
 public:
  explicit Call(CallSettings settings) : settings_(std::move(settings)) {}
  virtual ~Call() = default;
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  // Writes job `index` into `out`. A thrown exception fails that task with kInvalidArgument.
  virtual void encode_job(size_t index, wire::Value::Builder out) = 0;
  // The task's worker returned this value. Returns true if it decoded; false if the call
  // reported a decoding error for the task instead (then it counts as failed).
  virtual bool on_value(size_t index, wire::Value::Reader value) = 0;
  // The task failed.
  virtual void on_error(size_t index, absl::Status status) = 0;

  // The word path, for calls whose jobs and results are scalars (integers, floating point): true
  // if this call sends its jobs as one blob of 8-byte words per batch (TaskBatch.wordJobs).
  virtual bool packs_jobs() const { return false; }
  // Writes jobs [first, first + count) as words into `tasks` (wordJobs, wordKind). With `borrow`,
  // the blob may be this call's own array of jobs, referenced in place as an external segment
  // made with `orphanage` (zero copy): the pool then releases it (PoolCore::release_borrowed)
  // before the memory may go away.
  virtual void encode_job_words(size_t /*first*/, size_t /*count*/,
                                wire::TaskBatch::Builder /*tasks*/, capnp::Orphanage /*orphanage*/,
                                bool /*borrow*/) {}
  // Outcomes of tasks [first, first + count) sent as words (see ResultBatch in protocol.capnp):
  // words[i] is task first + i's result of `kind`, unless `errors` (strictly ascending, each
  // index < count) names i. Every one of the `count` tasks gets its outcome here, a value or
  // on_error. Returns how many were values that decoded. Called only for a call that packs_jobs().
  virtual size_t on_word_results(size_t /*first*/, uint32_t /*count*/, const uint64_t* /*words*/,
                                 wire::WordKind /*kind*/, absl::Span<const WordFailure> /*errors*/) {
    return 0;
  }

  const CallSettings& settings() const { return settings_; }

  // What the pool core has seen of this call's tasks, to decide whether to queue a second batch
  // behind a running one. Owned by the core: read and written only under its lock.
  int64_t observed_tasks = 0;
  int64_t observed_busy_ns = 0;
  // Tasks in the last batch cut for this call (its size after the byte budgets), 0 until one is.
  size_t last_batch_tasks = 0;
  // Set by PoolCore::cancel_call: the call has its outcome; its tasks are never queued again and
  // a worker found running one is stopped. Owned by the core, like the two above.
  bool cancelled = false;

 private:
  CallSettings settings_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_CALL_H_
