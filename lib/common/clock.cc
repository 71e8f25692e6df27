#include "lib/common/clock.h"

namespace procpool::internal {

int64_t coarse_clock_slack_ns() {
  static const int64_t slack = [] {
    timespec resolution{};
    ::clock_getres(CLOCK_MONOTONIC_COARSE, &resolution);
    return timespec_ns(resolution);
  }();
  return slack;
}

}  // namespace procpool::internal
