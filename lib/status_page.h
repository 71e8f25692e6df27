// StatusPage: a few words of memory shared between one worker and the parent.
//
// The worker stamps which task it is running, and since when, before each task; the parent reads
// it without a syscall to tell, after a crash, which task died and which never started, and to
// enforce task timeouts. It is a separate MAP_SHARED mapping of a memfd per worker, so a worker
// can only scribble on its own page, and the parent never trusts it for more than those
// decisions. The memfd lets a page made by the parent reach a worker forked by the fork server.

#ifndef PROCPOOL_LIB_STATUS_PAGE_H_
#define PROCPOOL_LIB_STATUS_PAGE_H_

#include <atomic>
#include <cstdint>

#include "absl/status/statusor.h"
#include "lib/unique_fd.h"

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

// Owns one mapping of a StatusPage, and (in the parent) the memfd behind it.
class StatusPageMapping {
 public:
  // A fresh, zeroed page in a new memfd.
  static absl::StatusOr<StatusPageMapping> create();
  // Maps the page of an existing memfd (in a worker forked by the fork server). Does not take
  // `fd`: the caller closes it; the mapping stays.
  static absl::StatusOr<StatusPageMapping> map(int fd);
  StatusPageMapping() = default;
  StatusPageMapping(StatusPageMapping&& other) noexcept;
  StatusPageMapping& operator=(StatusPageMapping&& other) noexcept;
  ~StatusPageMapping();

  StatusPage* get() const { return page_; }
  StatusPage* operator->() const { return page_; }
  int fd() const { return fd_.get(); }

 private:
  StatusPage* page_ = nullptr;
  UniqueFd fd_;
};

int64_t monotonic_now_ns();

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_STATUS_PAGE_H_
