// Remote workers launched by a real cluster engine (issue 9): a single-node Slurm
// (tools/slurm_local.sh up) starts every worker as an `srun -n1` job, and preempts one (SIGTERM: it
// drains); this test binary is itself the worker program (tests/test_main.cc). Tagged "slurm": CI runs it with the cluster up and
// SLURM_CONF passed in (--test_env=SLURM_CONF).

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
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

// 20 ms a job; each run appends the job to the file $SLURM_TEST_RUNS names (O_APPEND), so that
// the test counts how often each ran.
struct SlurmSlowWorker {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t job) {
    absl::SleepFor(absl::Milliseconds(20));
    if (const char* runs = std::getenv("SLURM_TEST_RUNS")) testing::append_line(runs, absl::StrCat(job));
    return job * 3;
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

// Three workers, each a job of its own: `srun` runs this test binary, which dials the pool.
// Outside an allocation every srun is a job of its own; --oversubscribe lets more of them run
// than the node has CPUs (the partition allows it).
PoolOptions srun_launched(const std::string& self, const std::string& job_name) {
  return {.workers = 3,
          .log_sink = nullptr,
          .remote = RemoteOptions{.token = "slurm-test-token",
                                  .launch = {"srun", "-n1", "--oversubscribe", "--export=ALL",
                                             "--job-name=" + job_name, self,
                                             "--procpool-connect={address}"},
                                  .connect_timeout = absl::Seconds(60)}};
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
    OutcomePool<SlurmWorker> pool(
        srun_launched(self, "procpool-test"),
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
    // Its running task, and chunk-mates whose results died with it; none when it died between
    // batches (a batch of 20 takes 2 ms, a round trip to the pool on a loaded machine as long:
    // it often is, and the pool may still count it busy while its results are on the way).
    CHECK(failed <= 20);
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

TEST_CASE("a worker host that Slurm preempts (scancel --signal=TERM on its job) drains: every job "
          "runs once and succeeds, and another host is launched") {
  REQUIRE_MESSAGE(std::getenv("SLURM_CONF") != nullptr,
                  "run with a cluster: bash tools/slurm_local.sh up; "
                  "eval \"$(bash tools/slurm_local.sh env)\"; and --test_env=SLURM_CONF");
  testing::disable_core_dumps();
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string marker = "--procpool-connect=";
  testing::TempDir dir;
  const std::string runs_file = dir.file("runs");
  ::setenv("SLURM_TEST_RUNS", runs_file.c_str(), 1);  // srun --export=ALL passes it on
  {
    OutcomePool<SlurmSlowWorker> pool(
        srun_launched(self, "procpool-drain"),
        [] { return std::make_unique<SlurmSlowWorker>(); });
    std::vector<int64_t> jobs;
    for (int64_t i = 0; i < 600; ++i) jobs.push_back(i);
    auto call = pool.submit(jobs, {.chunksize = 4});
    REQUIRE(call.ok());
    REQUIRE(wait_until([&] { return pool.stats().tasks_done >= 60; }, absl::Seconds(60)));
    // One of the hosts' jobs, as the scheduler preempts it: SIGTERM to every process of its steps
    // (the relay, and the worker it forked, which leaves a SIGTERM not sent by its relay alone).
    std::string job_ids = run("squeue -h -n procpool-drain -t R -o %i 2>&1");
    const std::string victim = job_ids.substr(0, job_ids.find('\n'));
    REQUIRE_MESSAGE(!victim.empty(), "squeue: ", job_ids);
    const int64_t done_before = pool.stats().tasks_done;
    MESSAGE("scancel --signal=TERM ", victim, " after ", done_before, " jobs: ",
            run(absl::StrCat("scancel --signal=TERM ", victim, " 2>&1")));
    REQUIRE((*call)->wait(absl::Seconds(120)));
    std::map<int64_t, int> ran;
    for (const std::string& line : testing::read_lines(runs_file)) ++ran[std::stoll(line)];
    for (size_t i = 0; i < jobs.size(); ++i) {
      CAPTURE(i);
      CHECK((*call)->outcome_count(i) == 1);
      const auto& outcome = (*call)->outcome(i);
      CHECK_MESSAGE(outcome.ok(), outcome.status());
      if (outcome.ok()) CHECK(*outcome == jobs[i] * 3);
      CHECK(ran[jobs[i]] == 1);
    }
    // Its job ended (its relay left with status 0), and the pool launched a host in its place.
    CHECK(wait_until([&] {
      return !absl::StrContains(run("squeue -h -n procpool-drain -o %i 2>&1"), victim);
    }, absl::Seconds(30)));
    CHECK(wait_until([&] { return pool.stats().workers_restarted >= 1; }, absl::Seconds(30)));
    CHECK(pool.stats().tasks_failed == 0);
  }
  ::unsetenv("SLURM_TEST_RUNS");
  CHECK(wait_until([&] { return processes_with(marker + "127.0.0.1").empty(); }, absl::Seconds(20)));
  std::string queue;
  CHECK(wait_until([&] {
    queue = run("squeue -h -n procpool-drain 2>&1");
    return queue.empty();
  }, absl::Seconds(30)));
  MESSAGE("squeue: '", queue, "'");
}

}  // namespace
}  // namespace procpool
