// StartMethod::kForkServer: workers forked by a single-threaded zygote, so a program whose threads
// hold locks while workers are replaced does not hand those locks, held, to the new workers.

#include "procpool/process_pool.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "lib/fault_injection.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

PoolOptions fork_server(PoolOptions options) {
  options.start_method = StartMethod::kForkServer;
  if (!getenv("PROCPOOL_TEST_LOG")) options.log_sink = nullptr;
  return options;
}

using ::procpool::testing::parent_of;

struct Exiter {
  explicit Exiter(std::string dir) : dir_(std::move(dir)) {}
  int64_t run(int64_t x) {
    if (x < 0) ::raise(SIGKILL);
    return getpid();
  }
  void exit() { testing::append_line(absl::StrCat(dir_, "/exit.", getpid()), "done"); }
  std::string dir_;
};

TEST_CASE("a fork-server pool forks its workers from the zygote and shuts down cleanly") {
  testing::TempDir dir;
  std::set<int64_t> pids;
  pid_t zygote = 0;
  {
    ProcessPool<Exiter> pool(fork_server({.workers = 2}), [d = dir.path()] { return Exiter(d); });
    std::vector<int64_t> jobs(20, 1);
    absl::StatusOr<std::vector<int64_t>> served = pool.map(jobs, {.chunksize = 1});
    REQUIRE(served.ok());
    pids.insert(served->begin(), served->end());
    for (int64_t pid : pids) {
      zygote = parent_of(static_cast<pid_t>(pid));
      CHECK(zygote != getpid());
      CHECK(parent_of(zygote) == getpid());
    }
    // A crash is reported through the zygote and the worker replaced from it.
    std::vector<int64_t> crash = {1, -1, 1};
    absl::StatusOr<std::vector<int64_t>> crashed = pool.map(crash, {.chunksize = 1});
    CHECK(crashed.status().code() == absl::StatusCode::kAborted);
    CHECK(std::string(crashed.status().message()).find("signal 9") != std::string::npos);
    CHECK(pool.stats().workers_restarted == 1);
    CHECK(*pool.apply(1) > 0);
  }
  for (int64_t pid : pids) CHECK_FALSE(testing::process_exists(static_cast<pid_t>(pid)));
  CHECK_FALSE(testing::process_exists(zygote));
  CHECK(testing::child_pids(getpid()).empty());
  // Every worker that was asked to leave ran exit(): the two final ones at least.
  int exits = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    exits += entry.path().filename().string().rfind("exit.", 0) == 0;
  }
  CHECK(exits >= 2);
}

TEST_CASE("an exception in the fork server ends it there: no second copy of the program runs on") {
  testing::TempDir dir;
  const std::string marker = dir.path() + "/after_the_pool";
  // The fork server this pool forks throws (std::bad_alloc) on its first spawn request.
  internal::inject_fork_server_exceptions(1);
  try {
    ProcessPool<Exiter> pool(fork_server({.workers = 1}), [d = dir.path()] { return Exiter(d); });
    internal::inject_fork_server_exceptions(0);  // those started after it serve as usual
    // The call fails naming the fork server that left, or runs on one started again; the pool
    // carries on with a new one either way.
    bool served = false;
    for (int i = 0; i < 100 && !served; ++i) {
      absl::StatusOr<int64_t> pid = pool.apply(1);
      INFO("call ", i, ": ", pid.status());
      served = pid.ok();
      if (!served) {
        CHECK(pid.status().code() == absl::StatusCode::kUnavailable);
        CHECK(absl::StrContains(pid.status().message(), "fork server"));
        absl::SleepFor(absl::Milliseconds(100));
      }
    }
    CHECK(served);
  } catch (...) {
    // Never in this process: the pool does not throw. In a copy of it, made by an exception
    // unwinding out of the fork server into the program's own frames, this is where it lands.
  }
  testing::append_line(marker, absl::StrCat(getpid()));
  absl::SleepFor(absl::Milliseconds(500));  // time for such a copy to write too
  CHECK(testing::read_file(marker) == absl::StrCat(getpid(), "\n"));
}

// A lock the program's threads hold much of the time, and that a worker needs in enter() (as a
// logging or allocation library's lock would be).
std::mutex busy_lock;

struct NeedsTheLock {
  absl::Status enter() {
    std::lock_guard lock(busy_lock);  // would deadlock in a child forked while it was held
    return absl::OkStatus();
  }
  int64_t run(int64_t x) {
    if (x < 0) ::raise(SIGKILL);  // forces a replacement
    return x;
  }
};

TEST_CASE("workers replaced while the program's threads hold locks do not inherit them") {
  ProcessPool<NeedsTheLock> pool(fork_server({.workers = 2}));
  // Threads started after the pool: they hold busy_lock nearly all the time.
  std::atomic<bool> stop{false};
  std::vector<std::thread> holders;
  for (int i = 0; i < 2; ++i) {
    holders.emplace_back([&stop] {
      while (!stop.load()) {
        std::lock_guard lock(busy_lock);
        absl::SleepFor(absl::Milliseconds(20));
      }
    });
  }
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 60; ++i) jobs.push_back(i % 10 == 5 ? -1 : i);
  AsyncResult<std::vector<int64_t>> result = pool.map_async(jobs, {.chunksize = 1});
  // With plain fork from a thread of this program, a replacement would block forever in enter().
  const bool finished = result.wait(absl::Seconds(20));
  stop = true;
  for (std::thread& holder : holders) holder.join();
  REQUIRE(finished);
  CHECK(result.get().status().code() == absl::StatusCode::kAborted);
  CHECK(pool.stats().workers_restarted == 6);
  std::vector<int64_t> more = {7, 8};
  CHECK(*pool.map(more) == more);
}

}  // namespace
}  // namespace procpool
