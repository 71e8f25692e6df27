#include "lib/fault_injection.h"

#include <atomic>

namespace procpool::internal {
namespace {

std::atomic<int> failures_left{0};
std::atomic<int> failure_errno{0};
std::atomic<int> server_exceptions_left{0};

bool take_one(std::atomic<int>& left) {
  int seen = left.load(std::memory_order_relaxed);
  while (seen > 0) {
    if (left.compare_exchange_weak(seen, seen - 1)) return true;
  }
  return false;
}

}  // namespace

void inject_fork_failures(int count, int error) {
  failure_errno.store(error);
  failures_left.store(count);
}

int take_injected_fork_failure() { return take_one(failures_left) ? failure_errno.load() : 0; }

void inject_fork_server_exceptions(int count) { server_exceptions_left.store(count); }

bool take_injected_fork_server_exception() { return take_one(server_exceptions_left); }

}  // namespace procpool::internal
