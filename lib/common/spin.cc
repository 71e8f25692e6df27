#include "lib/common/spin.h"

#include <sched.h>

#include <algorithm>

namespace procpool::internal {

void SpinPolicy::initialize() {
  cpu_set_t set;
  enabled_ = ::sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 1;
  budget_ns_ = enabled_ ? kMaxSpinNs : 0;
  initialized_ = true;
}

void SpinPolicy::spun(bool found) {
  init();
  if (!enabled_) return;
  last_spin_failed_ = !found;
  if (found) {
    budget_ns_ = kMaxSpinNs;
  } else {
    budget_ns_ = budget_ns_ / 2 < 1'000 ? 0 : budget_ns_ / 2;
    if (budget_ns_ == 0) waits_until_retry_ = kRetryAfter;
  }
}

void SpinPolicy::blocked(int64_t waited_ns) {
  init();
  if (!enabled_) return;
  if (last_spin_failed_ && waited_ns < kContendedWaitNs) {
    // What we waited for came as soon as we stopped spinning: our spin held it up.
    budget_ns_ = 0;
    waits_until_retry_ = kContendedRetryAfter;
  }
  last_spin_failed_ = false;
  if (budget_ns_ > 0) return;
  if (--waits_until_retry_ <= 0) budget_ns_ = kMaxSpinNs;
}

void SpinPolicy::relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace procpool::internal
