// Results held back for one write (issue 10): when many small batches are queued at a worker, it
// writes the results of several in one go, and keeps them meanwhile in shared memory
// (lib/wire/control_page.h, HeldFrames). What must hold: a worker that dies with results held
// loses none of them (each task still has exactly one outcome, only the task that died fails),
// and results held while the worker runs a long task reach the caller without waiting for it.

#include "procpool/process_pool.h"

#include <signal.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <ranges>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "lib/wire/control_page.h"
#include "tests/fault_support.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::OutcomePool;

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return options;
}

constexpr int64_t kDie = -1;

// Squares its job; kDie kills the worker; a job over 1000 sleeps that many ms - 1000 first.
struct Quick {
  int64_t run(int64_t job) {
    if (job == kDie) ::raise(SIGKILL);
    if (job > 1000) absl::SleepFor(absl::Milliseconds(job - 1000));
    return job * job;
  }
};

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;

TEST_CASE("a worker that dies with results held loses none of them: only its task fails") {
  // Hundreds of one-task batches queue at each worker, so results are held when the crash comes;
  // repeated, because where the crash falls in a worker's run of batches varies.
  for (int round = 0; round < 10; ++round) {
    CAPTURE(round);
    OutcomePool<Quick> pool(quiet({.workers = 2}), [] { return std::make_unique<Quick>(); });
    std::vector<int64_t> jobs(600);
    for (size_t i = 0; i < jobs.size(); ++i) jobs[i] = static_cast<int64_t>(i % 1000);
    const size_t victim = 300 + static_cast<size_t>(round) * 17;
    jobs[victim] = kDie;
    auto call = pool.submit(jobs, {.chunksize = 1});
    REQUIRE(call.ok());
    REQUIRE((*call)->wait(absl::Seconds(20)));
    for (size_t i = 0; i < jobs.size(); ++i) {
      CAPTURE(i);
      REQUIRE((*call)->outcome_count(i) == 1);
      if (i == victim) {
        CHECK((*call)->outcome(i).status().code() == absl::StatusCode::kAborted);
        CHECK(absl::StrContains((*call)->outcome(i).status().message(), "while running"));
      } else {
        REQUIRE_MESSAGE((*call)->outcome(i).ok(), (*call)->outcome(i).status());
        CHECK(*(*call)->outcome(i) == jobs[i] * jobs[i]);
      }
    }
  }
}

TEST_CASE("results held while the worker runs a long task reach the caller before it ends") {
  ProcessPool<Quick> pool(quiet({.workers = 1}));
  // Quick tasks first (so the pool queues batches at the worker), then one of 1.5 s.
  std::vector<int64_t> jobs(200, 3);
  jobs.push_back(2500);
  const absl::Time start = absl::Now();
  size_t seen = 0;
  absl::Duration quick_done;
  for (absl::StatusOr<int64_t> result : pool.imap(jobs, {.max_in_flight = 64})) {
    REQUIRE(result.ok());
    if (++seen == 200) quick_done = absl::Now() - start;
  }
  const absl::Duration all_done = absl::Now() - start;
  MESSAGE("the quick tasks' results were in after ", absl::FormatDuration(quick_done),
          ", the long one's after ", absl::FormatDuration(all_done));
  CHECK(all_done >= absl::Milliseconds(1500));
  CHECK(quick_done < absl::Milliseconds(700));
}

// The held-frames area of the calling worker, after its control page.
internal::HeldFrames* own_held_frames() {
  void* mapping = testing::own_control_mapping();
  if (mapping == nullptr) return nullptr;
  return internal::held_frames(static_cast<internal::ControlPage*>(mapping));
}

constexpr int64_t kScribble = -2;

// kScribble: as a broken worker might, leaves its held-frames area saying that frames from 4 to
// 16 have waited since long ago (4: not a word boundary, where no frame can begin), then runs
// for a long time, so the pool comes to take them. Other jobs are echoed.
struct HeldScribbler {
  int64_t run(int64_t job) {
    if (job != kScribble) return job;
    internal::HeldFrames* held = own_held_frames();
    if (held == nullptr) return -1;
    held->bytes.store(16);
    held->taken.store(4);
    held->since_ns.store(1);
    absl::SleepFor(absl::Seconds(3));
    return job;
  }
};

TEST_CASE("a worker whose held frames begin off a word boundary breaks its stream: kDataLoss") {
  ProcessPool<HeldScribbler> pool(quiet({.workers = 1}));
  const absl::Time start = absl::Now();
  absl::StatusOr<int64_t> result = pool.apply(kScribble);
  MESSAGE("after ", absl::FormatDuration(absl::Now() - start), ": ", result.status());
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kDataLoss);
  CHECK(absl::StrContains(result.status().message(), "left its held frames in a bad state"));
  // The worker was replaced; the pool carries on.
  auto next = pool.apply(7);
  REQUIRE_MESSAGE(next.ok(), next.status());
  CHECK(*next == 7);
}

}  // namespace
}  // namespace procpool
