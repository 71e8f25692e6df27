// What this_task::stop_requested() costs (issue 17, Speed): a map whose task checks it 1,000
// times, against the same map whose task does not. Each task runs `steps` rounds of a dependent
// integer mix 1,000 times (about 0.1 ms a task at steps=64); the checking one calls
// stop_requested() before each round, as a cooperative task checks between pieces of its work.
//   bench_stop_check jobs=4000 steps=64 reps=5
// Each repetition runs both maps on the same pool (alternating which goes first). Each task
// measures its own CPU time (CLOCK_THREAD_CPUTIME_ID: what other programs on a loaded machine do
// hardly moves it), and the figure is the ratio of the two maps' summed task CPU time, checked /
// plain: 1.00 is free; the target is within 2 %. Wall times and the cost of one check (from the
// difference) go alongside.

#include <time.h>

#include <cstdint>
#include <numeric>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

namespace {

int64_t thread_cpu_ns() {
  timespec now;
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

// Returns the CPU time the work took (and -1 if asked to stop, which nothing here does).
int64_t work(int64_t seed, int64_t steps, bool check) {
  const int64_t start = thread_cpu_ns();
  uint64_t x = static_cast<uint64_t>(seed) | 1;
  for (int i = 0; i < 1000; ++i) {
    if (check && procpool::this_task::stop_requested()) return -1;
    for (int64_t s = 0; s < steps; ++s) x = x * 6364136223846793005ull + 1442695040888963407ull;
  }
  // The mix's value, so that it is computed: it is never 0 (x stays odd).
  if (x == 0) return -2;
  return thread_cpu_ns() - start;
}

struct Mixer {
  int64_t steps = 64;
  // Job sign says which: jobs >= 0 check, jobs < 0 do not (the same work for -job - 1).
  int64_t run(int64_t job) { return job >= 0 ? work(job, steps, true) : work(-job - 1, steps, false); }
};

}  // namespace

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const int n = static_cast<int>(args.get_int("jobs", 4000));
  const int64_t steps = args.get_int("steps", 64);
  const int workers = static_cast<int>(args.get_int("workers", 0));

  std::vector<int64_t> checked(n), plain(n);
  for (int i = 0; i < n; ++i) {
    checked[i] = i;
    plain[i] = -i - 1;
  }
  procpool::ProcessPool<Mixer> pool({.workers = workers}, [steps] { return Mixer{steps}; });
  if (!pool.map(std::vector<int64_t>(static_cast<size_t>(pool.workers()) * 4, 1)).ok()) {
    die("warm-up map");
  }
  for (int rep = 0; rep < reps; ++rep) {
    double seconds[2] = {0, 0};
    double cpu_ns[2] = {0, 0};
    for (int k = 0; k < 2; ++k) {
      const int which = (rep + k) % 2;  // 0: checked, 1: plain
      const int64_t start = now_ns();
      absl::StatusOr<std::vector<int64_t>> mapped = pool.map(which == 0 ? checked : plain);
      seconds[which] = seconds_since(start);
      if (!mapped.ok()) die(mapped.status().ToString());
      for (const int64_t ns : *mapped) {
        if (ns < 0) die("a task stopped early");
      }
      cpu_ns[which] = static_cast<double>(std::accumulate(mapped->begin(), mapped->end(), int64_t{0}));
    }
    // What one check costs a worker, from the difference (noise can make it negative).
    const double ns_per_check = (cpu_ns[0] - cpu_ns[1]) / (n * 1000.0);
    emit("stop_check", "cpu_ratio", cpu_ns[0] / cpu_ns[1], "x",
         {{"checked_s", seconds[0]},
          {"plain_s", seconds[1]},
          {"wall_ratio", seconds[0] / seconds[1]},
          {"ns_per_check", ns_per_check},
          {"workers", pool.workers()}});
  }
  return 0;
}
