// StatusPage: a few words of memory shared between one worker and the parent.
//
// The worker stamps which task it is running, and since when, before each task; the parent reads
// it without a syscall to tell, after a crash, which task died and which never started, and to
// enforce task timeouts. It is a separate MAP_SHARED mapping per worker, so a worker can only
// scribble on its own page, and the parent never trusts it for more than those decisions.

#ifndef PROCPOOL_LIB_STATUS_PAGE_H_
#define PROCPOOL_LIB_STATUS_PAGE_H_

#include <atomic>
#include <cstdint>

#include "absl/status/statusor.h"

namespace procpool::internal {

struct StatusPage {
  static constexpr uint64_t kNoBatch = ~uint64_t{0};

  std::atomic<uint64_t> batch_seq{kNoBatch};  // batch of the task below
  std::atomic<uint32_t> task_index{0};        // index in that batch of the last task started
  std::atomic<uint32_t> running{0};           // 1 while that task runs
  std::atomic<int64_t> started_ns{0};         // CLOCK_MONOTONIC when it started
  std::atomic<int64_t> tasks_done{0};
  std::atomic<int64_t> busy_ns{0};            // total time spent in tasks
};

// Owns one mapping of a StatusPage (anonymous, shared with children forked after it).
class StatusPageMapping {
 public:
  static absl::StatusOr<StatusPageMapping> create();
  StatusPageMapping() = default;
  StatusPageMapping(StatusPageMapping&& other) noexcept;
  StatusPageMapping& operator=(StatusPageMapping&& other) noexcept;
  ~StatusPageMapping();

  StatusPage* get() const { return page_; }
  StatusPage* operator->() const { return page_; }

 private:
  StatusPage* page_ = nullptr;
};

int64_t monotonic_now_ns();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_STATUS_PAGE_H_
