// Graceful drain (issue 19, item 4): a worker host (procpool::serve) that gets SIGTERM, as Slurm's
// preemption, scancel or a Kubernetes eviction sends it, finishes the task its worker runs, hands
// back the tasks it holds and has not started, runs exit() in its worker and exits 0; the pool runs
// those tasks elsewhere and, with RemoteOptions::launch, launches another host. No task fails
// because of it. A second SIGTERM stops the host at once. The hosts are real worker programs on
// 127.0.0.1, and the signals are real.

#include "procpool/process_pool.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "tests/fault_support.h"
#include "tests/remote_worker.h"
#include "tests/test_support.h"

extern char** environ;

namespace procpool {
namespace {

using testing::kRemoteHang;
using testing::kRemoteSlow;
using testing::LogCapture;
using testing::OutcomePool;
using testing::RemoteWorker;
using testing::TempDir;
using testing::wait_until;
using testing::worker_program;

constexpr char kToken[] = "the-drain-test-token";

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;


// A worker host started by the test, as a cluster engine would start it.
struct Host {
  pid_t pid = -1;
  int status = -1;  // once reaped
  bool reap(absl::Duration timeout) {
    return wait_until([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, timeout);
  }
};

Host start_host(const std::string& address) {
  std::string program = worker_program();
  char* argv[] = {program.data(), nullptr};
  std::vector<std::string> env = {absl::StrCat("PROCPOOL_CONNECT=", address),
                                  absl::StrCat("PROCPOOL_TOKEN=", kToken)};
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, "PROCPOOL_")) envp.push_back(*e);
  }
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  Host host;
  REQUIRE(::posix_spawn(&host.pid, argv[0], nullptr, nullptr, argv, envp.data()) == 0);
  return host;
}

using ::procpool::testing::parent_of;

PoolOptions pool_options(int workers, RemoteOptions remote, LogCapture& log) {
  PoolOptions options;
  options.workers = workers;
  options.log_sink = log.sink();
  options.remote = std::move(remote);
  return options;
}

RemoteOptions dialled_in() {
  return RemoteOptions{.listen = "127.0.0.1:0", .token = kToken, .connect_timeout = absl::Seconds(60)};
}

std::unique_ptr<RemoteWorker> make_worker() { return std::make_unique<RemoteWorker>(); }

// What the workers wrote to $REMOTE_EVENTS: how often each job ran, and which pids ran exit().
struct Events {
  std::map<int64_t, int> runs;
  std::map<int64_t, pid_t> ran_by;
  std::set<pid_t> entered;
  std::set<pid_t> exited;
};

Events read_events(const std::string& path) {
  Events events;
  for (const std::string& line : testing::read_lines(path)) {
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    pid_t pid = 0;
    if (parts.size() < 2 || !absl::SimpleAtoi(parts[1], &pid)) continue;
    if (parts[0] == "enter") events.entered.insert(pid);
    if (parts[0] == "exit") events.exited.insert(pid);
    int64_t job = 0;
    if (parts[0] == "run" && parts.size() == 3 && absl::SimpleAtoi(parts[2], &job)) {
      ++events.runs[job];
      events.ran_by[job] = pid;
    }
  }
  return events;
}

// The worker process a host forked for the pool, once there is one: a pool worker whose parent
// is that host.
pid_t worker_of(const PoolStats& stats, pid_t host) {
  for (const WorkerStats& worker : stats.workers) {
    if (worker.pid > 0 && parent_of(worker.pid) == host) return worker.pid;
  }
  return 0;
}

std::vector<int64_t> slow_jobs(int count) {
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < count; ++i) jobs.push_back(kRemoteSlow + i);
  return jobs;
}

// Every task of `call` has exactly one outcome, its own value, and ran exactly once.
void check_each_ran_once(OutcomePool<RemoteWorker>::Call& call, const std::vector<int64_t>& jobs,
                         const Events& events) {
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK(call.outcome_count(i) == 1);
    const absl::StatusOr<int64_t>& outcome = call.outcome(i);
    CHECK_MESSAGE(outcome.ok(), outcome.status());
    if (outcome.ok()) CHECK(*outcome == jobs[i] - kRemoteSlow);
    CHECK(events.runs.count(jobs[i]) == 1);
    if (events.runs.count(jobs[i]) == 1) CHECK(events.runs.at(jobs[i]) == 1);
  }
}

TEST_CASE("a worker host that gets SIGTERM mid-map finishes its task, hands back the rest, runs "
          "exit() and exits 0; every task succeeds once") {
  TempDir dir;
  const std::string events_file = dir.file("events");
  ::setenv("REMOTE_EVENTS", events_file.c_str(), 1);
  LogCapture log;
  Host leaving;
  Host staying;
  {
    OutcomePool<RemoteWorker> pool(pool_options(2, dialled_in(), log), make_worker);
    leaving = start_host(pool.core().remote_address());
    staying = start_host(pool.core().remote_address());
    const std::vector<int64_t> jobs = slow_jobs(32);
    // Batches of 6 tasks of 150 ms: a host holds tasks it has not started whenever it is caught.
    auto call = pool.submit(jobs, {.chunksize = 6});
    REQUIRE(call.ok());
    pid_t worker = 0;
    REQUIRE(wait_until([&] {
      const PoolStats stats = pool.stats();
      worker = worker_of(stats, leaving.pid);
      return worker != 0 && stats.tasks_done >= 2 && stats.tasks_running == 2;
    }, absl::Seconds(60)));
    const int64_t done_before = pool.stats().tasks_done;
    REQUIRE(::kill(leaving.pid, SIGTERM) == 0);
    // It leaves once its worker's task ended and its worker ran exit(): well before the map ends.
    REQUIRE(leaving.reap(absl::Seconds(30)));
    CHECK(WIFEXITED(leaving.status));
    CHECK(WEXITSTATUS(leaving.status) == 0);
    CHECK(read_events(events_file).exited.count(worker) == 1);
    CHECK(pool.stats().tasks_done < static_cast<int64_t>(jobs.size()));
    CHECK(pool.stats().tasks_done > done_before);
    REQUIRE((*call)->wait(absl::Seconds(120)));
    const Events events = read_events(events_file);
    check_each_ran_once(**call, jobs, events);
    // The tasks it handed back ran on the other host.
    std::set<pid_t> runners;
    for (const auto& [job, pid] : events.ran_by) runners.insert(pid);
    CHECK(runners.size() == 2);
    CHECK(pool.stats().tasks_failed == 0);
    CHECK(log.contains("is leaving"));
  }
  REQUIRE(staying.reap(absl::Seconds(30)));
  CHECK(WIFEXITED(staying.status));
  ::unsetenv("REMOTE_EVENTS");
}

TEST_CASE("a second SIGTERM stops a draining worker host at once") {
  LogCapture log;
  Host host;
  Host next;
  {
    OutcomePool<RemoteWorker> pool(pool_options(1, dialled_in(), log), make_worker);
    host = start_host(pool.core().remote_address());
    // A task that never ends: the drain waits for it (there is no task timeout).
    auto call = pool.submit({kRemoteHang, 1, 2}, {.chunksize = 3});
    REQUIRE(call.ok());
    pid_t worker = 0;
    REQUIRE(wait_until([&] {
      const PoolStats stats = pool.stats();
      worker = worker_of(stats, host.pid);
      return worker != 0 && stats.tasks_running == 1;
    }, absl::Seconds(60)));
    REQUIRE(::kill(host.pid, SIGTERM) == 0);
    // The pool heard of the drain and took the unstarted tasks back: the host is draining.
    REQUIRE(wait_until([&] { return log.contains("is leaving"); }, absl::Seconds(30)));
    CHECK(!host.reap(absl::Seconds(1)));  // its task still runs
    REQUIRE(::kill(host.pid, SIGTERM) == 0);
    REQUIRE(host.reap(absl::Seconds(10)));
    CHECK(WIFSIGNALED(host.status));
    if (WIFSIGNALED(host.status)) CHECK(WTERMSIG(host.status) == SIGTERM);
    // Its worker went with it (it dies with its host).
    CHECK(wait_until([&] { return !testing::process_alive(worker); }, absl::Seconds(10)));
    // The hanging task fails as a lost worker's task does; the two taken back wait for a host.
    REQUIRE(wait_until([&] { return (*call)->outcome_count(0) == 1; }, absl::Seconds(30)));
    CHECK((*call)->outcome(0).status().code() == absl::StatusCode::kAborted);
    CHECK((*call)->outcome_count(1) == 0);
    CHECK((*call)->outcome_count(2) == 0);
    next = start_host(pool.core().remote_address());
    REQUIRE((*call)->wait(absl::Seconds(60)));
    CHECK((*call)->outcome(1).value_or(-1) == 1);
    CHECK((*call)->outcome(2).value_or(-1) == 4);
  }
  CHECK(next.reap(absl::Seconds(30)));
}

TEST_CASE("a task that runs past its task_timeout while its host drains fails as a timeout would") {
  TempDir dir;
  const std::string events_file = dir.file("events");
  ::setenv("REMOTE_EVENTS", events_file.c_str(), 1);
  LogCapture log;
  Host first;
  Host second;
  {
    OutcomePool<RemoteWorker> pool(pool_options(2, dialled_in(), log), make_worker);
    first = start_host(pool.core().remote_address());
    second = start_host(pool.core().remote_address());
    REQUIRE(wait_until([&] {
      const PoolStats stats = pool.stats();
      return worker_of(stats, first.pid) != 0 && worker_of(stats, second.pid) != 0;
    }, absl::Seconds(60)));
    // One batch: the hanging task first, three after it.
    auto call = pool.submit({kRemoteHang, 3, 4, 5}, {.chunksize = 4, .task_timeout = absl::Seconds(2)});
    REQUIRE(call.ok());
    pid_t hanging = 0;
    REQUIRE(wait_until([&] {
      const Events events = read_events(events_file);
      if (events.ran_by.count(kRemoteHang) == 0) return false;
      hanging = events.ran_by.at(kRemoteHang);
      return true;
    }, absl::Seconds(60)));
    Host& draining = parent_of(hanging) == first.pid ? first : second;
    REQUIRE(parent_of(hanging) == draining.pid);
    REQUIRE(::kill(draining.pid, SIGTERM) == 0);
    REQUIRE((*call)->wait(absl::Seconds(60)));
    CHECK((*call)->outcome(0).status().code() == absl::StatusCode::kDeadlineExceeded);
    for (size_t i = 1; i < 4; ++i) {
      CAPTURE(i);
      CHECK((*call)->outcome_count(i) == 1);
      CHECK((*call)->outcome(i).value_or(-1) == static_cast<int64_t>((i + 2) * (i + 2)));
    }
    // Its host left, with status 0, once its worker was stopped.
    REQUIRE(draining.reap(absl::Seconds(30)));
    CHECK(WIFEXITED(draining.status));
    CHECK(WEXITSTATUS(draining.status) == 0);
    // The tasks it handed back ran once, elsewhere.
    const Events events = read_events(events_file);
    for (int64_t job : {3, 4, 5}) {
      CAPTURE(job);
      CHECK(events.runs.count(job) == 1);
      if (events.runs.count(job) == 1) {
        CHECK(events.runs.at(job) == 1);
        CHECK(parent_of(events.ran_by.at(job)) != draining.pid);
      }
    }
  }
  for (Host* host : {&first, &second}) {
    if (host->status == -1) CHECK(host->reap(absl::Seconds(30)));
  }
  ::unsetenv("REMOTE_EVENTS");
}

TEST_CASE("with a launch command, a drained host is replaced by a newly launched one") {
  TempDir dir;
  const std::string events_file = dir.file("events");
  ::setenv("REMOTE_EVENTS", events_file.c_str(), 1);
  LogCapture log;
  {
    OutcomePool<RemoteWorker> pool(
        pool_options(2,
                     RemoteOptions{.launch = {worker_program(), "--procpool-connect={address}"},
                                   .connect_timeout = absl::Seconds(60)},
                     log),
        make_worker);
    const std::vector<int64_t> jobs = slow_jobs(32);
    auto call = pool.submit(jobs, {.chunksize = 6});
    REQUIRE(call.ok());
    std::set<pid_t> first_workers;
    REQUIRE(wait_until([&] {
      const PoolStats stats = pool.stats();
      first_workers.clear();
      for (const WorkerStats& worker : stats.workers) {
        if (worker.pid > 0) first_workers.insert(worker.pid);
      }
      return first_workers.size() == 2 && stats.tasks_done >= 2 && stats.tasks_running == 2;
    }, absl::Seconds(60)));
    const pid_t worker = *first_workers.begin();
    const pid_t host = parent_of(worker);
    REQUIRE(host > 0);
    REQUIRE(host != ::getpid());
    REQUIRE(::kill(host, SIGTERM) == 0);
    REQUIRE((*call)->wait(absl::Seconds(120)));
    check_each_ran_once(**call, jobs, read_events(events_file));
    // Its host left (the pool reaps what it launched), after its worker ran exit(); a new host
    // took its slot.
    CHECK(wait_until([&] { return !testing::process_alive(host); }, absl::Seconds(30)));
    CHECK(read_events(events_file).exited.count(worker) == 1);
    CHECK(wait_until([&] {
      const PoolStats stats = pool.stats();
      int fresh = 0;
      for (const WorkerStats& w : stats.workers) {
        fresh += w.pid > 0 && first_workers.count(w.pid) == 0 && parent_of(w.pid) != host &&
                 (w.state == WorkerState::kIdle || w.state == WorkerState::kBusy);
      }
      return fresh == 1;
    }, absl::Seconds(60)));
    CHECK(pool.stats().workers_restarted >= 1);
    CHECK(pool.stats().tasks_failed == 0);
  }
  ::unsetenv("REMOTE_EVENTS");
}

// An elastic pool (issue 19, item 7): workers that dial in on their own (srun steps of a job), fewer
// of them than the pool's `workers`. Close-then-join must not wait for, or start, workers for the
// slots that still wait for a host.
TEST_CASE("at join, a slot still waiting for a worker host starts no worker: a host freed by "
          "join is not given one to run enter() and exit() for nothing") {
  TempDir dir;
  const std::string events_file = dir.file("events");
  ::setenv("REMOTE_EVENTS", events_file.c_str(), 1);
  LogCapture log;
  Host host;
  {
    OutcomePool<RemoteWorker> pool(pool_options(2, dialled_in(), log), make_worker);
    host = start_host(pool.core().remote_address());
    auto call = pool.submit(slow_jobs(4), {.chunksize = 1});
    REQUIRE(call.ok());
    REQUIRE((*call)->wait(absl::Seconds(60)));
    REQUIRE(pool.core().close().ok());
    CHECK(pool.core().join().ok());
  }
  REQUIRE(host.reap(absl::Seconds(30)));
  CHECK(WIFEXITED(host.status));
  // One worker did the work, ran exit() and left; none came after it.
  const Events events = read_events(events_file);
  CHECK(events.entered.size() == 1);
  CHECK(events.exited.size() == 1);
  ::unsetenv("REMOTE_EVENTS");
}

// Without `launch`, hosts dial in when their cluster engine starts them (srun steps that come
// one by one): a place with no host after connect_timeout waits for one, which is no error.
TEST_CASE("an elastic pool with fewer hosts than workers logs its empty places once, as waiting "
          "for hosts to dial in, not as an error per place at every retry") {
  LogCapture log;
  PoolOptions options = pool_options(3, dialled_in(), log);
  options.remote->connect_timeout = absl::Milliseconds(300);
  // Retries come often: each would be a start failure logged again.
  options.respawn_delay = absl::Milliseconds(50);
  options.respawn_max_delay = absl::Milliseconds(200);
  OutcomePool<RemoteWorker> pool(options, make_worker);
  Host host = start_host(pool.core().remote_address());
  // The host dials in first: a call made while no worker at all has connected fails after
  // connect_timeout (300 ms here), and a loaded machine can take longer than that to start it.
  REQUIRE(wait_until([&] { return worker_of(pool.stats(), host.pid) != 0; }, absl::Seconds(60)));
  // Several connect_timeout periods, with work going on the one host all along.
  const absl::Time until = absl::Now() + absl::Seconds(2);
  int maps = 0;
  while (absl::Now() < until || maps < 2) {
    const std::vector<int64_t> jobs = slow_jobs(3);
    auto call = pool.submit(jobs, {.chunksize = 1});
    REQUIRE(call.ok());
    REQUIRE((*call)->wait(absl::Seconds(60)));
    for (size_t i = 0; i < jobs.size(); ++i) {
      const absl::StatusOr<int64_t>& outcome = (*call)->outcome(i);
      REQUIRE_MESSAGE(outcome.ok(), outcome.status());
      CHECK(*outcome == jobs[i] - kRemoteSlow);
    }
    ++maps;
  }
  const auto errors = log.events([](const LogEvent& event) {
    return event.severity == LogSeverity::kError;
  });
  for (const LogEvent& event : errors) MESSAGE("error logged: ", event.message);
  CHECK(errors.empty());
  const auto waiting = log.events([](const LogEvent& event) {
    return absl::StrContains(event.message, "dial in");
  });
  CHECK(waiting.size() == 1);
  for (const LogEvent& event : waiting) {
    CHECK(event.severity == LogSeverity::kWarning);
    CHECK(absl::StrContains(event.message, "2 of 3"));
  }
  REQUIRE(pool.core().close().ok());
  CHECK(pool.core().join().ok());
  REQUIRE(host.reap(absl::Seconds(30)));
}

TEST_CASE("every worker host drained (its step ended): close-then-join returns OK at once, not "
          "after join_timeout waiting for hosts that will not come") {
  LogCapture log;
  Host host;
  PoolOptions options = pool_options(2, dialled_in(), log);
  options.join_timeout = absl::Seconds(20);
  OutcomePool<RemoteWorker> pool(options, make_worker);
  host = start_host(pool.core().remote_address());
  auto call = pool.submit(slow_jobs(4), {.chunksize = 1});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(60)));
  REQUIRE(::kill(host.pid, SIGTERM) == 0);
  REQUIRE(host.reap(absl::Seconds(30)));
  CHECK(WIFEXITED(host.status));
  REQUIRE(wait_until([&] { return log.contains("is leaving"); }, absl::Seconds(30)));
  REQUIRE(pool.core().close().ok());
  const absl::Time start = absl::Now();
  const absl::Status joined = pool.core().join();
  MESSAGE("join took ", absl::FormatDuration(absl::Now() - start), ": ", joined);
  CHECK(joined.ok());
}

}  // namespace
}  // namespace procpool
