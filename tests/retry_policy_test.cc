// The retry policy: CallOptions::retry_on (which failures send a task back), retries (how many
// times) and retry_backoff (how long it waits, a timer that blocks no other task), and
// this_task::attempt(). Real workers, forked and from the fork server.

#include "procpool/this_worker.h"

#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "doctest/doctest.h"
#include "procpool/procpool.h"

namespace procpool {
namespace {

int64_t now_ns() {
  timespec now;
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

// Job n >= 0: fails kUnavailable until its attempt n, then returns the attempt. Job -n: the
// worker dies on attempts before n. Job 1000 + n: as n, but returns when it ran (CLOCK_MONOTONIC).
struct Flaky {
  absl::StatusOr<int64_t> run(int64_t job) {
    const bool timed = job >= 1000;
    if (timed) job -= 1000;
    if (job < 0) {
      if (this_task::attempt() < -job) ::raise(SIGKILL);
      return this_task::attempt();
    }
    if (this_task::attempt() < job) {
      return absl::UnavailableError(absl::StrCat("not yet: attempt ", this_task::attempt()));
    }
    return timed ? now_ns() : this_task::attempt();
  }
};

// The same through the listed path (byte strings).
struct FlakyText {
  absl::StatusOr<std::string> run(const std::string& job) {
    if (this_task::attempt() < static_cast<int>(job.size())) {
      return absl::UnavailableError("not yet");
    }
    return absl::StrCat(this_task::attempt());
  }
};

PoolOptions quiet(PoolOptions options) {
  if (!getenv("PROCPOOL_TEST_LOG")) options.log_sink = nullptr;
  return options;
}

const StartMethod kMethods[] = {StartMethod::kFork, StartMethod::kForkServer};

TEST_CASE("retry_on sends back a task that returned a listed code; attempt() counts its runs") {
  for (const StartMethod method : kMethods) {
    CAPTURE(static_cast<int>(method));
    ProcessPool<Flaky> pool(quiet({.workers = 2, .start_method = method}));
    const CallOptions retrying{.retries = 3, .retry_on = {absl::StatusCode::kUnavailable}};
    absl::StatusOr<std::vector<int64_t>> ran = pool.map(std::vector<int64_t>{1, 2, 3, 4, 1}, retrying);
    REQUIRE(ran.ok());
    CHECK(*ran == std::vector<int64_t>{1, 2, 3, 4, 1});
    // Out of retries: the last failure is the task's.
    absl::StatusOr<int64_t> gave_up = pool.apply(5, retrying);
    CHECK(gave_up.status().code() == absl::StatusCode::kUnavailable);
    CHECK(absl::StrContains(gave_up.status().message(), "attempt 4"));
    // Not listed: not retried.
    CHECK(pool.apply(2, {.retries = 3, .retry_on = {absl::StatusCode::kAborted}}).status().code() ==
          absl::StatusCode::kUnavailable);
    // Without retry_on, an error the task returns is never retried (the old rule).
    CHECK(pool.apply(2, {.retries = 3}).status().code() == absl::StatusCode::kUnavailable);

    ProcessPool<FlakyText> text(quiet({.workers = 1, .start_method = method}));
    absl::StatusOr<std::vector<std::string>> said =
        text.map(std::vector<std::string>{"x", "xx", "xxx"}, {.chunksize = 3, .retries = 2,
                                                              .retry_on = {absl::StatusCode::kUnavailable}});
    REQUIRE(said.ok());
    CHECK(*said == std::vector<std::string>{"1", "2", "3"});
  }
}

TEST_CASE("a worker's death is retried as kAborted: by default, or when retry_on lists it") {
  ProcessPool<Flaky> pool(quiet({.workers = 1}));
  CHECK(pool.apply(-2, {.retries = 1}).value_or(-1) == 2);
  CHECK(pool.apply(-2, {.retries = 1, .retry_on = {absl::StatusCode::kAborted}}).value_or(-1) == 2);
  CHECK(pool.apply(-2, {.retries = 1, .retry_on = {absl::StatusCode::kUnavailable}}).status().code() ==
        absl::StatusCode::kAborted);
}

TEST_CASE("retry_backoff delays a retry by a timer; other tasks run meanwhile") {
  for (const StartMethod method : kMethods) {
    CAPTURE(static_cast<int>(method));
    ProcessPool<Flaky> pool(quiet({.workers = 1, .start_method = method}));
    const int64_t start = now_ns();
    // Job 1002 fails once and comes back after 400 ms; the quick ones behind it (the only worker's)
    // do not wait for that.
    std::vector<int64_t> jobs{1002};
    for (int i = 0; i < 20; ++i) jobs.push_back(1000);
    absl::StatusOr<std::vector<int64_t>> ran = pool.map(
        jobs, {.chunksize = 1,
               .retries = 1,
               .retry_on = {absl::StatusCode::kUnavailable},
               .retry_backoff = {.initial = absl::Milliseconds(400), .jitter = 0}});
    REQUIRE(ran.ok());
    CHECK((*ran)[0] - start >= 390'000'000);
    for (size_t i = 1; i < ran->size(); ++i) CHECK((*ran)[i] < (*ran)[0]);
  }
}

// Its first run waits to be asked to stop, then returns (its value is dropped); later runs return
// their attempt.
struct StopsWhenAsked {
  absl::StatusOr<int64_t> run(int64_t) {
    if (this_task::attempt() == 1) {
      while (!this_task::stop_requested()) ::usleep(1000);
      return -1;
    }
    return this_task::attempt();
  }
};

TEST_CASE("a task that returns after its soft_timeout is retried under retry_on kDeadlineExceeded, as one killed at it") {
  const CallOptions retrying{.retries = 2,
                             .soft_timeout = absl::Milliseconds(200),
                             .retry_on = {absl::StatusCode::kDeadlineExceeded}};
  for (const absl::Duration grace : {absl::ZeroDuration(), absl::Seconds(30)}) {
    CAPTURE(grace);
    // Without a grace the worker is killed at the soft timeout; with one, the task returns.
    ProcessPool<StopsWhenAsked> pool(quiet({.workers = 1, .cancel_grace = grace}));
    const absl::StatusOr<int64_t> applied = pool.apply(1, retrying);
    CHECK_MESSAGE(applied.value_or(-1) == 2, applied.status());
    const absl::StatusOr<std::vector<int64_t>> mapped =
        pool.map(std::vector<int64_t>{1, 2}, {.chunksize = 2,
                                              .retries = 2,
                                              .soft_timeout = absl::Milliseconds(200),
                                              .retry_on = {absl::StatusCode::kDeadlineExceeded}});
    CHECK_MESSAGE(mapped.ok(), mapped.status());
    if (mapped.ok()) CHECK(*mapped == std::vector<int64_t>{2, 2});
    // Not listed: the soft timeout is the task's outcome.
    CHECK(pool.apply(1, {.retries = 2, .soft_timeout = absl::Milliseconds(200),
                         .retry_on = {absl::StatusCode::kUnavailable}})
              .status()
              .code() == absl::StatusCode::kDeadlineExceeded);
  }
}

TEST_CASE("retry_on and its backoff out of range fail the call with kInvalidArgument") {
  ProcessPool<Flaky> pool(quiet({.workers = 1}));
  const std::vector<CallOptions> bad = {
      {.retries = 1, .retry_on = {absl::StatusCode::kCancelled}},
      {.retries = 1, .retry_on = {absl::StatusCode::kOk}},
      {.retry_backoff = {.initial = absl::Seconds(-1)}},
      {.retry_backoff = {.initial = absl::Seconds(2), .max = absl::Seconds(1)}},
      {.retry_backoff = {.multiplier = 0.5}},
      {.retry_backoff = {.jitter = 1.5}},
      {.soft_timeout = absl::ZeroDuration()},
  };
  for (const CallOptions& options : bad) {
    const absl::Status status = pool.apply(1, options).status();
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  }
  ProcessPool<Flaky> negative(quiet({.workers = 1, .cancel_grace = absl::Seconds(-1)}));
  CHECK(negative.apply(1).status().code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace procpool
