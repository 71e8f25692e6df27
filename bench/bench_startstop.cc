// Pool start + close + join with trivial enter()/exit(), workers = cores:
//   bench_startstop reps=20 [cgroups=off]
// Times construction (forks every worker) through join() (every worker ran enter() and exit()
// and was reaped), and the floor: forking as many children that exit at once, and reaping them
// (raw_floor.h). Prints milliseconds of both per repetition.

#include "absl/status/status.h"
#include "bench/bench_util.h"
#include "bench/raw_floor.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

struct Trivial {
  using Job = int64_t;
  using Result = int64_t;
  absl::Status enter() { return absl::OkStatus(); }
  int64_t run(int64_t x) { return x; }
  void exit() {}
};

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 20));
  const int workers = static_cast<int>(args.get_int("workers", 0));
  // cgroups=off: Cgroups::kOff, to see what the default per-worker cgroups (kAuto) cost.
  const procpool::Cgroups cgroups =
      args.get("cgroups", "auto") == "off" ? procpool::Cgroups::kOff : procpool::Cgroups::kAuto;
  for (int rep = 0; rep < reps; ++rep) {
    const int64_t start = now_ns();
    int started = 0;
    {
      procpool::ProcessPool<Trivial> pool({.workers = workers, .cgroups = cgroups});
      started = pool.workers();
      if (!pool.close().ok()) die("close");
      if (absl::Status joined = pool.join(); !joined.ok()) die(joined.ToString());
    }
    const double ms = (now_ns() - start) / 1e6;
    const double raw = raw_fork_ms(started);
    emit("startstop", "ms", ms, "ms", {{"workers", started}, {"raw_ms", raw}});
  }
  return 0;
}
