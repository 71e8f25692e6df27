// AsyncResult beyond get(): cancel(), add_done_callback(), done() and successful(); the free
// functions wait() and as_completed(); and join(timeout). Real pools throughout. Tasks are held
// at gates (files the test creates) so that every ordering is decided by the test, not by timing.

#include "procpool/async_result.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <mutex>
#include <memory>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "procpool/procpool.h"
#include "procpool/wait.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return options;
}

// Where gated tasks meet the test: task `job` appends "<job> <pid>" to `started`, waits until
// the file gate-<job> exists (at most 60 s), appends "<job>" to `finished` and returns job.
// A negative job fails at once with kInvalidArgument, without a gate.
class Gates {
 public:
  const std::string& dir() const { return dir_.path(); }
  void open(int64_t job) const { testing::append_line(dir_.file(absl::StrCat("gate-", job)), ""); }

  // Jobs that started, and the pid each ran in.
  std::vector<std::pair<int64_t, pid_t>> started() const {
    std::vector<std::pair<int64_t, pid_t>> jobs;
    for (const std::string& line : testing::read_lines(dir_.file("started"))) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      int64_t job = 0;
      int pid = 0;
      if (parts.size() == 2 && absl::SimpleAtoi(parts[0], &job) && absl::SimpleAtoi(parts[1], &pid)) {
        jobs.emplace_back(job, pid);
      }
    }
    return jobs;
  }
  size_t finished_count() const { return testing::read_lines(dir_.file("finished")).size(); }

  // Waits (10 s at most) until job `job` has started; returns the pid it runs in, or 0.
  pid_t wait_started(int64_t job) const {
    pid_t pid = 0;
    testing::wait_until([&] {
      for (const auto& [started_job, started_pid] : started()) {
        if (started_job == job) pid = started_pid;
      }
      return pid != 0;
    });
    return pid;
  }

 private:
  testing::TempDir dir_;
};

struct GatedWorker {
  explicit GatedWorker(std::string dir) : dir_(std::move(dir)) {}
  absl::StatusOr<int64_t> run(int64_t job) {
    if (job < 0) return absl::InvalidArgumentError(absl::StrCat("job ", job, " fails"));
    testing::append_line(dir_ + "/started", absl::StrCat(job, " ", getpid()));
    const std::string gate = absl::StrCat(dir_, "/gate-", job);
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (!testing::file_exists(gate) && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    testing::append_line(dir_ + "/finished", absl::StrCat(job));
    return job;
  }
  std::string dir_;
};

// As GatedWorker, but its tasks return a string.
struct GatedNamer {
  explicit GatedNamer(std::string dir) : gated_(std::move(dir)) {}
  absl::StatusOr<std::string> run(int64_t job) {
    absl::StatusOr<int64_t> done = gated_.run(job);
    if (!done.ok()) return done.status();
    return absl::StrCat("#", *done);
  }
  GatedWorker gated_;
};

using GatedPool = ProcessPool<GatedWorker>;

GatedPool make_pool(const Gates& gates, int workers, PoolOptions options = {}) {
  options.workers = workers;
  return GatedPool(quiet(std::move(options)), [dir = gates.dir()] { return GatedWorker(dir); });
}

// ---- cancel ----

TEST_CASE("cancel before a task starts: it never runs and its result is kCancelled") {
  Gates gates;
  GatedPool pool = make_pool(gates, 1);
  AsyncResult<int64_t> busy = pool.apply_async(1);
  REQUIRE(gates.wait_started(1) != 0);
  AsyncResult<int64_t> queued = pool.apply_async(2);
  CHECK_FALSE(queued.done());

  CHECK(queued.cancel());
  CHECK(queued.done());
  CHECK_FALSE(queued.successful());
  CHECK(queued.get().status().code() == absl::StatusCode::kCancelled);
  CHECK_FALSE(queued.cancel());  // already done

  gates.open(1);
  gates.open(2);
  CHECK(*busy.get() == 1);
  gates.open(0);
  CHECK(*pool.apply(0) == 0);  // runs after job 2 would have
  for (const auto& [job, pid] : gates.started()) CHECK(job != 2);
  CHECK(pool.stats().workers_restarted == 0);  // nothing was running: nobody was stopped
}

TEST_CASE("cancel of a running task stops its worker, which the pool replaces") {
  Gates gates;
  GatedPool pool = make_pool(gates, 1, {.kill_grace = absl::Milliseconds(200)});
  AsyncResult<int64_t> running = pool.apply_async(1);  // its gate never opens
  const pid_t pid = gates.wait_started(1);
  REQUIRE(pid != 0);

  CHECK(running.cancel());
  absl::StatusOr<int64_t> outcome = running.get(absl::Seconds(10));
  CHECK(outcome.status().code() == absl::StatusCode::kCancelled);
  CHECK(testing::wait_until([&] { return pool.stats().workers_restarted == 1; }));
  gates.open(2);
  CHECK(*pool.apply(2) == 2);  // on the replacement
  CHECK(gates.wait_started(2) != pid);
  CHECK(gates.finished_count() == 1);  // job 1 never finished
}

TEST_CASE("cancel after the result is in returns false and changes nothing") {
  Gates gates;
  GatedPool pool = make_pool(gates, 1);
  gates.open(4);
  AsyncResult<int64_t> done = pool.apply_async(4);
  CHECK(*done.get() == 4);
  CHECK_FALSE(done.cancel());
  CHECK(*done.get() == 4);
  CHECK(done.successful());
  AsyncResult<int64_t> failed = pool.apply_async(-1);
  CHECK(failed.get().status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_FALSE(failed.cancel());
  CHECK(failed.get().status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("cancelling a map_async cancels every unfinished task and leaves other calls alone") {
  Gates gates;
  GatedPool pool = make_pool(gates, 2, {.kill_grace = absl::Milliseconds(200)});
  // Both workers ready, so that jobs 1 and 2 go one to each and the rest wait in the pool's queue.
  REQUIRE(testing::wait_until([&] { return testing::all_idle(pool.stats()); }));
  std::vector<int64_t> jobs = {1, 2, 3, 4, 5, 6, 7};
  AsyncResult<std::vector<int64_t>> batch = pool.map_async(jobs, {.chunksize = 1});
  REQUIRE(gates.wait_started(1) != 0);
  REQUIRE(gates.wait_started(2) != 0);
  gates.open(100);
  AsyncResult<int64_t> other = pool.apply_async(100);  // queued behind the map's tasks

  CHECK(batch.cancel());
  CHECK(batch.get().status().code() == absl::StatusCode::kCancelled);
  CHECK(*other.get(absl::Seconds(10)) == 100);
  CHECK(testing::wait_until([&] { return pool.stats().workers_restarted == 2; }));
  for (int64_t job = 3; job <= 7; ++job) gates.open(job);
  gates.open(8);
  CHECK(*pool.apply(8) == 8);
  std::vector<int64_t> ran;
  for (const auto& [job, pid] : gates.started()) ran.push_back(job);
  std::sort(ran.begin(), ran.end());
  CHECK(ran == std::vector<int64_t>{1, 2, 8, 100});
}

TEST_CASE("a cancelled result's callbacks run once, with kCancelled") {
  Gates gates;
  GatedPool pool = make_pool(gates, 1);
  std::atomic<int> errors{0};
  std::atomic<int> done_calls{0};
  absl::Status seen;
  std::mutex mu;
  AsyncResult<int64_t> running = pool.apply_async(1, {}, {.on_error = [&](const absl::Status& s) {
                                                      std::lock_guard lock(mu);
                                                      seen = s;
                                                      errors.fetch_add(1);
                                                    }});
  running.add_done_callback([&](const absl::StatusOr<int64_t>&) { done_calls.fetch_add(1); });
  REQUIRE(gates.wait_started(1) != 0);
  CHECK(running.cancel());
  REQUIRE(testing::wait_until([&] { return errors.load() == 1 && done_calls.load() == 1; }));
  std::lock_guard lock(mu);
  CHECK(seen.code() == absl::StatusCode::kCancelled);
}

// ---- callbacks, done, successful ----

TEST_CASE("done callbacks run once each, after the submission callbacks, in the order added") {
  Gates gates;
  GatedPool pool = make_pool(gates, 1);
  std::mutex mu;
  std::vector<std::string> order;
  std::vector<std::thread::id> threads;
  auto record = [&](std::string what) {
    std::lock_guard lock(mu);
    order.push_back(std::move(what));
    threads.push_back(std::this_thread::get_id());
  };
  AsyncResult<int64_t> result = pool.apply_async(
      5, {}, {.on_success = [&](const int64_t& v) { record(absl::StrCat("submission ", v)); }});
  result.add_done_callback([&](const absl::StatusOr<int64_t>& r) { record(absl::StrCat("first ", *r)); });
  result.add_done_callback([&](const absl::StatusOr<int64_t>& r) { record(absl::StrCat("second ", *r)); });
  CHECK_FALSE(result.done());
  gates.open(5);
  CHECK(*result.get() == 5);
  REQUIRE(testing::wait_until([&] {
    std::lock_guard lock(mu);
    return order.size() == 3;
  }));
  // Added once the result is in: posted at once, after the others.
  result.add_done_callback([&](const absl::StatusOr<int64_t>& r) { record(absl::StrCat("late ", *r)); });
  REQUIRE(testing::wait_until([&] {
    std::lock_guard lock(mu);
    return order.size() == 4;
  }));
  // Nothing runs twice: a later result's callback runs after everything above.
  std::atomic<bool> flushed{false};
  gates.open(6);
  AsyncResult<int64_t> later = pool.apply_async(6);
  later.add_done_callback([&](const absl::StatusOr<int64_t>&) { flushed = true; });
  REQUIRE(testing::wait_until([&] { return flushed.load(); }));

  std::lock_guard lock(mu);
  CHECK(order == std::vector<std::string>{"submission 5", "first 5", "second 5", "late 5"});
  for (const std::thread::id& id : threads) {
    CHECK(id != std::this_thread::get_id());
    CHECK(id == threads.front());  // the one callback thread
  }
}

struct Echo {
  int64_t run(int64_t x) { return x; }
};

// The calls of callbacks, in order, from any thread.
class CallbackLog {
 public:
  void record(std::string what) {
    std::lock_guard lock(mu_);
    order_.push_back(std::move(what));
  }
  // Waits (20 s at most) for `count` calls; returns them in order.
  std::vector<std::string> wait_for(size_t count) {
    testing::wait_until([&] {
      std::lock_guard lock(mu_);
      return order_.size() >= count;
    }, absl::Seconds(20));
    std::lock_guard lock(mu_);
    return order_;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> order_;
};

TEST_CASE("a done callback added the moment get() returns runs after the submission callback") {
  // The result is published and its callbacks queued in one step: get() cannot return between
  // the two. The window was narrow: many rounds.
  ProcessPool<Echo> pool(quiet({.workers = 2}));
  int misordered = 0;
  for (int64_t round = 0; round < 200; ++round) {
    CallbackLog log;
    AsyncResult<int64_t> result =
        pool.apply_async(round, {}, {.on_success = [&log](const int64_t&) { log.record("submission"); }});
    REQUIRE(*result.get() == round);
    result.add_done_callback([&log](const absl::StatusOr<int64_t>&) { log.record("done"); });
    const std::vector<std::string> order = log.wait_for(2);
    REQUIRE(order.size() == 2);
    if (order != std::vector<std::string>{"submission", "done"}) ++misordered;
  }
  CHECK(misordered == 0);
}

TEST_CASE("a done callback added by a callback runs after those added before it") {
  Gates gates;
  GatedPool pool = make_pool(gates, 1);
  for (int64_t round = 0; round < 20; ++round) {
    CAPTURE(round);
    CallbackLog log;
    std::optional<AsyncResult<int64_t>> result;
    result.emplace(pool.apply_async(round, {}, {.on_success = [&log, &result](const int64_t&) {
                                      log.record("submission");
                                      result->add_done_callback([&log](const absl::StatusOr<int64_t>&) {
                                        log.record("added by the submission callback");
                                      });
                                    }}));
    result->add_done_callback([&log](const absl::StatusOr<int64_t>&) { log.record("added first"); });
    gates.open(round);
    CHECK(log.wait_for(3) == std::vector<std::string>{"submission", "added first",
                                                      "added by the submission callback"});
  }
}

TEST_CASE("a done callback may block on the pool without deadlocking it") {
  Gates gates;
  GatedPool pool = make_pool(gates, 1);
  gates.open(1);
  gates.open(2);
  std::atomic<int64_t> nested{-1};
  AsyncResult<int64_t> first = pool.apply_async(1);
  first.add_done_callback([&](const absl::StatusOr<int64_t>& r) { nested = *pool.apply(*r + 1); });
  REQUIRE(testing::wait_until([&] { return nested.load() == 2; }));
}

TEST_CASE("done and successful say whether the result is in, and whether it is OK") {
  Gates gates;
  GatedPool pool = make_pool(gates, 2);
  AsyncResult<int64_t> pending = pool.apply_async(1);
  CHECK_FALSE(pending.done());
  CHECK_FALSE(pending.successful());
  gates.open(1);
  pending.wait();
  CHECK(pending.done());
  CHECK(pending.successful());
  AsyncResult<int64_t> failed = pool.apply_async(-3);
  failed.wait();
  CHECK(failed.done());
  CHECK_FALSE(failed.successful());
}

TEST_CASE("a done callback added after the pool is gone runs at once on the calling thread") {
  Gates gates;
  gates.open(1);
  std::optional<AsyncResult<int64_t>> kept;
  {
    GatedPool pool = make_pool(gates, 1);
    kept.emplace(pool.apply_async(1));
    CHECK(*kept->get() == 1);
  }
  std::thread::id ran_on;
  kept->add_done_callback([&](const absl::StatusOr<int64_t>& r) {
    CHECK(*r == 1);
    ran_on = std::this_thread::get_id();
  });
  CHECK(ran_on == std::this_thread::get_id());
  CHECK_FALSE(kept->cancel());
}

// Runs `body` with this process's stderr going to a file; returns what was written there.
std::string captured_stderr(const std::function<void()>& body) {
  testing::TempDir dir;
  const std::string path = dir.file("stderr");
  std::fflush(stderr);
  const int saved = ::dup(STDERR_FILENO);
  const int file = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  REQUIRE(saved >= 0);
  REQUIRE(file >= 0);
  ::dup2(file, STDERR_FILENO);
  ::close(file);
  body();
  std::fflush(stderr);
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  std::string text;
  for (const std::string& line : testing::read_lines(path)) absl::StrAppend(&text, line, "\n");
  return text;
}

TEST_CASE("a done callback that throws after the pool is gone is reported, not thrown; others run") {
  // CPython's test_done_callback_raises_already_succeeded, for a result whose pool is gone.
  std::optional<AsyncResult<int64_t>> kept;
  {
    ProcessPool<Echo> pool(quiet({.workers = 1}));
    kept.emplace(pool.apply_async(3));
    REQUIRE(*kept->get() == 3);
  }
  int ran = 0;
  const std::string reported = captured_stderr([&] {
    CHECK_NOTHROW(kept->add_done_callback([&ran](const absl::StatusOr<int64_t>&) {
      ++ran;
      throw std::runtime_error("raised by a done callback");
    }));
    CHECK_NOTHROW(kept->add_done_callback([&ran](const absl::StatusOr<int64_t>& r) {
      if (r.ok() && *r == 3) ++ran;
    }));
  });
  CHECK(ran == 2);
  CHECK(absl::StrContains(reported, "raised by a done callback"));
}

// A pool held by shared_ptr, as callbacks that go on using it keep it: `destroyed` is set once
// the pool has been destroyed entirely (its members go in reverse order).
struct SharedPool {
  struct Mark {
    std::atomic<bool>* destroyed;
    ~Mark() { *destroyed = true; }
  };
  explicit SharedPool(std::atomic<bool>* destroyed, const Gates& gates)
      : mark{destroyed}, pool(make_pool(gates, 1)) {}
  Mark mark;
  GatedPool pool;
};

TEST_CASE("a callback may hold the last reference to its pool: the pool is destroyed there") {
  Gates gates;
  gates.open(1);
  std::atomic<bool> destroyed{false};
  std::atomic<bool> released{false};
  auto shared = std::make_shared<SharedPool>(&destroyed, gates);
  SUBCASE("released when the callback is destroyed, after it ran") {
    shared->pool.apply_async(1, {}, {.on_success = [shared, &released](const int64_t&) {
      testing::wait_until([&] { return released.load(); });  // until the test let go of it
    }});
  }
  SUBCASE("released by the callback itself, as it runs") {
    AsyncResult<int64_t> result = shared->pool.apply_async(1);
    result.add_done_callback([held = shared, &released](const absl::StatusOr<int64_t>&) mutable {
      testing::wait_until([&] { return released.load(); });
      held.reset();
    });
  }
  SUBCASE("released by a map's progress callback, after the map completed") {
    shared->pool.map_async(std::vector<int64_t>{1, 1},
                           {.progress = [shared](size_t, size_t) {}});
  }
  SUBCASE("released by a callback that throws once it let go of it") {
    AsyncResult<int64_t> result = shared->pool.apply_async(1);
    result.add_done_callback([held = shared, &released](const absl::StatusOr<int64_t>&) mutable {
      testing::wait_until([&] { return released.load(); });
      held.reset();
      throw std::runtime_error("thrown after the pool was destroyed");
    });
  }
  shared.reset();
  released = true;
  CHECK(testing::wait_until([&] { return destroyed.load(); }, absl::Seconds(20)));
}

TEST_CASE("a callback that destroys its pool: callbacks queued behind it still run, once") {
  Gates gates;
  gates.open(1);
  std::atomic<bool> destroyed{false};
  std::atomic<int> later_ran{0};
  auto shared = std::make_shared<SharedPool>(&destroyed, gates);
  std::vector<AsyncResult<int64_t>> results;
  for (int i = 0; i < 4; ++i) results.push_back(shared->pool.apply_async(1));
  // Every result is in before the first callback is added: they all run in the order added.
  for (auto& result : results) REQUIRE(result.wait(absl::Seconds(20)));
  std::atomic<bool> go{false};
  results[0].add_done_callback([held = shared, &go](const absl::StatusOr<int64_t>&) mutable {
    testing::wait_until([&] { return go.load(); });
    held.reset();  // the last reference: close, join, and the queued callbacks run here
  });
  for (size_t i = 1; i < results.size(); ++i) {
    results[i].add_done_callback([&later_ran](const absl::StatusOr<int64_t>& r) {
      if (r.ok()) ++later_ran;
    });
  }
  shared.reset();
  go = true;
  CHECK(testing::wait_until([&] { return destroyed.load(); }, absl::Seconds(20)));
  CHECK(testing::wait_until([&] { return later_ran.load() == 3; }, absl::Seconds(5)));
  absl::SleepFor(absl::Milliseconds(50));
  CHECK(later_ran.load() == 3);
}

// ---- wait ----

TEST_CASE("wait(kFirstCompleted) returns as soon as one result is in") {
  Gates gates;
  GatedPool pool = make_pool(gates, 2);
  std::vector<AsyncResult<int64_t>> results = {pool.apply_async(1), pool.apply_async(2)};
  REQUIRE(gates.wait_started(1) != 0);
  REQUIRE(gates.wait_started(2) != 0);
  gates.open(2);
  WaitResult first = procpool::wait(results, WaitFor::kFirstCompleted);
  CHECK(first.done == std::vector<size_t>{1});
  CHECK(first.not_done == std::vector<size_t>{0});
  CHECK_FALSE(first.all_done());
  gates.open(1);
  WaitResult all = procpool::wait(results);  // kAllCompleted
  CHECK(all.done == std::vector<size_t>{0, 1});
  CHECK(all.all_done());
}

TEST_CASE("wait(kFirstException) returns at the first failure, or when all are in") {
  Gates gates;
  GatedPool pool = make_pool(gates, 2);
  gates.open(1);
  std::vector<AsyncResult<int64_t>> results = {pool.apply_async(1), pool.apply_async(2),
                                               pool.apply_async(-1)};
  WaitResult failed = procpool::wait(results, WaitFor::kFirstException);
  CHECK(failed.not_done == std::vector<size_t>{1});  // job 2 is held at its gate
  CHECK(std::find(failed.done.begin(), failed.done.end(), 2) != failed.done.end());

  gates.open(2);
  std::vector<AsyncResult<int64_t>> fine = {pool.apply_async(1), pool.apply_async(2)};
  WaitResult all = procpool::wait(fine, WaitFor::kFirstException);
  CHECK(all.all_done());
}

TEST_CASE("wait gives up after its timeout and reports what is not done, cancelling nothing") {
  Gates gates;
  GatedPool pool = make_pool(gates, 2);
  gates.open(1);
  std::vector<AsyncResult<int64_t>> results = {pool.apply_async(1), pool.apply_async(2)};
  // Job 1 is in first: on a loaded machine it may take longer than the wait's 100 ms.
  REQUIRE(results[0].wait(absl::Seconds(30)));
  const absl::Time start = absl::Now();
  WaitResult partial = procpool::wait(results, WaitFor::kAllCompleted, absl::Milliseconds(100));
  const absl::Duration took = absl::Now() - start;
  CHECK(took >= absl::Milliseconds(100));
  CHECK(took < absl::Seconds(5));
  CHECK(partial.done == std::vector<size_t>{0});
  CHECK(partial.not_done == std::vector<size_t>{1});
  gates.open(2);
  CHECK(*results[1].get() == 2);  // still running, not cancelled
  CHECK(procpool::wait(std::vector<AsyncResult<int64_t>>{}).all_done());  // nothing to wait for
}

TEST_CASE("a timeout of centuries is waited out like no timeout, never cut short") {
  // std::chrono adds a wait's duration to the clock's now(): a duration near its range overflows
  // into the past, and the wait would give up at once.
  const absl::Duration centuries = absl::Hours(24 * 365 * 1000);
  Gates gates;
  GatedPool pool = make_pool(gates, 1);
  AsyncResult<int64_t> result = pool.apply_async(1);
  REQUIRE(gates.wait_started(1) != 0);
  std::thread opener([&] {
    absl::SleepFor(absl::Milliseconds(300));
    gates.open(1);
  });
  const absl::Time start = absl::Now();
  absl::StatusOr<int64_t> got = result.get(centuries);
  CHECK(absl::Now() - start >= absl::Milliseconds(200));
  opener.join();
  REQUIRE(got.ok());
  CHECK(*got == 1);
  CHECK(result.wait(centuries));

  AsyncResult<int64_t> second = pool.apply_async(2);
  REQUIRE(gates.wait_started(2) != 0);
  std::thread second_opener([&] {
    absl::SleepFor(absl::Milliseconds(300));
    gates.open(2);
  });
  WaitResult all = procpool::wait(std::vector<AsyncResult<int64_t>>{second},
                                  WaitFor::kAllCompleted, centuries);
  second_opener.join();
  CHECK(all.all_done());
  CHECK(*second.get() == 2);
}

TEST_CASE("wait and as_completed take results of different types and pools together") {
  Gates gates;
  GatedPool numbers = make_pool(gates, 1);
  ProcessPool<GatedNamer> names(quiet({.workers = 1}), [dir = gates.dir()] { return GatedNamer(dir); });
  AsyncResult<int64_t> number = numbers.apply_async(1);
  AsyncResult<std::string> name = names.apply_async(2);
  AsyncResult<std::vector<int64_t>> batch = numbers.map_async(std::vector<int64_t>{-1});
  REQUIRE(gates.wait_started(1) != 0);
  REQUIRE(gates.wait_started(2) != 0);
  gates.open(2);
  WaitResult first = procpool::wait({number, name}, WaitFor::kFirstCompleted);
  CHECK(first.done == std::vector<size_t>{1});
  std::vector<size_t> order;
  for (absl::StatusOr<size_t> i : procpool::as_completed({number, name, batch})) {
    REQUIRE(i.ok());
    order.push_back(*i);
    // Only now may `number` finish: opened before as_completed was called, it could be in by
    // then too, and results already in come in index order.
    if (order.size() == 1) gates.open(1);
  }
  CHECK(order.size() == 3);
  CHECK(order[0] == 1);  // already in when as_completed was called
  CHECK(*name.get() == "#2");
  CHECK(batch.get().status().code() == absl::StatusCode::kInvalidArgument);
}

// ---- as_completed ----

TEST_CASE("as_completed yields indices in completion order, those already in first") {
  Gates gates;
  GatedPool pool = make_pool(gates, 3);
  gates.open(9);
  AsyncResult<int64_t> already = pool.apply_async(9);
  already.wait();
  std::vector<AsyncResult<int64_t>> results = {pool.apply_async(0), pool.apply_async(1),
                                               pool.apply_async(2), already};
  for (int64_t job : {0, 1, 2}) REQUIRE(gates.wait_started(job) != 0);
  AsCompleted completed = procpool::as_completed(results);
  static_assert(std::ranges::input_range<AsCompleted>);
  static_assert(std::ranges::view<AsCompleted>);
  auto it = completed.begin();
  REQUIRE(it != completed.end());
  CHECK(**it == 3);
  for (int64_t job : {2, 0, 1}) {
    gates.open(job);  // each completes only when the test says so
    ++it;
    REQUIRE(it != completed.end());
    REQUIRE(it->ok());
    CHECK(**it == static_cast<size_t>(job));
    CHECK(results[**it].done());
  }
  ++it;
  CHECK(it == completed.end());
  CHECK(completed.remaining() == 0);
}

TEST_CASE("as_completed ends with kDeadlineExceeded when its timeout passes") {
  Gates gates;
  GatedPool pool = make_pool(gates, 2);
  gates.open(1);
  std::vector<AsyncResult<int64_t>> results = {pool.apply_async(1), pool.apply_async(2)};
  results[0].wait();
  std::vector<absl::StatusOr<size_t>> seen;
  const absl::Time start = absl::Now();
  for (absl::StatusOr<size_t> i : procpool::as_completed(results, absl::Milliseconds(100))) {
    seen.push_back(i);
  }
  CHECK(absl::Now() - start < absl::Seconds(5));
  REQUIRE(seen.size() == 2);
  CHECK(*seen[0] == 0);
  CHECK(seen[1].status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(std::string(seen[1].status().message()).find("1 of 2") != std::string::npos);
  gates.open(2);
  CHECK(*results[1].get() == 2);  // not cancelled
}

#if PROCPOOL_TEST_STD_VIEWS
TEST_CASE("as_completed composes with views and stops early") {
  Gates gates;
  GatedPool pool = make_pool(gates, 2);
  gates.open(1);
  std::vector<AsyncResult<int64_t>> results = {pool.apply_async(1), pool.apply_async(2)};
  std::vector<size_t> first;
  for (absl::StatusOr<size_t> i : procpool::as_completed(results) | std::views::take(1)) {
    first.push_back(*i);
  }
  CHECK(first == std::vector<size_t>{0});  // did not wait for the held job
  gates.open(2);
}
#endif

// ---- join(timeout) ----

// Records exit() so a test can see that a worker left cleanly.
struct ExitRecorder {
  explicit ExitRecorder(std::string dir) : gated_(std::move(dir)) {}
  absl::StatusOr<int64_t> run(int64_t job) { return gated_.run(job); }
  void exit() { testing::append_line(gated_.dir_ + "/exited", absl::StrCat(getpid())); }
  GatedWorker gated_;
};

TEST_CASE("join(timeout) gives up with kDeadlineExceeded, stops nobody, and a later join ends cleanly") {
  Gates gates;
  ProcessPool<ExitRecorder> pool(quiet({.workers = 1, .join_timeout = absl::Milliseconds(50)}),
                                 [dir = gates.dir()] { return ExitRecorder(dir); });
  CHECK(pool.join(absl::Milliseconds(10)).code() == absl::StatusCode::kFailedPrecondition);
  AsyncResult<int64_t> running = pool.apply_async(1);
  const pid_t pid = gates.wait_started(1);
  REQUIRE(pid != 0);
  REQUIRE(pool.close().ok());

  // Longer than join_timeout: join(timeout) does not start that clock.
  absl::Status early = pool.join(absl::Milliseconds(200));
  CHECK(early.code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(std::string(early.message()).find("none was stopped") != std::string::npos);
  CHECK(testing::process_exists(pid));
  CHECK_FALSE(running.done());
  CHECK(pool.join(absl::ZeroDuration()).code() == absl::StatusCode::kDeadlineExceeded);

  gates.open(1);
  CHECK(*running.get() == 1);
  CHECK(pool.join(absl::Seconds(30)).ok());
  CHECK(pool.join().ok());
  CHECK(testing::read_lines(gates.dir() + "/exited").size() == 1);
}

TEST_CASE("Pool has join(timeout) too") {
  Pool pool(quiet({.workers = 1}));
  CHECK(*pool.apply(+[](const int64_t& x) { return x + 1; }, 1) == 2);
  REQUIRE(pool.close().ok());
  CHECK(pool.join(absl::Seconds(30)).ok());
}

}  // namespace
}  // namespace procpool
