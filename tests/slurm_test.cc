// Remote workers launched by a real cluster engine (issue 9): a single-node Slurm
// (tools/slurm_local.sh up) starts every worker as an `srun -n1` job, and preempts one (SIGTERM: it
// drains); this test binary is itself the worker program (tests/test_main.cc). The example of
// examples/slurm runs as a user submits it: its elastic run (issue 19, item 7), and a scancel of
// it. Tagged "slurm": CI runs it with the cluster up and SLURM_CONF passed in
// (--test_env=SLURM_CONF).

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
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

// Other processes of this machine whose command line has `needle` (this test's workers and their
// srun: `needle` is this test's own path). A process that ends while it is looked at is skipped.
std::vector<pid_t> processes_with(const std::string& needle) {
  std::vector<pid_t> found;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = std::stoi(name);
    if (pid == ::getpid()) continue;
    // Empty if it ended meanwhile (reading its cmdline fails with ESRCH).
    const std::string cmdline = testing::read_file(entry.path() / "cmdline");
    if (absl::StrContains(cmdline, needle) && testing::process_alive(pid)) found.push_back(pid);
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
  CHECK(wait_until([&] { return processes_with(self).empty(); }, absl::Seconds(20)));
  for (pid_t pid : processes_with(self)) MESSAGE("still running: pid ", pid);
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
  CHECK(wait_until([&] { return processes_with(self).empty(); }, absl::Seconds(20)));
  std::string queue;
  CHECK(wait_until([&] {
    queue = run("squeue -h -n procpool-drain 2>&1");
    return queue.empty();
  }, absl::Seconds(30)));
  MESSAGE("squeue: '", queue, "'");
}

// The example as a user runs it: slurm_pool_example and run_pool.sbatch copied into a directory
// of their own (the submit directory), and the job submitted from there. Bazel's runfiles, or
// CMake's build and source trees.
struct ExampleJob {
  testing::TempDir dir;
  std::string id;
  std::string out_file() const { return dir.file(absl::StrCat("procpool-example-", id, ".out")); }
  std::string output() const { return testing::read_file(out_file()); }
  bool ended(absl::Duration timeout) const {
    return wait_until([&] { return run(absl::StrCat("squeue -h -j ", id, " 2>/dev/null")).empty(); },
                      timeout);
  }
};

std::string example_file(const std::string& runfile, const std::string& fallback) {
  if (const char* srcdir = std::getenv("TEST_SRCDIR")) {
    const char* workspace = std::getenv("TEST_WORKSPACE");
    const std::string path = absl::StrCat(srcdir, "/", workspace ? workspace : "procpool", "/", runfile);
    if (testing::file_exists(path)) return path;
  }
  return fallback;
}

void submit_example(ExampleJob& job, const std::string& mode) {
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe");
#ifdef PROCPOOL_SOURCE_DIR
  const std::string source_dir = PROCPOOL_SOURCE_DIR;
#else
  const std::string source_dir = ".";
#endif
  const std::string program =
      example_file("examples/slurm/slurm_pool_example",
                   (exe.parent_path().parent_path() / "examples" / "slurm_pool_example").string());
  const std::string script =
      example_file("examples/slurm/run_pool.sbatch", source_dir + "/examples/slurm/run_pool.sbatch");
  REQUIRE_MESSAGE(testing::file_exists(program), "no example program at ", program);
  REQUIRE_MESSAGE(testing::file_exists(script), "no example script at ", script);
  namespace fs = std::filesystem;
  fs::copy_file(program, job.dir.file("slurm_pool_example"), fs::copy_options::overwrite_existing);
  fs::permissions(job.dir.file("slurm_pool_example"), fs::perms::owner_all);
  fs::copy_file(script, job.dir.file("run_pool.sbatch"), fs::copy_options::overwrite_existing);
  const std::string submitted =
      run(absl::StrCat("cd ", job.dir.path(),
                       " && sbatch --parsable --job-name=procpool-example-test run_pool.sbatch ",
                       mode, " 2>&1"));
  job.id = std::string(absl::StripAsciiWhitespace(submitted));
  int64_t number = 0;
  REQUIRE_MESSAGE(absl::SimpleAtoi(job.id, &number), "sbatch: ", submitted);
}

// Processes still running from the job's directory (the parent, its workers, their srun).
std::vector<pid_t> processes_in(const std::string& dir) {
  const std::filesystem::path canonical = std::filesystem::canonical(dir);
  std::vector<pid_t> found;
  for (pid_t pid : processes_with("slurm_pool_example")) {
    std::error_code error;
    const auto cwd = std::filesystem::read_symlink(absl::StrCat("/proc/", pid, "/cwd"), error);
    if (!error && cwd == canonical) found.push_back(pid);
  }
  return found;
}

// "... tasks by step: vm step 0: 812, vm step 1: 1188; fold ..." of the example's last line: the
// count of each step.
std::map<std::string, int64_t> tasks_by_step(const std::string& line) {
  std::map<std::string, int64_t> counts;
  const size_t from = line.find("tasks by step: ");
  if (from == std::string::npos) return counts;
  std::string list = line.substr(from + 15);
  list = list.substr(0, list.find(';'));
  for (absl::string_view part : absl::StrSplit(list, ", ")) {
    const size_t colon = part.rfind(": ");
    int64_t count = 0;
    if (colon != absl::string_view::npos && absl::SimpleAtoi(part.substr(colon + 2), &count)) {
      counts[std::string(part.substr(0, colon))] = count;
    }
  }
  return counts;
}

TEST_CASE("the example's elastic run (sbatch run_pool.sbatch elastic): the pool grows with a second "
          "srun step, the first drains on scancel --signal=TERM, no task fails or is lost, and the "
          "job's end leaves nothing running") {
  REQUIRE_MESSAGE(std::getenv("SLURM_CONF") != nullptr,
                  "run with a cluster: bash tools/slurm_local.sh up; "
                  "eval \"$(bash tools/slurm_local.sh env)\"; and --test_env=SLURM_CONF");
  ExampleJob job;
  submit_example(job, "elastic");
  REQUIRE_MESSAGE(job.ended(absl::Seconds(240)), job.output());
  const std::string output = job.output();
  MESSAGE(output);
  // It grew to both steps' workers, then shrank to one when the first step drained.
  const size_t grew = output.find("workers connected: 2 [");
  CHECK(grew != std::string::npos);
  CHECK(output.find("workers connected: 1 [", grew == std::string::npos ? 0 : grew) !=
        std::string::npos);
  CHECK(absl::StrContains(output, "SIGTERM: draining"));
  // Every job has one result; none failed; each step ran some.
  std::string last;
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    if (absl::StartsWith(line, "mapped ")) last = std::string(line);
  }
  CHECK(absl::StartsWith(last, "mapped 200000 jobs in "));
  CHECK(absl::StrContains(last, ", 0 failed;"));
  const std::map<std::string, int64_t> counts = tasks_by_step(last);
  CHECK(counts.size() == 2);
  int64_t total = 0;
  for (const auto& step : counts) {
    CAPTURE(step.first);
    CHECK(step.second > 0);
    total += step.second;
  }
  CHECK(total == 200000);
  CHECK(absl::StrContains(output, "join: OK"));
  CHECK(!absl::StrContains(output, "a task failed"));
  // Both steps' sruns ended by themselves, with status 0: the drained one, and the other once the
  // pool closed its connection.
  size_t clean_steps = 0;
  for (size_t at = output.find("exited with status 0"); at != std::string::npos;
       at = output.find("exited with status 0", at + 1)) {
    ++clean_steps;
  }
  CHECK(clean_steps == 2);
  CHECK(absl::StrContains(run(absl::StrCat("scontrol show job ", job.id, " 2>&1")), "ExitCode=0:0"));
  CHECK(wait_until([&] { return processes_in(job.dir.path()).empty(); }, absl::Seconds(20)));
  for (pid_t pid : processes_in(job.dir.path())) MESSAGE("still running: pid ", pid);
}

TEST_CASE("scancel of the example's elastic job while both steps work leaves nothing running") {
  REQUIRE_MESSAGE(std::getenv("SLURM_CONF") != nullptr,
                  "run with a cluster: bash tools/slurm_local.sh up; "
                  "eval \"$(bash tools/slurm_local.sh env)\"; and --test_env=SLURM_CONF");
  ExampleJob job;
  submit_example(job, "elastic");
  REQUIRE_MESSAGE(wait_until([&] { return absl::StrContains(job.output(), "workers connected: 2 ["); },
                             absl::Seconds(120)),
                  job.output());
  REQUIRE(processes_in(job.dir.path()).size() >= 3);  // the parent, a worker host of each step
  MESSAGE("scancel ", job.id, ": ", run(absl::StrCat("scancel ", job.id, " 2>&1")));
  REQUIRE_MESSAGE(job.ended(absl::Seconds(120)), job.output());
  CHECK(wait_until([&] { return processes_in(job.dir.path()).empty(); }, absl::Seconds(20)));
  for (pid_t pid : processes_in(job.dir.path())) MESSAGE("still running: pid ", pid);
  MESSAGE(job.output());
}

}  // namespace
}  // namespace procpool
