// Forwarded output (PoolOptions::worker_output, issue 16) beside inherited output, in the same run:
//   bench_output jobs=20000 chunksize=1 reps=1
// Each repetition maps `jobs` tasks that each print one short line (printf) on a pool of
// workers = cores, first with output inherited (the workers write to this program's stdout, here
// /dev/null), then forwarded (the workers' stdout are pipes the pool reads; each line goes
// through the default sink, log_to_stderr, to this program's stdout, here /dev/null too). Emits
// the forwarded map's items/s with the inherited one's and their ratio (target >= 0.5), and where
// the CPU went: this process's (the pool thread reads and hands on the lines) and the workers',
// per item, in each mode.

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

namespace {

struct Printer {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t x) {
    std::printf("task %lld done\n", static_cast<long long>(x));
    return x;
  }
};

int64_t cpu_ns(int who) {
  rusage usage{};
  ::getrusage(who, &usage);
  const auto ns = [](const timeval& t) {
    return int64_t{t.tv_sec} * 1'000'000'000 + int64_t{t.tv_usec} * 1000;
  };
  return ns(usage.ru_utime) + ns(usage.ru_stime);
}

struct Measured {
  double items_per_s = 0;
  double own_cpu_ns_per_item = 0;     // this process, during the timed map
  double worker_cpu_ns_per_item = 0;  // the workers, over the pool's life (warm-up included)
};

// One timed map (after an untimed one that warms the pool up).
Measured timed_map(procpool::WorkerOutput output, int64_t jobs, int64_t chunksize) {
  const int64_t children_before = cpu_ns(RUSAGE_CHILDREN);
  Measured measured;
  {
    procpool::ProcessPool<Printer> pool({.workers = cpu_count(), .worker_output = output});
    std::vector<int64_t> warm(1000, 1);
    if (!pool.map(warm).ok()) die("warm-up map");
    std::vector<int64_t> items(static_cast<size_t>(jobs));
    for (int64_t i = 0; i < jobs; ++i) items[static_cast<size_t>(i)] = i;
    const int64_t own_before = cpu_ns(RUSAGE_SELF);
    const int64_t start = now_ns();
    absl::StatusOr<std::vector<int64_t>> done =
        pool.map(items, {.chunksize = static_cast<size_t>(chunksize)});
    const double seconds = seconds_since(start);
    measured.own_cpu_ns_per_item =
        static_cast<double>(cpu_ns(RUSAGE_SELF) - own_before) / static_cast<double>(jobs);
    if (!done.ok()) die("map");
    std::fflush(stdout);
    measured.items_per_s = static_cast<double>(jobs) / seconds;
  }  // joined: the workers are reaped
  measured.worker_cpu_ns_per_item =
      static_cast<double>(cpu_ns(RUSAGE_CHILDREN) - children_before) / static_cast<double>(jobs);
  return measured;
}

}  // namespace

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int64_t jobs = args.get_int("jobs", 20000);
  const int64_t chunksize = args.get_int("chunksize", 1);
  const int64_t reps = args.get_int("reps", 1);
  for (int64_t rep = 0; rep < reps; ++rep) {
    // The workers' lines (and the forwarded ones the sink prints) go to /dev/null; the results go
    // to the real stdout afterwards.
    std::fflush(stdout);
    const int results = ::dup(STDOUT_FILENO);
    const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (results < 0 || null < 0 || ::dup2(null, STDOUT_FILENO) < 0) die("redirecting stdout");
    const Measured inherited = timed_map(procpool::WorkerOutput::kInherit, jobs, chunksize);
    const Measured forwarded = timed_map(procpool::WorkerOutput::kForward, jobs, chunksize);
    std::fflush(stdout);
    ::dup2(results, STDOUT_FILENO);
    ::close(results);
    ::close(null);
    emit("output_map", "items_per_s", forwarded.items_per_s, "items/s",
         {{"inherited_items_per_s", inherited.items_per_s},
          {"ratio_to_inherited", forwarded.items_per_s / inherited.items_per_s},
          {"forwarded_parent_cpu_ns_per_item", forwarded.own_cpu_ns_per_item},
          {"inherited_parent_cpu_ns_per_item", inherited.own_cpu_ns_per_item},
          {"forwarded_worker_cpu_ns_per_item", forwarded.worker_cpu_ns_per_item},
          {"inherited_worker_cpu_ns_per_item", inherited.worker_cpu_ns_per_item},
          {"jobs", static_cast<double>(jobs)},
          {"chunksize", static_cast<double>(chunksize)}});
  }
  return 0;
}
