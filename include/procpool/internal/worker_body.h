// WorkerBody: the type-erased face of the user's worker object, as the worker process sees it.
//
// The worker loop (lib/worker_main.cc) knows frames, not user types. A WorkerBody is made in the
// worker process after fork(), and owns the user's `W`; its three calls are the three hooks.
// Implementations must not let exceptions escape: they turn them into statuses and outcomes.

#ifndef PROCPOOL_INTERNAL_WORKER_BODY_H_
#define PROCPOOL_INTERNAL_WORKER_BODY_H_

#include <functional>
#include <memory>
#include <string>
#include <typeinfo>

#include "absl/status/status.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/internal/packed.h"

namespace procpool::internal {

class WorkerBody {
 public:
  virtual ~WorkerBody() = default;
  // Constructs the user's worker and runs its enter() hook, once, before any task.
  virtual absl::Status enter() = 0;
  // Runs one job of `batch`, writing its result or error into `out`.
  virtual void run(wire::TaskBatch::Reader batch, wire::Value::Reader job,
                   wire::Outcome::Builder out) = 0;
  // The word path (TaskBatch.wordJobs): the kind of word this body writes its results as, or
  // WordKind::NONE if it has no word path.
  virtual wire::WordKind result_word_kind() const { return wire::WordKind::NONE; }
  // Runs jobs [first, end) of `jobs` (8-byte words of `kind`), in order, writing task i's result
  // to results[i] (`results` may be `jobs`: each job is read before its result is written), and
  // appending each failure as (i, status). Stamps each task as `stamps` says before it starts,
  // and returns one past the last task it ran: `end`, or earlier if `stamps` cut it short.
  // Nothing escapes: user exceptions become kUnknown, a word that is not a Job kDataLoss.
  virtual uint32_t run_words(const uint64_t* /*jobs*/, wire::WordKind /*kind*/,
                             uint64_t* /*results*/, uint32_t first, uint32_t end,
                             const WordStamps& /*stamps*/, WordErrors& errors) {
    for (uint32_t i = first; i < end; ++i) {
      errors.emplace_back(i, absl::InternalError("this worker has no word path"));
    }
    return end;
  }
  // Runs the exit() hook, once, at an orderly shutdown, then destroys the user's worker.
  virtual absl::Status exit() = 0;
};

// Called in the worker process, after fork(), to make its body.
using WorkerBodyFactory = std::function<std::unique_ptr<WorkerBody>()>;

// Writes `status` as the outcome's error.
void set_error(wire::Outcome::Builder out, const absl::Status& status);

// Reads a wire error back into a status.
absl::Status status_from_wire(wire::Error::Reader error);
void status_to_wire(const absl::Status& status, wire::Error::Builder out);

// "std::runtime_error: disk full" for a caught exception; the type name demangled.
std::string describe_current_exception();

// "Indexer (std::string -> long)": the identity of a worker type, its Job and its Result, as a
// remote worker's handshake compares it (demangled, so the same types name the same in any
// program built by a compatible compiler).
std::string describe_worker_type(const std::type_info& worker, const std::type_info& job,
                                 const std::type_info& result);

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_WORKER_BODY_H_
