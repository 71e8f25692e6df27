// apply of a tiny job, one at a time, against the raw floor (a 16-byte socketpair ping-pong
// between two processes, see raw_floor.h):
//   bench_apply calls=20000 reps=5
// Each repetition measures the raw floor, then forks a fresh pool (workers = cores), warms it up
// with calls/10 applies, and times `calls` applies, one after the other. Prints µs per round trip
// for both, and their ratio.
//
// With cpu=N the whole program (and so every process it forks: the raw child, the workers) is
// pinned to CPU N first. On a virtual machine a round trip between two CPUs costs several times
// one on the same CPU (waking an idle virtual CPU), and where the scheduler puts a child decides
// which one a run measures; pinned, the raw floor and procpool are compared in the same setting.

#include <sched.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "bench/raw_floor.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

struct Increment {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t x) { return x + 1; }
};

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const int64_t calls = args.get_int("calls", 20000);
  const int workers = static_cast<int>(args.get_int("workers", 0));
  const int cpu = static_cast<int>(args.get_int("cpu", -1));
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (::sched_setaffinity(0, sizeof(set), &set) != 0) die("sched_setaffinity");
  }
  const std::string name = cpu >= 0 ? "apply_pinned" : "apply";

  for (int rep = 0; rep < reps; ++rep) {
    const double raw_us = raw_pingpong_us(calls, calls / 10);

    procpool::ProcessPool<Increment> pool({.workers = workers});
    for (int64_t i = 0; i < calls / 10; ++i) {
      if (!pool.apply(i).ok()) die("warm-up apply");
    }
    const int64_t start = now_ns();
    for (int64_t i = 0; i < calls; ++i) {
      absl::StatusOr<int64_t> result = pool.apply(i);
      if (!result.ok()) die(result.status().ToString());
      if (*result != i + 1) die("wrong result");
    }
    const double apply_us = (now_ns() - start) / 1e3 / static_cast<double>(calls);
    emit(name, "us_per_call", apply_us, "us",
         {{"raw_us", raw_us}, {"ratio_to_raw", apply_us / raw_us}, {"workers", pool.workers()}});
  }
  return 0;
}
