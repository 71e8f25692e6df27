// A parent for the parent-death test (fault_test.cc): makes a pool of two workers, prints their
// pids on one line of stdout once they are in the wanted state, then waits to be SIGKILLed.
//
//   parent_death_helper busy   # both workers are running a task that lasts a minute
//   parent_death_helper idle   # both workers have run enter() and wait for work
//
// Exits with status 2 if the workers do not get there within 10 seconds.

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "procpool/process_pool.h"

namespace {

struct Sleeper {
  int64_t run(int64_t seconds) {
    absl::SleepFor(absl::Seconds(seconds));
    return seconds;
  }
};

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "busy";
  procpool::ProcessPool<Sleeper> pool({.workers = 2, .log_sink = nullptr});
  // Waits until every worker is in state `wanted`; past 10 s exits at once, without the pool's
  // destructor, which would wait for the tasks in flight.
  auto wait_for = [&pool](procpool::WorkerState wanted) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (true) {
      procpool::PoolStats stats = pool.stats();
      bool there = true;
      for (const procpool::WorkerStats& worker : stats.workers) {
        if (worker.state != wanted || worker.pid == 0) there = false;
      }
      if (there) return stats;
      if (absl::Now() > deadline) ::_exit(2);
      absl::SleepFor(absl::Milliseconds(2));
    }
  };
  // Both workers ready first, so the two tasks go one to each.
  procpool::PoolStats stats = wait_for(procpool::WorkerState::kIdle);
  if (mode == "busy") {
    // Never joined: this process is meant to die in the middle of the map.
    std::thread([&pool] {
      std::vector<int64_t> jobs = {60, 60};
      (void)pool.map(jobs, {.chunksize = 1});
    }).detach();
    stats = wait_for(procpool::WorkerState::kBusy);
  }
  std::printf("%d %d\n", stats.workers[0].pid, stats.workers[1].pid);
  std::fflush(stdout);
  while (true) ::pause();
}
