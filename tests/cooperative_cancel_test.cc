// Cooperative cancellation (this_worker.h: this_task::stop_requested, stop_token;
// PoolOptions::cancel_grace; CallOptions::soft_timeout): a task asked to stop that returns keeps
// its worker, reports kCancelled or kDeadlineExceeded, and one that does not is killed when the
// grace ends. Real workers, forked and from the fork server; the same suite runs over TCP with
// remote workers, whose relay sets the flag (cooperative_cancel_tcp_test).

#include "procpool/this_worker.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <stop_token>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/procpool.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

constexpr int64_t kQuick = 0;
constexpr int64_t kCooperate = 1;  // runs until asked to stop
constexpr int64_t kIgnore = 2;     // runs 60 s, never looks
constexpr int64_t kCallback = 3;   // waits for its stop_token's callback, never polls the flag

std::string dir() {
  const char* value = std::getenv("PROCPOOL_TEST_DIR");
  return value != nullptr ? value : "/nonexistent";
}

void mark(const std::string& what) {
  testing::append_line(absl::StrCat(dir(), "/", what, ".", ::getpid()), "x");
}

bool wait_for_file(const std::string& prefix, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    for (const auto& entry : std::filesystem::directory_iterator(dir())) {
      if (absl::StartsWith(entry.path().filename().string(), prefix)) return true;
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
  return false;
}

struct Stoppable {
  int64_t run(int64_t mode) {
    if (mode == kQuick) return ::getpid();
    mark("started");
    if (mode == kCooperate) {
      const absl::Time cap = absl::Now() + absl::Seconds(60);
      while (!this_task::stop_requested() && absl::Now() < cap) absl::SleepFor(absl::Milliseconds(1));
      if (this_task::stop_requested()) mark("saw-stop");
    } else if (mode == kIgnore) {
      absl::SleepFor(absl::Seconds(60));
    } else if (mode == kCallback) {
      std::stop_callback on_stop(this_task::stop_token(), [] { mark("callback"); });
      wait_for_file("callback", absl::Seconds(60));
    }
    return ::getpid();
  }
};

// The same over the listed path (strings are not sent as words).
struct StoppableText {
  std::string run(const std::string& mode) {
    mark("started");
    const absl::Time cap = absl::Now() + absl::Seconds(60);
    while (!this_task::stop_requested() && absl::Now() < cap) absl::SleepFor(absl::Milliseconds(1));
    if (this_task::stop_requested()) mark("saw-stop");
    return mode;
  }
};

// Where workers leave their marks: a fresh directory, named to them by worker_env.
struct Marks {
  Marks() { ::setenv("PROCPOOL_TEST_DIR", temp.path().c_str(), 1); }
  ~Marks() { ::unsetenv("PROCPOOL_TEST_DIR"); }
  PoolOptions options(PoolOptions options, StartMethod method) const {
    options.start_method = method;
    options.worker_env = [path = temp.path()](int) {
      return std::vector<std::pair<std::string, std::string>>{{"PROCPOOL_TEST_DIR", path}};
    };
    if (!getenv("PROCPOOL_TEST_LOG")) options.log_sink = nullptr;
    return testing::on_link(std::move(options));
  }
  testing::TempDir temp;
};

const StartMethod kMethods[] = {StartMethod::kFork, StartMethod::kForkServer};

TEST_CASE("a cancelled task sees stop_requested(), reports kCancelled, and its worker lives") {
  for (const StartMethod method : kMethods) {
    CAPTURE(static_cast<int>(method));
    Marks marks;
    ProcessPool<Stoppable> pool(marks.options({.workers = 1, .cancel_grace = absl::Seconds(30)}, method));
    const absl::StatusOr<int64_t> before = pool.apply(kQuick);
    REQUIRE(before.ok());
    AsyncResult<int64_t> running = pool.apply_async(kCooperate);
    REQUIRE(wait_for_file("started", absl::Seconds(30)));
    CHECK(running.cancel());
    CHECK(running.get().status().code() == absl::StatusCode::kCancelled);
    CHECK(wait_for_file("saw-stop", absl::Seconds(30)));
    // The same worker runs the next task: it was not stopped.
    const absl::StatusOr<int64_t> after = pool.apply(kQuick);
    REQUIRE(after.ok());
    CHECK(*after == *before);
    CHECK(pool.close().ok());
    CHECK(pool.join().ok());
  }
}

TEST_CASE("a task past its soft_timeout is asked to stop, fails kDeadlineExceeded, its worker lives") {
  for (const StartMethod method : kMethods) {
    CAPTURE(static_cast<int>(method));
    Marks marks;
    ProcessPool<Stoppable> pool(marks.options({.workers = 1, .cancel_grace = absl::Seconds(30)}, method));
    const absl::StatusOr<int64_t> before = pool.apply(kQuick);
    REQUIRE(before.ok());
    const absl::Time start = absl::Now();
    const absl::StatusOr<int64_t> late =
        pool.apply(kCooperate, {.soft_timeout = absl::Milliseconds(200)});
    CHECK(absl::Now() - start >= absl::Milliseconds(190));
    CHECK(late.status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(absl::StrContains(late.status().message(), "soft_timeout"));
    CHECK(wait_for_file("saw-stop", absl::Seconds(1)));
    const absl::StatusOr<int64_t> after = pool.apply(kQuick);
    REQUIRE(after.ok());
    CHECK(*after == *before);

    {  // The listed path (byte-string jobs) too.
      ProcessPool<StoppableText> text(
          marks.options({.workers = 1, .cancel_grace = absl::Seconds(30)}, method));
      const absl::StatusOr<std::vector<std::string>> mapped = text.map(
          std::vector<std::string>{"a", "b"}, {.chunksize = 2, .soft_timeout = absl::Milliseconds(100)});
      CHECK(mapped.status().code() == absl::StatusCode::kDeadlineExceeded);
    }
  }
}

TEST_CASE("a task that ignores the request is killed when cancel_grace ends") {
  for (const StartMethod method : kMethods) {
    CAPTURE(static_cast<int>(method));
    Marks marks;
    ProcessPool<Stoppable> pool(
        marks.options({.workers = 1, .cancel_grace = absl::Milliseconds(300)}, method));
    const absl::StatusOr<int64_t> before = pool.apply(kQuick);
    REQUIRE(before.ok());
    const absl::Time start = absl::Now();
    const absl::StatusOr<int64_t> late =
        pool.apply(kIgnore, {.soft_timeout = absl::Milliseconds(100)});
    CHECK(late.status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(absl::Now() - start < absl::Seconds(30));  // not the task's 60 s
    const absl::StatusOr<int64_t> after = pool.apply(kQuick);
    REQUIRE(after.ok());
    CHECK(*after != *before);  // replaced
  }
}

TEST_CASE("with no cancel_grace a cancelled task's worker is stopped at once, as before") {
  // Cancelled as soon as it started: a remote worker's report that it runs has not reached the
  // pool yet (the pool stops it once one does).
  Marks marks;
  ProcessPool<Stoppable> pool(marks.options({.workers = 1}, StartMethod::kFork));
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const absl::StatusOr<int64_t> before = pool.apply(kQuick);
    REQUIRE(before.ok());
    std::filesystem::remove_all(dir());
    std::filesystem::create_directory(dir());
    AsyncResult<int64_t> running = pool.apply_async(kIgnore);
    REQUIRE(wait_for_file("started", absl::Seconds(30)));
    CHECK(running.cancel());
    // Not after the task's 60 s.
    AsyncResult<int64_t> after = pool.apply_async(kQuick);
    REQUIRE(after.wait(absl::Seconds(20)));
    REQUIRE(after.get().ok());
    CHECK(*after.get() != *before);
  }
}

TEST_CASE("stop_token()'s callbacks run when the task is asked to stop") {
  for (const StartMethod method : kMethods) {
    CAPTURE(static_cast<int>(method));
    Marks marks;
    ProcessPool<Stoppable> pool(marks.options({.workers = 1, .cancel_grace = absl::Seconds(30)}, method));
    const absl::StatusOr<int64_t> late =
        pool.apply(kCallback, {.soft_timeout = absl::Milliseconds(100)});
    CHECK(late.status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(wait_for_file("callback", absl::Seconds(1)));
  }
}

TEST_CASE("terminate() asks running tasks to stop and waits for them within cancel_grace") {
  for (const StartMethod method : kMethods) {
    CAPTURE(static_cast<int>(method));
    Marks marks;
    ProcessPool<Stoppable> pool(marks.options({.workers = 2, .cancel_grace = absl::Seconds(30)}, method));
    AsyncResult<std::vector<int64_t>> running =
        pool.map_async(std::vector<int64_t>{kCooperate, kCooperate}, {.chunksize = 1});
    REQUIRE(testing::wait_until(
        [&] {
          int started = 0;
          for (const auto& entry : std::filesystem::directory_iterator(dir())) {
            started += absl::StartsWith(entry.path().filename().string(), "started") ? 1 : 0;
          }
          return started == 2;
        },
        absl::Seconds(30)));
    const absl::Time start = absl::Now();
    pool.terminate();
    CHECK(absl::Now() - start < absl::Seconds(20));
    CHECK(running.get().status().code() == absl::StatusCode::kCancelled);
    int saw = 0;
    for (const auto& entry : std::filesystem::directory_iterator(dir())) {
      saw += absl::StartsWith(entry.path().filename().string(), "saw-stop") ? 1 : 0;
    }
    CHECK(saw == 2);
  }
}

TEST_CASE("leaving an imap loop asks its running tasks to stop") {
  Marks marks;
  ProcessPool<Stoppable> pool(marks.options({.workers = 2}, StartMethod::kFork));
  {
    auto results = pool.imap(std::vector<int64_t>{kQuick, kCooperate, kCooperate, kCooperate},
                             {.chunksize = 1});
    for (const absl::StatusOr<int64_t>& result : results) {
      CHECK(result.ok());
      REQUIRE(wait_for_file("started", absl::Seconds(30)));
      break;
    }
  }
  CHECK(wait_for_file("saw-stop", absl::Seconds(30)));
}

}  // namespace
}  // namespace procpool
