// A finished task's value is never lost to a later event in the same worker (issue 15): when a
// worker is stopped for a task that ran past its timeout, or because its stream broke, the tasks
// it finished before in the same batch keep their values (or, where their results cannot be
// trusted, run again under `retries`), and only the task at fault fails, with its own cause.
// Real workers, real timeouts, real kills; the same suite runs over remote (TCP) workers
// (tests/BUILD.bazel: finished_results_tcp_test).

#include "procpool/process_pool.h"

#include <unistd.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "tests/fault_support.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::message_has;
using testing::write_all;

// The worker's end of its channel (lib/worker/child_setup.h kChildChannelFd), for a task that
// writes bytes the pool cannot read, as a buggy or hostile worker would.
constexpr int kWorkerChannelFd = 3;

constexpr int64_t kSlow = -10;          // sleeps 10 s (the tests' timeouts stop it long before)
constexpr int64_t kGarbageThenOk = -2;  // writes bytes that are no frame, then returns normally
constexpr int64_t kSleep3s = -3;        // sleeps 3 s, then returns

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return testing::on_link(std::move(options));
}

int64_t run_job(int64_t job) {
  if (job == kSlow) absl::SleepFor(absl::Seconds(10));
  if (job == kSleep3s) absl::SleepFor(absl::Seconds(3));
  if (job == kGarbageThenOk) {
    const char garbage[] = "\xde\xad\xbe\xef garbage, not a frame \xff\xff\xff\xff";
    write_all(kWorkerChannelFd, garbage, sizeof(garbage));
  }
  return job * 10;
}

// Scalars both ways: the word path (results computed in place, strides of tasks per claim).
struct WordWorker {
  int64_t run(int64_t job) { return run_job(job); }
};
// A string result: the listed path (one outcome each, pieces of several).
struct ListedWorker {
  std::string run(int64_t job) { return absl::StrCat(run_job(job)); }
};

std::string as_text(int64_t value) { return absl::StrCat(value); }
std::string as_text(const std::string& value) { return value; }

// Each job's outcome, by index. imap_unordered yields no index: a value is placed by the job it
// came from (job * 10, all distinct), an error at the one index no value took.
template <typename Range>
std::map<size_t, absl::StatusOr<std::string>> outcomes_by_index(Range&& range,
                                                                const std::vector<int64_t>& jobs,
                                                                bool ordered) {
  std::map<size_t, absl::StatusOr<std::string>> out;
  std::vector<absl::Status> errors;
  size_t index = 0;
  for (auto&& outcome : range) {
    if (ordered) {
      if (outcome.ok()) {
        out.emplace(index, as_text(*outcome));
      } else {
        out.emplace(index, outcome.status());
      }
    } else if (outcome.ok()) {
      const std::string value = as_text(*outcome);
      for (size_t j = 0; j < jobs.size(); ++j) {
        if (absl::StrCat(jobs[j] * 10) == value) out.emplace(j, value);
      }
    } else {
      errors.push_back(outcome.status());
    }
    ++index;
  }
  for (size_t j = 0; j < jobs.size() && !errors.empty(); ++j) {
    if (out.count(j) == 0) {
      out.emplace(j, errors.back());
      errors.pop_back();
    }
  }
  return out;
}

// Jobs 0..n-1 with `bad` at `at`.
std::vector<int64_t> jobs_with(size_t n, size_t at, int64_t bad) {
  std::vector<int64_t> jobs;
  for (size_t i = 0; i < n; ++i) jobs.push_back(i == at ? bad : static_cast<int64_t>(i));
  return jobs;
}

template <typename W>
void check_timeout_keeps_batch_mates(StartMethod method) {
  const absl::Duration timeout = absl::Milliseconds(500);
  ProcessPool<W> pool(quiet({.workers = 1, .start_method = method}));
  // One batch of 5 on one worker: jobs 0 and 1 finish at once, job 2 runs until it is stopped.
  const std::vector<int64_t> jobs = jobs_with(5, 2, kSlow);
  const CallOptions options{.chunksize = 5, .task_timeout = timeout};

  SUBCASE("map fails with job 2's timeout, not with a batch-mate's lost result") {
    auto result = testing::map_within(pool, jobs, options, absl::Seconds(60));
    MESSAGE(result.status());
    REQUIRE_FALSE(result.ok());
    CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(message_has(result.status(), "job 2: "));
    // In the same words whoever stopped it: the pool, or a remote worker's host.
    CHECK(message_has(result.status(), "task 2 of its call ran past its timeout of 500ms"));
  }
  std::map<size_t, absl::StatusOr<std::string>> outcomes;
  SUBCASE("imap: every other job has its value") {
    outcomes = outcomes_by_index(pool.imap(jobs, options), jobs, true);
  }
  SUBCASE("imap_unordered: every other job has its value") {
    outcomes = outcomes_by_index(pool.imap_unordered(jobs, options), jobs, false);
  }
  if (outcomes.empty()) return;
  REQUIRE(outcomes.size() == jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    const absl::StatusOr<std::string>& outcome = outcomes.at(i);
    if (i == 2) {
      CHECK(outcome.status().code() == absl::StatusCode::kDeadlineExceeded);
    } else {
      REQUIRE_MESSAGE(outcome.ok(), outcome.status());
      CHECK(*outcome == absl::StrCat(jobs[i] * 10));
    }
  }
}

TEST_CASE("a task past its timeout fails alone: its finished batch-mates keep their values") {
  SUBCASE("scalar results (the word path)") {
    check_timeout_keeps_batch_mates<WordWorker>(StartMethod::kFork);
  }
  SUBCASE("string results") { check_timeout_keeps_batch_mates<ListedWorker>(StartMethod::kFork); }
  SUBCASE("scalar results, fork server") {
    check_timeout_keeps_batch_mates<WordWorker>(StartMethod::kForkServer);
  }
  SUBCASE("string results, fork server") {
    check_timeout_keeps_batch_mates<ListedWorker>(StartMethod::kForkServer);
  }
}

TEST_CASE("a long chunk: every task finished before the one that timed out keeps its value") {
  // Many quick tasks first (the word path claims them in long strides), then one that hangs.
  const std::vector<int64_t> jobs = jobs_with(3000, 2500, kSlow);
  ProcessPool<WordWorker> pool(quiet({.workers = 1}));
  std::map<size_t, absl::StatusOr<std::string>> outcomes = outcomes_by_index(
      pool.imap(jobs, {.chunksize = jobs.size(), .task_timeout = absl::Milliseconds(500)}), jobs,
      true);
  REQUIRE(outcomes.size() == jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    if (i == 2500) {
      CHECK(outcomes.at(i).status().code() == absl::StatusCode::kDeadlineExceeded);
    } else {
      REQUIRE_MESSAGE(outcomes.at(i).ok(), outcomes.at(i).status());
      CHECK(*outcomes.at(i) == absl::StrCat(jobs[i] * 10));
    }
  }
}

template <typename W>
void check_results_arrive_during_long_task() {
  ProcessPool<W> pool(quiet({.workers = 1}));
  // One timed batch: quick tasks, then one of 3 s. The quick ones' values are published before
  // the long one starts, so the caller has them while it runs.
  const std::vector<int64_t> jobs = jobs_with(201, 200, kSleep3s);
  const absl::Time start = absl::Now();
  absl::Duration quick_done;
  size_t seen = 0;
  for (const auto& outcome :
       pool.imap(jobs, {.chunksize = jobs.size(), .task_timeout = absl::Seconds(60)})) {
    REQUIRE_MESSAGE(outcome.ok(), outcome.status());
    if (++seen == 200) quick_done = absl::Now() - start;
  }
  const absl::Duration all_done = absl::Now() - start;
  MESSAGE("the quick tasks' values were in after ", absl::FormatDuration(quick_done),
          ", the long one's after ", absl::FormatDuration(all_done));
  CHECK(seen == jobs.size());
  CHECK(all_done - quick_done >= absl::Seconds(1));
}

TEST_CASE("in a timed batch, finished values reach the caller while a later task still runs") {
  SUBCASE("scalar results (the word path)") { check_results_arrive_during_long_task<WordWorker>(); }
  SUBCASE("string results") { check_results_arrive_during_long_task<ListedWorker>(); }
}

TEST_CASE("a malformed frame sent as a task ends fails that task with kDataLoss naming the frame; "
          "its innocent batch-mates run again under retries") {
  int retries = 0;
  SUBCASE("no retries: the batch-mates fail kAborted, saying the stream broke") {}
  SUBCASE("retries: the batch-mates run again and succeed") { retries = 1; }
  PoolOptions options = quiet({.workers = 1});
  // Over TCP, in plaintext: the frame itself must reach the pool's decoder. Under TLS the same
  // bytes are a record that fails authentication, and every task the connection cost fails
  // kDataLoss saying so (remote_tls_test).
  if (options.remote) options.remote->encrypt = false;
  ProcessPool<ListedWorker> pool(options);
  // The bad frame comes from the batch's last task, so the worker has finished it (or is about
  // to) when the pool reads the bytes and stops it; the four before it finished unreported.
  const std::vector<int64_t> jobs = jobs_with(5, 4, kGarbageThenOk);
  std::map<size_t, absl::StatusOr<std::string>> outcomes =
      outcomes_by_index(pool.imap(jobs, {.chunksize = 5, .retries = retries}), jobs, true);
  REQUIRE(outcomes.size() == jobs.size());
  const absl::Status& blamed = outcomes.at(4).status();
  MESSAGE("job 4: ", blamed);
  CHECK(blamed.code() == absl::StatusCode::kDataLoss);
  CHECK(message_has(blamed, "bad frame"));
  CHECK_FALSE(message_has(blamed, "SIGKILL"));
  for (size_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    const absl::StatusOr<std::string>& outcome = outcomes.at(i);
    if (retries > 0) {
      REQUIRE_MESSAGE(outcome.ok(), outcome.status());
      CHECK(*outcome == absl::StrCat(jobs[i] * 10));
    } else if (!outcome.ok()) {
      // The bad bytes came before their results: those cannot be trusted, and the task did
      // nothing wrong. What the caller reads is why the worker went, not the pool's own kill.
      CHECK(outcome.status().code() == absl::StatusCode::kAborted);
      CHECK(message_has(outcome.status(), "stream broke"));
      CHECK_FALSE(message_has(outcome.status(), "SIGKILL"));
    }
  }
  // The pool carries on.
  auto next = testing::map_within(pool, std::vector<int64_t>{1, 2}, {}, absl::Seconds(60));
  REQUIRE_MESSAGE(next.ok(), next.status());
  CHECK(*next == std::vector<std::string>{"10", "20"});
}

}  // namespace
}  // namespace procpool
