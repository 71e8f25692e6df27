// procpool::this_worker() (this_worker.h) and the placement options: PoolOptions::worker_env and
// cpu_affinity. Real workers, forked and from the fork server; the same suite runs over TCP with
// remote workers (this_worker_tcp_test).

#include "procpool/this_worker.h"

#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "doctest/doctest.h"
#include "procpool/procpool.h"
#include "tests/test_link.h"

namespace procpool {
namespace {

std::string affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) != 0) return "?";
  std::vector<std::string> cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(std::to_string(cpu));
  }
  return absl::StrJoin(cpus, ",");
}

std::string getenv_or(const char* name, const char* otherwise) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : otherwise;
}

// What a worker says of itself, as "slot generation pid workers pool_name host env cpus | the
// same seen by the constructor". Job -1 kills the worker.
struct Identity {
  Identity() : at_construction(describe()) {}
  static std::string describe() {
    const WorkerInfo& me = this_worker();
    return absl::StrCat(me.slot, " ", me.generation, " ", me.pid, " ", me.workers, " ",
                        me.pool_name, " ", me.host.empty() ? "-" : "host", " ",
                        getenv_or("PROCPOOL_TEST_SLOT_ENV", "-"), " ", affinity());
  }
  std::string run(int64_t job) {
    if (job < 0) ::raise(SIGKILL);
    return absl::StrCat(describe(), "|", at_construction);
  }
  std::string at_construction;
};

struct Seen {
  int slot = -2;
  int64_t generation = -1;
  int pid = 0;
  int workers = 0;
  std::string pool_name, host, env, cpus, constructor;
};

Seen parse(const std::string& text) {
  const std::vector<std::string> halves = absl::StrSplit(text, '|');
  REQUIRE(halves.size() == 2);
  const std::vector<std::string> f = absl::StrSplit(halves[0], ' ');
  REQUIRE(f.size() == 8);
  Seen seen;
  REQUIRE(absl::SimpleAtoi(f[0], &seen.slot));
  REQUIRE(absl::SimpleAtoi(f[1], &seen.generation));
  REQUIRE(absl::SimpleAtoi(f[2], &seen.pid));
  REQUIRE(absl::SimpleAtoi(f[3], &seen.workers));
  seen.pool_name = f[4];
  seen.host = f[5];
  seen.env = f[6];
  seen.cpus = f[7];
  seen.constructor = halves[1];
  return seen;
}

PoolOptions quiet(PoolOptions options) {
  if (!getenv("PROCPOOL_TEST_LOG")) options.log_sink = nullptr;
  return testing::on_link(std::move(options));
}

TEST_CASE("this_worker() outside a worker says slot -1") {
  CHECK(this_worker().slot == -1);
  CHECK_FALSE(this_task::stop_requested());
  CHECK(this_task::attempt() == 0);
  CHECK_FALSE(this_task::stop_token().stop_possible());
}

TEST_CASE("this_worker() names the slot, pid, pool and its size in the constructor and in run") {
  for (const StartMethod method : {StartMethod::kFork, StartMethod::kForkServer}) {
    CAPTURE(static_cast<int>(method));
    ProcessPool<Identity> pool(quiet({.workers = 3, .name = "idpool", .start_method = method}));
    std::vector<int64_t> jobs(60, 1);
    absl::StatusOr<std::vector<std::string>> said = pool.map(jobs, {.chunksize = 1});
    REQUIRE(said.ok());
    for (const std::string& text : *said) {
      const Seen seen = parse(text);
      CHECK(seen.slot >= 0);
      CHECK(seen.slot < 3);
      CHECK(seen.generation == 0);
      CHECK(seen.workers == 3);
      CHECK(seen.pool_name == "idpool");
      CHECK(seen.host == "host");
      CHECK(seen.pid > 0);
      CHECK(seen.pid != ::getpid());
      // The constructor saw the same worker (the cpus and env fields are the same too).
      CHECK(seen.constructor == text.substr(0, text.find('|')));
    }
    CHECK(pool.close().ok());
    CHECK(pool.join().ok());
  }
}

TEST_CASE("a replacement keeps its slot and counts the next generation") {
  for (const StartMethod method : {StartMethod::kFork, StartMethod::kForkServer}) {
    CAPTURE(static_cast<int>(method));
    ProcessPool<Identity> pool(quiet({.workers = 1, .start_method = method}));
    absl::StatusOr<std::string> first = pool.apply(1);
    REQUIRE(first.ok());
    CHECK(parse(*first).generation == 0);
    CHECK(pool.apply(-1).status().code() == absl::StatusCode::kAborted);
    absl::StatusOr<std::string> second = pool.apply(1);
    REQUIRE(second.ok());
    CHECK(parse(*second).slot == 0);
    CHECK(parse(*second).generation == 1);
    CHECK(parse(*second).pid != parse(*first).pid);
    CHECK(pool.apply(-1).status().code() == absl::StatusCode::kAborted);
    absl::StatusOr<std::string> third = pool.apply(1);
    REQUIRE(third.ok());
    CHECK(parse(*third).generation == 2);
  }
}

TEST_CASE("worker_env(slot) is set before the constructor, replacements included") {
  for (const StartMethod method : {StartMethod::kFork, StartMethod::kForkServer}) {
    CAPTURE(static_cast<int>(method));
    PoolOptions options = quiet({.workers = 2, .start_method = method});
    options.worker_env = [](int slot) {
      return std::vector<std::pair<std::string, std::string>>{
          {"PROCPOOL_TEST_SLOT_ENV", absl::StrCat("slot", slot)}};
    };
    ProcessPool<Identity> pool(options);
    std::vector<int64_t> jobs(20, 1);
    absl::StatusOr<std::vector<std::string>> said = pool.map(jobs, {.chunksize = 1});
    REQUIRE(said.ok());
    for (const std::string& text : *said) {
      const Seen seen = parse(text);
      CHECK(seen.env == absl::StrCat("slot", seen.slot));
      CHECK(parse(seen.constructor + "|x").env == seen.env);  // the constructor saw it
    }
    CHECK(pool.apply(-1).status().code() == absl::StatusCode::kAborted);
    said = pool.map(jobs, {.chunksize = 1});
    REQUIRE(said.ok());
    for (const std::string& text : *said) {
      CHECK(parse(text).env == absl::StrCat("slot", parse(text).slot));
    }
  }
  // The pool's own environment is untouched.
  CHECK(std::getenv("PROCPOOL_TEST_SLOT_ENV") == nullptr);
}

TEST_CASE("a worker_env the pool cannot set fails the calls with kInvalidArgument") {
  PROCPOOL_LOCAL_ONLY("the same check runs before a remote spawn; one case is enough");
  PoolOptions options = quiet({.workers = 1});
  options.worker_env = [](int) {
    return std::vector<std::pair<std::string, std::string>>{{"BAD=NAME", "x"}};
  };
  ProcessPool<Identity> pool(options);
  absl::StatusOr<std::string> said = pool.apply(1);
  CHECK(said.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(absl::StrContains(said.status().message(), "worker_env"));
}

struct EnvLength {
  int64_t run(int64_t) { return static_cast<int64_t>(getenv_or("PROCPOOL_TEST_BIG_ENV", "").size()); }
};

TEST_CASE("a worker_env value of 1 MiB is set in a forked worker; a remote pool refuses it by name") {
  PoolOptions options = quiet({.workers = 1});
  options.worker_env = [](int) {
    return std::vector<std::pair<std::string, std::string>>{
        {"PROCPOOL_TEST_BIG_ENV", std::string(size_t{1} << 20, 'e')}};
  };
  ProcessPool<EnvLength> pool(options);
  absl::StatusOr<int64_t> length = pool.apply(0);
  if (!testing::remote_link()) {
    CHECK(length.value_or(-1) == int64_t{1} << 20);
    return;
  }
  // A remote worker's env travels in its host's spawn request, a frame of at most 65 KiB: one
  // larger would make the host drop the pool's connection, and with it every worker it runs.
  CHECK(length.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(absl::StrContains(length.status().message(), "worker_env"));
}

TEST_CASE("CpuAffinity::kSpread pins slot i to the i-th allowed CPU; a replacement keeps it") {
  cpu_set_t set;
  CPU_ZERO(&set);
  REQUIRE(::sched_getaffinity(0, sizeof(set), &set) == 0);
  std::vector<int> allowed;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) allowed.push_back(cpu);
  }
  for (const StartMethod method : {StartMethod::kFork, StartMethod::kForkServer}) {
    CAPTURE(static_cast<int>(method));
    ProcessPool<Identity> pool(
        quiet({.workers = 3, .start_method = method, .cpu_affinity = CpuAffinity::kSpread}));
    std::vector<int64_t> jobs(30, 1);
    absl::StatusOr<std::vector<std::string>> said = pool.map(jobs, {.chunksize = 1});
    REQUIRE(said.ok());
    for (const std::string& text : *said) {
      const Seen seen = parse(text);
      CHECK(seen.cpus == std::to_string(allowed[seen.slot % allowed.size()]));
    }
    // Without it, workers keep the parent's whole set.
    if (method == StartMethod::kFork) {
      ProcessPool<Identity> unpinned(quiet({.workers = 1}));
      absl::StatusOr<std::string> free = unpinned.apply(1);
      REQUIRE(free.ok());
      CHECK(parse(*free).cpus == affinity());
    }
  }
  ProcessPool<Identity> one(quiet({.workers = 1, .cpu_affinity = CpuAffinity::kSpread}));
  CHECK(one.apply(-1).status().code() == absl::StatusCode::kAborted);
  absl::StatusOr<std::string> replaced = one.apply(1);
  REQUIRE(replaced.ok());
  CHECK(parse(*replaced).generation == 1);
  CHECK(parse(*replaced).cpus == std::to_string(allowed[0]));
}

}  // namespace
}  // namespace procpool
