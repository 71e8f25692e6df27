// A live progress bar for a long map: procpool::ProgressBar is a ready-made CallOptions::progress
// callback. On a terminal it redraws one line in place (done/total, rate, elapsed, ETA); piped to
// a file or a CI log it writes a plain line every few seconds and the final one.
// Run: bazel run //examples/progress    (or pipe it: bazel run //examples/progress 2>&1 | cat)

#include <cstdint>
#include <cstdio>
#include <vector>

#include "absl/time/clock.h"
#include "procpool/procpool.h"

// A task that takes a while: sums a range, slowly.
struct SlowSum {
  int64_t run(int64_t n) {
    absl::SleepFor(absl::Milliseconds(15));
    int64_t sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += i;
    return sum;
  }
};

int main() {
  std::vector<int64_t> jobs(400, 100000);
  procpool::ProcessPool<SlowSum> pool({.workers = 4});

  // Draws on stderr; give ProgressBar::Options{.fd = ...} to draw elsewhere.
  absl::StatusOr<std::vector<int64_t>> sums =
      pool.map(jobs, {.chunksize = 4, .progress = procpool::ProgressBar("summing")});
  if (!sums.ok()) {
    std::fprintf(stderr, "map failed: %s\n", sums.status().ToString().c_str());
    return 1;
  }

  procpool::PoolStats stats = pool.stats();
  std::printf("tasks done %lld, failed %lld; per worker:", static_cast<long long>(stats.tasks_done),
              static_cast<long long>(stats.tasks_failed));
  for (const procpool::WorkerStats& worker : stats.workers) {
    std::printf(" w%d %lld tasks / %.2fs busy;", worker.slot, static_cast<long long>(worker.tasks_done),
                absl::ToDoubleSeconds(worker.time_busy));
  }
  std::printf("\n");
  return 0;
}
