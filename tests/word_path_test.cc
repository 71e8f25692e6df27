// The word path (issue 10): scalar jobs and results travel as blobs of 8-byte words, sent from the
// caller's array in place and computed in place by the worker, with the worker's bookkeeping done
// per stride of tasks. What must not change with it: a borrowed array is never read after map
// returns (run these under --config=asan), timeouts are measured from each task's own start, and
// every task has exactly one outcome with the right value. The suite runs against both links
// (word_path_tcp_test: remote workers over loopback, whose frames over a caller's array wait in
// the TCP link's writer).

#include "procpool/process_pool.h"

#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "tests/fault_support.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::map_within;
using testing::wait_until;

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return testing::on_link(std::move(options));
}

using testing::all_serving;

struct Squarer {
  int64_t run(int64_t x) { return x * x; }
};

// Sleeps `ms` milliseconds (when positive) and returns it.
struct Napper {
  int64_t run(int64_t ms) {
    if (ms > 0) absl::SleepFor(absl::Milliseconds(ms));
    return ms;
  }
};

TEST_CASE("scalar results come back right for every word kind and conversion") {
  SUBCASE("int64 -> int64, sent in place") {
    ProcessPool<Squarer> pool(quiet({.workers = 2}));
    std::vector<int64_t> jobs(300'000);
    for (size_t i = 0; i < jobs.size(); ++i) jobs[i] = static_cast<int64_t>(i) - 150'000;
    auto squares = pool.map(jobs);
    REQUIRE(squares.ok());
    for (size_t i = 0; i < jobs.size(); ++i) REQUIRE((*squares)[i] == jobs[i] * jobs[i]);
  }
  SUBCASE("int32 -> double, converted word by word") {
    struct Halver {
      double run(int32_t x) { return x / 2.0; }
    };
    ProcessPool<Halver> pool(quiet({.workers = 2}));
    std::vector<int32_t> jobs = {std::numeric_limits<int32_t>::min(), -3, 0, 7,
                                 std::numeric_limits<int32_t>::max()};
    auto halves = pool.map(jobs);
    REQUIRE(halves.ok());
    for (size_t i = 0; i < jobs.size(); ++i) CHECK((*halves)[i] == jobs[i] / 2.0);
  }
  SUBCASE("a result that does not fit its type fails that job alone with kDataLoss") {
    // The worker's Result is uint64; the caller reads it back as the same type, so force a misfit
    // through a StatusOr error instead: a failing task among good ones keeps its own index.
    struct Picky {
      absl::StatusOr<uint64_t> run(uint64_t x) {
        if (x == 7) return absl::InvalidArgumentError("seven");
        return x + 1;
      }
    };
    ProcessPool<Picky> pool(quiet({.workers = 1}));
    std::vector<uint64_t> jobs(20);
    for (size_t i = 0; i < jobs.size(); ++i) jobs[i] = i;
    auto out = pool.map(jobs);
    REQUIRE_FALSE(out.ok());
    CHECK(out.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(out.status().message(), "job 7: seven"));
  }
}

TEST_CASE("a caller's array sent in place is never read after map returns, even with frames "
          "still queued for a stopped worker") {
  // Run under --config=asan: the frames left queued for the stopped worker referenced the jobs;
  // map must have copied what was unsent before returning, or writing them later reads freed
  // memory (ASan checks what sendmsg reads).
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }));
  const pid_t stopped = pool.stats().workers[1].pid;
  REQUIRE(::kill(stopped, SIGSTOP) == 0);
  REQUIRE(wait_until([&] { return testing::process_state(stopped) == 'T'; }));
  {
    // 64 MiB of jobs in batches of 1 MiB: more than the stopped worker's socket can hold.
    auto jobs = std::make_unique<std::vector<int64_t>>(size_t{8} << 20);
    for (size_t i = 0; i < jobs->size(); ++i) (*jobs)[i] = static_cast<int64_t>(i % 1000);
    auto squares = map_within(pool, *jobs, {.chunksize = 1 << 17}, absl::Seconds(30));
    REQUIRE_MESSAGE(squares.ok(), squares.status());
    for (size_t i = 0; i < jobs->size(); i += 4099) {
      REQUIRE((*squares)[i] == (*jobs)[i] * (*jobs)[i]);
    }
    // Scribble over the jobs, then free them, while the stopped worker's frames are still queued.
    std::fill(jobs->begin(), jobs->end(), -1);
    jobs.reset();
  }
  REQUIRE(::kill(stopped, SIGCONT) == 0);
  // The worker now reads the queued frames (whose tasks were taken back: it starts none of them),
  // then serves again.
  std::vector<int64_t> more(100'000, 3);
  auto again = map_within(pool, more, {}, absl::Seconds(30));
  REQUIRE(again.ok());
  for (int64_t square : *again) REQUIRE(square == 9);
  // join (at the end of the scope) waits until the worker has read every frame sent to it.
}

TEST_CASE("in a batch of scalars, a task's timeout counts from its own start, not its stride's") {
  // Thousands of instant tasks, then a slow one that stays within the timeout and one that does
  // not, all in one batch on one worker. Work stamped per stride could blame the first slow task
  // for the time of the instant ones before it; every task of a batch with a timeout is stamped.
  const absl::Duration timeout = absl::Milliseconds(400);
  ProcessPool<Napper> pool(quiet({.workers = 1, .kill_grace = absl::Milliseconds(200)}));
  std::vector<int64_t> jobs(5000, 0);
  jobs.push_back(250);   // 250 ms < 400 ms: must succeed
  jobs.push_back(5000);  // must time out, after 400 ms of its own
  jobs.push_back(0);
  const absl::Time start = absl::Now();
  auto out = map_within(pool, jobs, {.chunksize = jobs.size(), .task_timeout = timeout},
                        absl::Seconds(10));
  const absl::Duration took = absl::Now() - start;
  REQUIRE_FALSE(out.ok());
  CAPTURE(out.status());
  CHECK(out.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(absl::StrContains(out.status().message(), "job 5001: "));
  // The slow task ran its own 400 ms after the 250 ms one.
  CHECK(took >= absl::Milliseconds(250) + timeout);
  CHECK(took < absl::Seconds(4));
  // Without the timeout the same batch succeeds.
  std::vector<int64_t> fine(5000, 0);
  fine.push_back(50);
  auto ok = map_within(pool, fine, {.chunksize = fine.size()}, absl::Seconds(10));
  CHECK(ok.ok());
}

}  // namespace
}  // namespace procpool
