// Helpers for the fault-injection suites (fault_test.cc, soak_test.cc): bounded waits on pool
// calls, per-task outcome accounting, captured pool logs, and /proc figures of this process.
//
// A fault test must never hang the suite: every wait here has a deadline, and a call that misses
// it is unblocked by terminating its pool, so the test reports a failure instead of timing out.

#ifndef PROCPOOL_TESTS_FAULT_SUPPORT_H_
#define PROCPOOL_TESTS_FAULT_SUPPORT_H_

#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "procpool/call_options.h"
#include "procpool/codec.h"
#include "procpool/internal/call.h"
#include "procpool/internal/pool_core.h"
#include "procpool/internal/typed_worker_body.h"
#include "procpool/internal/worker_traits.h"
#include "procpool/pool_options.h"
#include "procpool/process_pool.h"

namespace procpool::testing {

// Whether `status`'s message contains `text`.
inline bool message_has(const absl::Status& status, absl::string_view text) {
  return absl::StrContains(status.message(), text);
}

// Writes all of `data` to `fd`, as a vandal worker writes into its channel; gives up quietly on
// an error (the pool may already have closed the channel).
inline void write_all(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    p += n;
    size -= static_cast<size_t>(n);
  }
}

// Faults below dump no core files: a crash test must not fill the disk or wait on a core helper.
inline void disable_core_dumps() {
  rlimit none{0, 0};
  ::setrlimit(RLIMIT_CORE, &none);
}

// The calling worker's control mapping (lib/wire/control_page.h: its ControlPage, then its held
// frames), for a task that scribbles on it as a buggy or hostile one might: the one mapping of a
// memfd "...-control" in this process (a worker maps only its own). Null if there is none, or
// several.
inline void* own_control_mapping() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  void* found = nullptr;
  int mappings = 0;
  while (std::getline(maps, line)) {
    const bool control = absl::EndsWith(line, "-control (deleted)") || absl::EndsWith(line, "-control");
    if (line.find("/memfd:") == std::string::npos || !control) continue;
    unsigned long start = 0;
    if (std::sscanf(line.c_str(), "%lx-", &start) != 1) continue;
    ++mappings;
    found = reinterpret_cast<void*>(start);
  }
  return mappings == 1 ? found : nullptr;
}

inline int64_t monotonic_ns() {
  timespec now;
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

// Runs pool.map on a thread of its own and waits at most `timeout` for it. A call that misses its
// deadline is a hang: it is reported as kInternal "map hung" after the pool is terminated (which
// fails every task it holds, so map returns and the thread can be joined).
template <typename Pool, typename Job = typename Pool::Job>
auto map_within(Pool& pool, const std::vector<Job>& jobs, CallOptions options,
                absl::Duration timeout) -> decltype(pool.map(jobs, options)) {
  using Out = decltype(pool.map(jobs, options));
  std::promise<Out> promise;
  std::future<Out> future = promise.get_future();
  std::thread caller([&] { promise.set_value(pool.map(jobs, std::move(options))); });
  if (future.wait_for(absl::ToChronoNanoseconds(timeout)) == std::future_status::ready) {
    caller.join();
    return future.get();
  }
  pool.terminate();
  caller.join();
  (void)future.get();
  return absl::InternalError(absl::StrCat("map hung: no outcome within ", absl::FormatDuration(timeout)));
}

// A Call that keeps every task's outcome, and counts how many outcomes each task got (the engine
// promises exactly one).
template <typename Job, typename Result>
class OutcomeCall final : public internal::Call {
 public:
  OutcomeCall(internal::CallSettings settings, std::vector<Job> jobs)
      : Call(settings), jobs_(std::move(jobs)), outcomes_(jobs_.size()), counts_(jobs_.size(), 0),
        settled_ns_(jobs_.size(), 0), remaining_(jobs_.size()) {}

  void encode_job(size_t index, wire::Value::Builder out) override { encode_value(jobs_[index], out); }

  bool on_value(size_t index, wire::Value::Reader value) override {
    absl::StatusOr<Result> decoded = decode_value<Result>(value);
    if (!decoded.ok()) {
      settle(index, absl::DataLossError(
                        absl::StrCat("could not decode the result: ", decoded.status().message())));
      return false;
    }
    settle(index, *std::move(decoded));
    return true;
  }

  void on_error(size_t index, absl::Status status) override { settle(index, std::move(status)); }

  // Waits until every task has at least one outcome; false if `timeout` passed first.
  bool wait(absl::Duration timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return remaining_ == 0; });
  }

  size_t size() const { return jobs_.size(); }
  // Read after wait() returned true.
  const absl::StatusOr<Result>& outcome(size_t index) const { return *outcomes_[index]; }
  int outcome_count(size_t index) const {
    std::lock_guard lock(mu_);
    return counts_[index];
  }
  // CLOCK_MONOTONIC time at which the first outcome of task `index` arrived.
  int64_t settled_ns(size_t index) const {
    std::lock_guard lock(mu_);
    return settled_ns_[index];
  }

 private:
  void settle(size_t index, absl::StatusOr<Result> outcome) {
    std::lock_guard lock(mu_);
    if (counts_[index]++ == 0) {
      settled_ns_[index] = monotonic_ns();
      outcomes_[index].emplace(std::move(outcome));
      if (--remaining_ == 0) cv_.notify_all();
    }
  }

  std::vector<Job> jobs_;
  std::vector<std::optional<absl::StatusOr<Result>>> outcomes_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> counts_;
  std::vector<int64_t> settled_ns_;
  size_t remaining_;
};

// ProcessPool's engine with OutcomeCall in place of map: each task's own outcome can be checked,
// and a call can be waited on with a deadline.
template <typename W>
class OutcomePool {
 public:
  using Job = typename internal::WorkerTraits<W>::Job;
  using Result = typename internal::WorkerTraits<W>::Result;
  using Call = OutcomeCall<Job, Result>;

  OutcomePool(PoolOptions options, std::function<std::unique_ptr<W>()> factory)
      : make_worker_(std::move(factory)),
        core_(
            std::move(options),
            [this] { return std::make_unique<internal::TypedWorkerBody<W>>(&make_worker_); },
            internal::worker_type_name<W>()) {
    (void)internal::WorkerRegistration<W>::registered;  // a remote worker program can serve W
  }

  absl::StatusOr<std::shared_ptr<Call>> submit(std::vector<Job> jobs, const CallOptions& options) {
    internal::CallSettings settings;
    settings.chunksize = options.chunksize == 0 ? 1 : options.chunksize;
    if (options.task_timeout) {
      settings.has_task_timeout = true;
      settings.task_timeout = *options.task_timeout;
    }
    settings.retries = options.retries;
    const size_t count = jobs.size();
    auto call = std::make_shared<Call>(settings, std::move(jobs));
    if (absl::Status submitted = core_.submit(call, 0, count); !submitted.ok()) return submitted;
    return call;
  }

  internal::PoolCore& core() { return core_; }
  PoolStats stats() const { return core_.stats(); }

 private:
  std::function<std::unique_ptr<W>()> make_worker_;  // read by workers forked in core_'s constructor
  internal::PoolCore core_;
};

// Collects the pool's log events (they arrive on the pool thread).
class LogCapture {
 public:
  LogSink sink() {
    return [this](const LogEvent& event) {
      std::lock_guard lock(mu_);
      events_.push_back(event);
    };
  }
  bool contains(absl::string_view text) const {
    std::lock_guard lock(mu_);
    for (const LogEvent& event : events_) {
      if (absl::StrContains(event.message, text)) return true;
    }
    return false;
  }
  // Every message so far, one a line.
  std::string all() const {
    std::lock_guard lock(mu_);
    std::string joined;
    for (const LogEvent& event : events_) absl::StrAppend(&joined, event.message, "\n");
    return joined;
  }
  // The events so far, in order: all of them, or those `keep` holds for.
  std::vector<LogEvent> events(const std::function<bool(const LogEvent&)>& keep = nullptr) const {
    std::lock_guard lock(mu_);
    std::vector<LogEvent> kept;
    for (const LogEvent& event : events_) {
      if (!keep || keep(event)) kept.push_back(event);
    }
    return kept;
  }
  std::vector<LogEvent> errors() const {
    return events([](const LogEvent& event) { return event.severity == LogSeverity::kError; });
  }
  std::vector<LogEvent> from(LogSource source) const {
    return events([source](const LogEvent& event) { return event.source == source; });
  }

 private:
  mutable std::mutex mu_;
  std::vector<LogEvent> events_;
};

// Open descriptors of this process.
inline int open_fd_count() {
  int count = 0;
  std::error_code error;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", error);
       it != std::filesystem::directory_iterator(); it.increment(error)) {
    ++count;
  }
  return count - 1;  // the iterator's own descriptor
}

// Resident set size of this process, in bytes.
inline int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size_pages = 0, resident_pages = 0;
  statm >> size_pages >> resident_pages;
  return resident_pages * ::sysconf(_SC_PAGESIZE);
}

// The one-letter state of `pid` from /proc/<pid>/stat ('R', 'S', 'Z', ...), or nullopt if it has
// no /proc entry (it is gone).
inline std::optional<char> process_state(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string content;
  if (!std::getline(stat, content)) return std::nullopt;
  const size_t close = content.rfind(')');
  if (close == std::string::npos || close + 2 >= content.size()) return std::nullopt;
  return content[close + 2];
}

// True if `pid` runs: it exists and is not a zombie (a zombie's code has stopped for good).
inline bool process_alive(pid_t pid) {
  std::optional<char> state = process_state(pid);
  return state.has_value() && *state != 'Z' && *state != 'X';
}

}  // namespace procpool::testing

#endif  // PROCPOOL_TESTS_FAULT_SUPPORT_H_
