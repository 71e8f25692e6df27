// A live progress bar for a long map: CallOptions::progress is called after every task with
// (done, total), on the pool's thread, so it only records; the main thread draws, from
// pool.stats() too (which worker runs which task). Run: bazel run //examples/progress

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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

std::string bar(size_t done, size_t total, int width) {
  const int filled = total == 0 ? width : static_cast<int>(width * done / total);
  return absl::StrCat("[", std::string(filled, '#'), std::string(width - filled, '.'), "]");
}

int main() {
  const bool terminal = ::isatty(STDOUT_FILENO);
  std::vector<int64_t> jobs(400, 100000);
  procpool::ProcessPool<SlowSum> pool({.workers = 4});

  std::atomic<size_t> done{0};
  std::atomic<size_t> total{jobs.size()};
  procpool::AsyncResult<std::vector<int64_t>> sums = pool.map_async(
      jobs, {.chunksize = 4, .progress = [&](size_t finished, size_t all) {
               done = finished;
               total = all;
             }});

  const absl::Time start = absl::Now();
  while (!sums.wait(absl::Milliseconds(100))) {
    std::string busy;
    for (const procpool::WorkerStats& worker : pool.stats().workers) {
      absl::StrAppend(&busy, " w", worker.slot, ":", std::string(procpool::to_string(worker.state)));
    }
    const std::string line = absl::StrFormat("%s %zu/%zu %5.1fs%s", bar(done, total, 40), done.load(),
                                             total.load(), absl::ToDoubleSeconds(absl::Now() - start), busy);
    // On a terminal, redraw one line; in a log, print a line now and then.
    std::printf(terminal ? "\r%s\033[K" : "%s\n", line.c_str());
    std::fflush(stdout);
  }
  absl::StatusOr<std::vector<int64_t>> result = sums.get();
  std::printf("%s%s %zu/%zu done in %.2fs\n", terminal ? "\r\033[K" : "", bar(total, total, 40).c_str(),
              total.load(), total.load(), absl::ToDoubleSeconds(absl::Now() - start));
  if (!result.ok()) {
    std::fprintf(stderr, "map failed: %s\n", result.status().ToString().c_str());
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
