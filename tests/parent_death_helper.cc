// A parent for the parent-death test (fault_test.cc): makes a pool of two workers, prints their
// pids on one line of stdout once they are in the wanted state, then waits to be SIGKILLed.
//
//   parent_death_helper busy   # both workers are running a task that lasts a minute
//   parent_death_helper idle   # both workers have run enter() and wait for work
//   parent_death_helper remote WORKER_PROGRAM
//                              # two remote workers (WORKER_PROGRAM, launched over loopback) run a
//                              # task that never ends; prints the workers' pids, then their
//                              # hosts' (the serve() processes)
//
// Exits with status 2 if the workers do not get there within 10 seconds.

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "procpool/process_pool.h"
#include "tests/remote_worker.h"

namespace {

struct Sleeper {
  int64_t run(int64_t seconds) {
    absl::SleepFor(absl::Seconds(seconds));
    return seconds;
  }
};

}  // namespace

// The parent of a process, from /proc.
pid_t parent_of(pid_t pid) {
  std::FILE* stat = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "re");
  if (stat == nullptr) return 0;
  char buffer[512] = {};
  const size_t got = std::fread(buffer, 1, sizeof(buffer) - 1, stat);
  std::fclose(stat);
  const char* close = std::strrchr(buffer, ')');
  int ppid = 0;
  char state;
  if (got == 0 || close == nullptr || std::sscanf(close + 1, " %c %d", &state, &ppid) != 2) return 0;
  return ppid;
}

int remote(const char* worker_program) {
  procpool::ProcessPool<procpool::testing::RemoteWorker> pool(
      {.workers = 2,
       .log_sink = nullptr,
       .remote = procpool::RemoteOptions{
           .launch = {worker_program, "--procpool-connect={address}"},
           .heartbeat_timeout = absl::Seconds(1)}});
  std::thread([&pool] {
    std::vector<int64_t> jobs = {procpool::testing::kRemoteHang, procpool::testing::kRemoteHang};
    (void)pool.map(jobs, {.chunksize = 1});
  }).detach();
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (true) {
    procpool::PoolStats stats = pool.stats();
    bool busy = true;
    for (const procpool::WorkerStats& worker : stats.workers) {
      if (worker.state != procpool::WorkerState::kBusy || !worker.current_task.has_value()) busy = false;
    }
    if (busy) {
      std::printf("%d %d %d %d\n", stats.workers[0].pid, stats.workers[1].pid,
                  parent_of(stats.workers[0].pid), parent_of(stats.workers[1].pid));
      std::fflush(stdout);
      while (true) ::pause();
    }
    if (absl::Now() > deadline) ::_exit(2);
    absl::SleepFor(absl::Milliseconds(5));
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "busy";
  if (mode == "remote" && argc > 2) return remote(argv[2]);
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
