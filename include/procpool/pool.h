// Pool: a process pool for plain functions, like Python's `pool.map(f, xs)`.
//
//   int64_t square(const int64_t& x) { return x * x; }
//
//   procpool::Pool pool({.workers = 4});
//   absl::StatusOr<std::vector<int64_t>> squares = pool.map(square, jobs);
//   absl::StatusOr<std::string> name = pool.apply(+[](const int& id) { return lookup(id); }, 7);
//
// Any function, function pointer or lambda without captures works: `R f(const J&)` (or taking J by
// value), R may be absl::StatusOr<T>; with several parameters, starmap takes tuples. J and R need
// a procpool::Codec (codec.h). Each call may use a different function on the same workers.
//
// Why no registration is needed: a worker is a fork() of this process, so it runs the same image
// at the same addresses, and a function's address in the parent names the same function in the
// worker. The call sends that address (and that of a trampoline that decodes the job and encodes
// the result). This holds for every worker procpool makes, replacements included, because they are
// all forks of this process. It would not hold for workers that exec() a program (Python's "spawn"
// start method), whose image is laid out anew; that is why Python pickles functions by name.
// Captured state does not travel: capture nothing, pass what the function needs in the job.
//
// Everything else (errors, lifetime, threads, fork safety, faults) is as for ProcessPool
// (process_pool.h): the destructor is close() + join().

#ifndef PROCPOOL_POOL_H_
#define PROCPOOL_POOL_H_

#include <memory>
#include <ranges>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "procpool/async_result.h"
#include "procpool/call_options.h"
#include "procpool/imap_range.h"
#include "procpool/internal/function_worker.h"
#include "procpool/internal/pool_core.h"
#include "procpool/internal/typed_calls.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool {

class Pool {
  template <typename F>
  using Traits = internal::FunctionTraits<internal::FunctionPointerOf<F>>;
  template <typename F>
  using JobOf = typename Traits<F>::Job;
  template <typename F>
  using ResultOf = typename Traits<F>::Result;
  template <typename F>
  using Calls = internal::TypedCalls<JobOf<F>, ResultOf<F>>;

 public:
  explicit Pool(PoolOptions options = {})
      : core_(std::move(options), [] { return std::make_unique<internal::FunctionWorkerBody>(); }) {}

  // Runs f on every job; results in job order, or the first failing job's status (see
  // ProcessPool::map).
  template <internal::TaskFunction F>
  absl::StatusOr<std::vector<ResultOf<F>>> map(F f, absl::Span<const JobOf<F>> jobs,
                                               CallOptions options = {}) {
    return Calls<F>::map(core_, jobs, std::move(options), internal::function_settings(f));
  }

  // map for a function of several parameters: each job is a std::tuple of its arguments.
  template <internal::TaskFunction F>
    requires Traits<F>::kTakesTuple
  absl::StatusOr<std::vector<ResultOf<F>>> starmap(F f, absl::Span<const JobOf<F>> jobs,
                                                   CallOptions options = {}) {
    return map(f, jobs, std::move(options));
  }

  template <internal::TaskFunction F>
  AsyncResult<std::vector<ResultOf<F>>> map_async(F f, std::vector<JobOf<F>> jobs,
                                                  CallOptions options = {},
                                                  Callbacks<std::vector<ResultOf<F>>> callbacks = {}) {
    return Calls<F>::map_async(core_, std::move(jobs), std::move(options), std::move(callbacks),
                               internal::function_settings(f));
  }

  template <internal::TaskFunction F>
  absl::StatusOr<ResultOf<F>> apply(F f, JobOf<F> job, CallOptions options = {}) {
    return Calls<F>::apply(core_, std::move(job), std::move(options), internal::function_settings(f));
  }

  template <internal::TaskFunction F>
  AsyncResult<ResultOf<F>> apply_async(F f, JobOf<F> job, CallOptions options = {},
                                       Callbacks<ResultOf<F>> callbacks = {}) {
    return Calls<F>::apply_async(core_, std::move(job), std::move(options), std::move(callbacks),
                                 internal::function_settings(f));
  }

  template <internal::TaskFunction F, std::ranges::input_range Input>
  auto imap(F f, Input&& input, CallOptions options = {}) {
    return Calls<F>::imap(core_, std::forward<Input>(input), std::move(options), /*ordered=*/true,
                          internal::function_settings(f));
  }

  template <internal::TaskFunction F, std::ranges::input_range Input>
  auto imap_unordered(F f, Input&& input, CallOptions options = {}) {
    return Calls<F>::imap(core_, std::forward<Input>(input), std::move(options), /*ordered=*/false,
                          internal::function_settings(f));
  }

  absl::Status close() { return core_.close(); }
  absl::Status join() { return core_.join(); }
  void terminate() { core_.terminate(); }
  int workers() const { return core_.worker_count(); }
  PoolStats stats() const { return core_.stats(); }

 private:
  internal::PoolCore core_;
};

}  // namespace procpool

#endif  // PROCPOOL_POOL_H_
