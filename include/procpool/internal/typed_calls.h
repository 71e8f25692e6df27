// TypedCalls<Job, Result>: the typed calls (map, map_async, apply, apply_async, imap,
// imap_unordered) over a PoolCore, shared by ProcessPool<W> and the plain-function Pool. `base`
// carries what the pool kind adds to every call (the function to run, for Pool).

#ifndef PROCPOOL_INTERNAL_TYPED_CALLS_H_
#define PROCPOOL_INTERNAL_TYPED_CALLS_H_

#include <algorithm>
#include <cstddef>
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
#include "procpool/internal/call.h"
#include "procpool/internal/imap_call.h"
#include "procpool/internal/map_call.h"
#include "procpool/internal/pool_core.h"

namespace procpool::internal {

// Per-call settings from the user's options. `job_count` 0 means unknown (lazy input).
inline CallSettings make_settings(const PoolCore& core, const CallOptions& options,
                                  size_t job_count, CallSettings base = {}) {
  CallSettings settings = base;
  settings.chunksize = options.chunksize;
  if (settings.chunksize == 0) {
    // Python's rule for map: about four chunks per worker. Lazy calls go one task at a time.
    const size_t parts = static_cast<size_t>(core.worker_count()) * 4;
    settings.chunksize = job_count == 0 ? 1 : std::max<size_t>(1, (job_count + parts - 1) / parts);
  }
  if (options.task_timeout) {
    settings.has_task_timeout = true;
    settings.task_timeout = *options.task_timeout;
  }
  settings.retries = options.retries;
  return settings;
}

template <typename Job, typename Result>
struct TypedCalls {
  static absl::StatusOr<std::vector<Result>> map(PoolCore& core, absl::Span<const Job> jobs,
                                                 CallOptions options, CallSettings base) {
    auto call = std::make_shared<MapCall<Job, Result>>(make_settings(core, options, jobs.size(), base),
                                                       jobs);
    if (options.progress) call->set_progress(std::move(options.progress));
    if (absl::Status submitted = core.submit(call, 0, jobs.size()); !submitted.ok()) return submitted;
    call->complete_if_empty();
    call->wait(absl::InfiniteDuration());
    return call->take_result();
  }

  static AsyncResult<std::vector<Result>> map_async(PoolCore& core, std::vector<Job> jobs,
                                                    CallOptions options,
                                                    Callbacks<std::vector<Result>> callbacks,
                                                    CallSettings base) {
    const size_t count = jobs.size();
    auto call = std::make_shared<MapCall<Job, Result>>(make_settings(core, options, count, base),
                                                       absl::Span<const Job>(), std::move(jobs));
    if (options.progress) call->set_progress(std::move(options.progress));
    call->set_callbacks(&core, std::move(callbacks.on_success), std::move(callbacks.on_error));
    if (absl::Status submitted = core.submit(call, 0, count); !submitted.ok()) {
      call->fail_unsubmitted(std::move(submitted));
    } else {
      call->complete_if_empty();
    }
    return AsyncResult<std::vector<Result>>(call);
  }

  static absl::StatusOr<Result> apply(PoolCore& core, Job job, CallOptions options,
                                      CallSettings base) {
    auto call = std::make_shared<ApplyCall<Job, Result>>(make_settings(core, options, 1, base),
                                                         std::move(job));
    absl::Status submitted = core.run_one(call, [&call] { return call->ready(); });
    if (!submitted.ok()) return submitted;
    call->wait(absl::InfiniteDuration());
    return call->take_result();
  }

  static AsyncResult<Result> apply_async(PoolCore& core, Job job, CallOptions options,
                                         Callbacks<Result> callbacks, CallSettings base) {
    auto call = std::make_shared<ApplyCall<Job, Result>>(make_settings(core, options, 1, base),
                                                         std::move(job));
    call->set_callbacks(&core, std::move(callbacks.on_success), std::move(callbacks.on_error));
    if (absl::Status submitted = core.submit(call, 0, 1); !submitted.ok()) call->on_error(0, submitted);
    return AsyncResult<Result>(call);
  }

  template <std::ranges::input_range Input>
  static auto imap(PoolCore& core, Input&& input, CallOptions options, bool ordered,
                   CallSettings base) {
    using View = std::views::all_t<Input>;
    CallSettings settings = make_settings(core, options, 0, base);
    const size_t max_in_flight =
        options.max_in_flight != 0
            ? options.max_in_flight
            : std::max<size_t>(4 * static_cast<size_t>(core.worker_count()),
                               (2 * static_cast<size_t>(core.worker_count()) + 1) * settings.chunksize);
    auto call = std::make_shared<ImapCall<Job, Result>>(settings, ordered);
    return ImapRange<Job, Result, View>(&core, std::move(call),
                                        std::views::all(std::forward<Input>(input)),
                                        settings.chunksize, max_in_flight);
  }
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_TYPED_CALLS_H_
