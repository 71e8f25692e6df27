// Remote workers launched by a real cluster engine (issue 9): a single-node Slurm
// (tools/slurm_local.sh up) starts every worker as an `srun -n1` job; this test binary is itself
// the worker program (tests/test_main.cc). Tagged "slurm": CI runs it with the cluster up and
// SLURM_CONF passed in (--test_env=SLURM_CONF).

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/process_pool.h"
#include "tests/fault_support.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::OutcomePool;
using testing::wait_until;

// About 100 us of work a job.
struct SlurmWorker {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t job) {
    uint64_t h = static_cast<uint64_t>(job);
    for (int i = 0; i < 20000; ++i) h = (h ^ (h >> 31)) * 0xbf58476d1ce4e5b9ull;
    return job * 2 + static_cast<int64_t>(h & 0);
  }
};

// Processes of this machine whose command line has `needle` (this test's workers and their srun).
std::vector<pid_t> processes_with(const std::string& needle) {
  std::vector<pid_t> found;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(entry.path() / "cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (absl::StrContains(cmdline, needle) && testing::process_alive(std::stoi(name))) {
      found.push_back(std::stoi(name));
    }
  }
  return found;
}

std::string run(const std::string& command) {
  std::string out;
  if (std::FILE* pipe = ::popen(command.c_str(), "r")) {
    char buffer[4096];
    size_t got;
    while ((got = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, got);
    ::pclose(pipe);
  }
  return out;
}

TEST_CASE("10,000 jobs over srun-launched workers; one SIGKILLed mid-map; every job gets one "
          "outcome; nothing is left running") {
  REQUIRE_MESSAGE(std::getenv("SLURM_CONF") != nullptr,
                  "run with a cluster: bash tools/slurm_local.sh up; "
                  "eval \"$(bash tools/slurm_local.sh env)\"; and --test_env=SLURM_CONF");
  testing::disable_core_dumps();
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string marker = "--procpool-connect=";
  {
    // Outside an allocation every srun is a job of its own; --oversubscribe lets more of them run
    // than the node has CPUs (the partition allows it).
    OutcomePool<SlurmWorker> pool(
        {.workers = 3,
         .log_sink = nullptr,
         .remote = RemoteOptions{.token = "slurm-test-token",
                                 .launch = {"srun", "-n1", "--oversubscribe", "--export=ALL",
                                            "--job-name=procpool-test", self,
                                            "--procpool-connect={address}"},
                                 .connect_timeout = absl::Seconds(60)}},
        [] { return std::make_unique<SlurmWorker>(); });
    std::vector<int64_t> jobs;
    for (int64_t i = 0; i < 10000; ++i) jobs.push_back(i);
    auto call = pool.submit(jobs, {.chunksize = 20});
    REQUIRE(call.ok());
    REQUIRE(wait_until([&] { return pool.stats().tasks_done >= 2000; }, absl::Seconds(60)));
    const pid_t victim = pool.stats().workers[0].pid;
    REQUIRE(victim > 0);
    REQUIRE(::kill(victim, SIGKILL) == 0);
    REQUIRE((*call)->wait(absl::Seconds(120)));
    size_t failed = 0;
    for (size_t i = 0; i < jobs.size(); ++i) {
      CAPTURE(i);
      CHECK((*call)->outcome_count(i) == 1);
      const auto& outcome = (*call)->outcome(i);
      if (outcome.ok()) {
        CHECK(*outcome == jobs[i] * 2);
      } else {
        ++failed;
        CHECK(outcome.status().code() == absl::StatusCode::kAborted);
      }
    }
    MESSAGE(failed, " of 10,000 jobs failed with the killed worker; restarts: ",
            pool.stats().workers_restarted);
    CHECK(failed >= 1);
    CHECK(failed <= 20);  // its running task, and chunk-mates whose results died with it
  }
  // The pool is gone: every worker, its relay and its srun left, and Slurm has no job of ours.
  CHECK(wait_until([&] { return processes_with(marker + "127.0.0.1").empty(); }, absl::Seconds(20)));
  for (pid_t pid : processes_with(marker + "127.0.0.1")) MESSAGE("still running: pid ", pid);
  std::string queue;
  CHECK(wait_until([&] {
    queue = run("squeue -h -n procpool-test 2>&1");
    return queue.empty();
  }, absl::Seconds(30)));
  MESSAGE("squeue: '", queue, "'");
}

}  // namespace
}  // namespace procpool
