#include "lib/fault_injection.h"

#include <atomic>

namespace procpool::internal {
namespace {

std::atomic<int> failures_left{0};
std::atomic<int> failure_errno{0};

}  // namespace

void inject_fork_failures(int count, int error) {
  failure_errno.store(error);
  failures_left.store(count);
}

int take_injected_fork_failure() {
  int left = failures_left.load(std::memory_order_relaxed);
  while (left > 0) {
    if (failures_left.compare_exchange_weak(left, left - 1)) return failure_errno.load();
  }
  return 0;
}

}  // namespace procpool::internal
