// Monotonic clocks, read without a syscall (vDSO). The precise one for deadlines; the coarse one
// (a few ns to read, resolution of a scheduler tick) for per-task stamps of tiny tasks.

#ifndef PROCPOOL_LIB_COMMON_CLOCK_H_
#define PROCPOOL_LIB_COMMON_CLOCK_H_

#include <time.h>

#include <cstdint>

#include "absl/time/time.h"

namespace procpool::internal {

// A timespec (a clock's reading, a file's time) in nanoseconds.
inline int64_t timespec_ns(const timespec& time) {
  return int64_t{time.tv_sec} * 1'000'000'000 + time.tv_nsec;
}

// `clock`'s reading in nanoseconds.
inline int64_t clock_now_ns(clockid_t clock) {
  timespec now;
  ::clock_gettime(clock, &now);
  return timespec_ns(now);
}

inline int64_t monotonic_now_ns() { return clock_now_ns(CLOCK_MONOTONIC); }

inline int64_t coarse_now_ns() { return clock_now_ns(CLOCK_MONOTONIC_COARSE); }

// How far CLOCK_MONOTONIC_COARSE may lag CLOCK_MONOTONIC: a deadline measured from a coarse stamp
// adds this, so no task is ever killed before its time.
int64_t coarse_clock_slack_ns();

// A duration as nanoseconds to add to a monotonic stamp. Anything from INT64_MAX / 4 ns (73
// years) up, InfiniteDuration included, saturates there, so that a stamp plus two of them (a task
// timeout and kill_grace) never overflows: a finite timeout of centuries
// (absl::Hours(24 * 365 * 1000)) would otherwise wrap into the past and expire at once.
inline int64_t to_ns(absl::Duration d) {
  constexpr int64_t kNever = INT64_MAX / 4;
  if (d >= absl::Nanoseconds(kNever)) return kNever;
  return absl::ToInt64Nanoseconds(d);
}

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_CLOCK_H_
