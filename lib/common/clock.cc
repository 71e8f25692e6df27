#include "lib/common/clock.h"

namespace procpool::internal {

int64_t coarse_clock_slack_ns() {
  static const int64_t slack = [] {
    timespec resolution{};
    ::clock_getres(CLOCK_MONOTONIC_COARSE, &resolution);
    return int64_t{resolution.tv_sec} * 1'000'000'000 + resolution.tv_nsec;
  }();
  return slack;
}

}  // namespace procpool::internal
