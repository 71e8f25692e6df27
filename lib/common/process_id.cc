#include "lib/common/process_id.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

namespace procpool::internal {
namespace {

std::atomic<pid_t> cached{0};
std::once_flag registered;

void forget_in_child() { cached.store(0, std::memory_order_relaxed); }

}  // namespace

pid_t current_pid() {
  pid_t pid = cached.load(std::memory_order_relaxed);
  if (pid != 0) return pid;
  std::call_once(registered, [] { ::pthread_atfork(nullptr, nullptr, forget_in_child); });
  pid = ::getpid();
  cached.store(pid, std::memory_order_relaxed);
  return pid;
}

}  // namespace procpool::internal
