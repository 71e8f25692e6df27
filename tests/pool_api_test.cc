// The Pool surface beyond map: imap, imap_unordered, apply, apply_async, map_async, starmap, the
// plain-function Pool, worker recycling, concurrent callers, progress, stats and logging.

#include "procpool/procpool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <new>
#include <mutex>
#include <ranges>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return testing::on_link(std::move(options));
}

struct Squarer {
  int64_t run(int64_t x) {
    if (x < 0) throw std::invalid_argument("negative");
    return x * x;
  }
};

// Sleeps `job` milliseconds, returns the job.
struct Sleeper {
  int64_t run(int64_t milliseconds) {
    absl::SleepFor(absl::Milliseconds(milliseconds));
    return milliseconds;
  }
};

TEST_CASE("imap yields results in input order, over a container") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 200; ++i) jobs.push_back(i);
  SUBCASE("chunksize 1") {
    int64_t expected = 0;
    for (absl::StatusOr<int64_t> square : pool.imap(jobs)) {
      REQUIRE(square.ok());
      CHECK(*square == expected * expected);
      ++expected;
    }
    CHECK(expected == 200);
  }
  SUBCASE("chunksize 7, an rvalue input, and a failing job in the middle") {
    std::vector<int64_t> with_error = jobs;
    with_error[50] = -1;
    int64_t index = 0;
    for (const absl::StatusOr<int64_t>& square : pool.imap(std::move(with_error), {.chunksize = 7})) {
      if (index == 50) {
        CHECK(square.status().code() == absl::StatusCode::kUnknown);
      } else {
        REQUIRE(square.ok());
        CHECK(*square == index * index);
      }
      ++index;
    }
    CHECK(index == 200);
  }
}

#if PROCPOOL_TEST_STD_VIEWS
TEST_CASE("imap over an endless lazy input keeps a bounded number in flight and can stop early") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  std::atomic<int64_t> produced{0};
  auto endless = std::views::iota(int64_t{0}) | std::views::transform([&produced](int64_t i) {
                   produced.fetch_add(1);
                   return i;
                 });
  constexpr size_t kMaxInFlight = 8;
  auto results = pool.imap(endless, {.max_in_flight = kMaxInFlight});
  int64_t consumed = 0;
  for (absl::StatusOr<int64_t> square : results) {
    REQUIRE(square.ok());
    CHECK(*square == consumed * consumed);
    ++consumed;
    // The input is pulled only as results are consumed: never more than max_in_flight ahead.
    CHECK(produced.load() <= consumed + static_cast<int64_t>(kMaxInFlight));
    CHECK(results.in_flight() <= kMaxInFlight);
    if (consumed == 1000) break;
  }
  CHECK(consumed == 1000);
  // Leaving the loop cancelled what had not started; the pool is still usable.
  std::vector<int64_t> jobs = {1, 2, 3};
  CHECK(*pool.map(jobs) == std::vector<int64_t>{1, 4, 9});
}

TEST_CASE("the first imap result arrives while the input is still being produced") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  std::atomic<int64_t> produced{0};
  auto input = std::views::iota(int64_t{0}, int64_t{100000}) |
               std::views::transform([&produced](int64_t i) {
                 produced.fetch_add(1);
                 return i;
               });
  for (absl::StatusOr<int64_t> first : pool.imap(input)) {
    REQUIRE(first.ok());
    CHECK(produced.load() < 100);
    break;
  }
}
#endif

TEST_CASE("imap_unordered yields every result once, as they complete") {
  ProcessPool<Sleeper> pool(quiet({.workers = 2}));
  std::vector<int64_t> jobs = {300, 1, 1, 1, 1, 1};
  std::vector<int64_t> order;
  for (absl::StatusOr<int64_t> done : pool.imap_unordered(jobs)) {
    REQUIRE(done.ok());
    order.push_back(*done);
  }
  CHECK(std::multiset<int64_t>(order.begin(), order.end()) ==
        std::multiset<int64_t>(jobs.begin(), jobs.end()));
  CHECK(order.back() == 300);  // the slow job finishes last, not first
}

TEST_CASE("imap_unordered flows past a straggler that holds its block; imap waits for it in order") {
  // One slow task, then many quick ones, with a small max_in_flight: the straggler keeps its
  // chunk's slots (imap_call.h) while the rest are reused again and again.
  std::vector<int64_t> jobs(400, 0);
  jobs[0] = 400;
  for (size_t chunksize : {size_t{1}, size_t{3}}) {
    CAPTURE(chunksize);
    ProcessPool<Sleeper> pool(quiet({.workers = 2}));
    SUBCASE("unordered: every quick result before the slow one") {
      std::vector<int64_t> order;
      for (absl::StatusOr<int64_t> done :
           pool.imap_unordered(jobs, {.chunksize = chunksize, .max_in_flight = 8})) {
        REQUIRE(done.ok());
        order.push_back(*done);
      }
      REQUIRE(order.size() == jobs.size());
      CHECK(order.back() == 400);
      CHECK(std::count(order.begin(), order.end(), 0) == 399);
    }
    SUBCASE("ordered: input order, whatever finished first") {
      size_t i = 0;
      auto results = pool.imap(jobs, {.chunksize = chunksize, .max_in_flight = 8});
      for (absl::StatusOr<int64_t> done : results) {
        REQUIRE(done.ok());
        CHECK(*done == jobs[i]);
        CHECK(results.in_flight() <= 8);
        ++i;
      }
      CHECK(i == jobs.size());
    }
  }
}

TEST_CASE("imap delivers each task's own error among values, for scalars and other types") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 3000; ++i) jobs.push_back(i % 7 == 3 ? -i : i);
  for (bool ordered : {true, false}) {
    CAPTURE(ordered);
    std::set<int64_t> ok_seen;
    size_t errors = 0;
    auto check = [&](const absl::StatusOr<int64_t>& r) {
      if (r.ok()) {
        ok_seen.insert(*r);
      } else {
        CHECK(r.status().code() == absl::StatusCode::kUnknown);
        CHECK(absl::StrContains(r.status().message(), "negative"));
        ++errors;
      }
    };
    if (ordered) {
      size_t i = 0;
      for (absl::StatusOr<int64_t> r : pool.imap(jobs, {.chunksize = 50})) {
        CHECK(r.ok() == (jobs[i] >= 0 || jobs[i] == 0));
        check(r);
        ++i;
      }
    } else {
      for (absl::StatusOr<int64_t> r : pool.imap_unordered(jobs, {.chunksize = 50})) check(r);
    }
    CHECK(errors == static_cast<size_t>(std::count_if(jobs.begin(), jobs.end(),
                                                       [](int64_t j) { return j < 0; })));
    CHECK(ok_seen.size() + errors == jobs.size());
  }
  // Strings go the listed way (not as words): the same storage, another path.
  struct Shout {
    std::string run(const std::string& s) {
      if (s.empty()) throw std::invalid_argument("empty");
      return s + "!";
    }
  };
  ProcessPool<Shout> shout(quiet({.workers = 2}));
  std::vector<std::string> words = {"a", "", "b", "c", "", "d"};
  std::vector<std::string> got;
  for (absl::StatusOr<std::string> r : shout.imap(words, {.chunksize = 2, .max_in_flight = 2})) {
    got.push_back(r.ok() ? *r : "error");
  }
  CHECK(got == std::vector<std::string>{"a!", "error", "b!", "c!", "error", "d!"});
}

// std::views (an endless iota input): left out of clang 14 builds (test_support.h).
#if PROCPOOL_TEST_STD_VIEWS
// Checks what an imap yielded from a pool closed (or terminated) while it ran: every element before
// the last is the outcome of a job taken before the refusal, in its place when `ordered` (a value,
// or kCancelled where `cancelled` allows it); the last is the kFailedPrecondition; then the end.
// `got` holds the outcomes of an imap of Squarer over 0, 1, 2, ...
void check_refused_at_end(const std::vector<absl::StatusOr<int64_t>>& got, bool ordered,
                          bool cancelled = false) {
  REQUIRE_FALSE(got.empty());
  CHECK(got.back().status().code() == absl::StatusCode::kFailedPrecondition);
  const int64_t taken = static_cast<int64_t>(got.size()) - 1;
  std::multiset<int64_t> squares;
  for (int64_t i = 0; i < taken; ++i) {
    CAPTURE(i);
    if (cancelled && !got[i].ok()) {
      CHECK(got[i].status().code() == absl::StatusCode::kCancelled);
      continue;
    }
    REQUIRE_MESSAGE(got[i].ok(), got[i].status());
    if (ordered) CHECK(*got[i] == i * i);
    squares.insert(*got[i]);
  }
  // Unordered: each value is the square of a job taken, none twice (which jobs came before the
  // refusal depends on which finished first).
  std::set<int64_t> roots;
  for (int64_t square : squares) {
    const auto root = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(square))));
    CHECK(root * root == square);
    CHECK(roots.insert(root).second);
  }
}

// An imap (or imap_unordered) of Squarer over 0, 1, 2, ... on a pool closed while it runs.
void imap_of_a_pool_closed_meanwhile(bool ordered) {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  auto endless = std::views::iota(int64_t{0});
  auto imap = [&](CallOptions options) {
    return ordered ? pool.imap(endless, options) : pool.imap_unordered(endless, options);
  };
  std::vector<absl::StatusOr<int64_t>> got;
  constexpr size_t kLimit = 1'000'000;  // the range must end long before
  SUBCASE("close() between two elements") {
    auto results = imap({.chunksize = 1, .max_in_flight = 4});
    for (absl::StatusOr<int64_t> square : results) {
      got.push_back(std::move(square));
      if (got.size() == 3) REQUIRE(pool.close().ok());
      if (got.size() == kLimit) break;
    }
    // The next element after close() is the refusal, in job 3's place, and the range ends.
    CHECK(got.size() == 4);
    check_refused_at_end(got, ordered);
    CHECK(results.begin() == results.end());  // and it stays ended
  }
  SUBCASE("close() from another thread while the range is consumed") {
    std::atomic<size_t> consumed{0};
    std::thread closer([&] {
      REQUIRE(testing::wait_until([&] { return consumed.load() >= 100; }));
      REQUIRE(pool.close().ok());
    });
    for (absl::StatusOr<int64_t> square : imap({.chunksize = 3, .max_in_flight = 12})) {
      got.push_back(std::move(square));
      consumed.store(got.size());
      if (got.size() == kLimit) break;
    }
    closer.join();
    check_refused_at_end(got, ordered);
  }
  SUBCASE("close() after the whole input was taken: every outcome, no refusal") {
    std::vector<int64_t> jobs = {1, 2, 3};
    auto results = ordered ? pool.imap(jobs) : pool.imap_unordered(jobs);
    std::multiset<int64_t> squares;
    for (absl::StatusOr<int64_t> square : results) {
      REQUIRE(pool.close().ok());
      REQUIRE_MESSAGE(square.ok(), square.status());
      squares.insert(*square);
    }
    CHECK(squares == std::multiset<int64_t>{1, 4, 9});
  }
  CHECK(pool.join().ok());
}

TEST_CASE("imap of a pool closed meanwhile: the next element is kFailedPrecondition, in its job's place, and the range ends") {
  SUBCASE("imap") { imap_of_a_pool_closed_meanwhile(/*ordered=*/true); }
  SUBCASE("imap_unordered") { imap_of_a_pool_closed_meanwhile(/*ordered=*/false); }
}

TEST_CASE("imap of a pool terminated while it waits: kCancelled for the jobs taken, then kFailedPrecondition") {
  // Squares, except that jobs from 2 on sleep long: the consumer waits on job 2 when the pool is
  // terminated.
  struct SlowFromTwo {
    int64_t run(int64_t x) {
      if (x >= 2) absl::SleepFor(absl::Seconds(60));
      return x * x;
    }
  };
  for (bool ordered : {true, false}) {
    CAPTURE(ordered);
    ProcessPool<SlowFromTwo> pool(quiet({.workers = 2}));
    std::vector<absl::StatusOr<int64_t>> got;
    std::atomic<size_t> consumed{0};
    std::thread stopper([&] {
      REQUIRE(testing::wait_until([&] {
        if (consumed.load() < 2) return false;
        PoolStats stats = pool.stats();
        return std::all_of(stats.workers.begin(), stats.workers.end(), [](const WorkerStats& w) {
          return w.state == WorkerState::kBusy;
        });
      }));
      pool.terminate();
    });
    auto endless = std::views::iota(int64_t{0});
    auto results = ordered ? pool.imap(endless, {.max_in_flight = 4})
                           : pool.imap_unordered(endless, {.max_in_flight = 4});
    for (absl::StatusOr<int64_t> square : results) {
      got.push_back(std::move(square));
      consumed.store(got.size());
      if (got.size() == 1000) break;
    }
    stopper.join();
    REQUIRE(got.size() >= 3);
    REQUIRE(got[0].ok());
    REQUIRE(got[1].ok());
    // Jobs 0 and 1 ran on different workers: unordered, either may come first.
    CHECK(std::multiset<int64_t>{*got[0], *got[1]} == std::multiset<int64_t>{0, 1});
    if (ordered) CHECK(*got[0] == 0);
    check_refused_at_end(got, ordered, /*cancelled=*/true);
  }
}
#endif  // PROCPOOL_TEST_STD_VIEWS

TEST_CASE("apply and apply_async") {
  ProcessPool<Sleeper> pool(quiet({.workers = 2}));
  CHECK(*pool.apply(5) == 5);

  SUBCASE("get(timeout) expires with kDeadlineExceeded; the task keeps running") {
    AsyncResult<int64_t> pending = pool.apply_async(400);
    CHECK_FALSE(pending.ready());
    absl::StatusOr<int64_t> early = pending.get(absl::Milliseconds(20));
    CHECK(early.status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(pending.wait(absl::Seconds(10)));
    CHECK(pending.ready());
    CHECK(*pending.get() == 400);
    CHECK(*pending.get(absl::ZeroDuration()) == 400);  // every get returns the result
  }
  SUBCASE("callbacks fire exactly once, on a thread that may use the pool") {
    std::atomic<int> successes{0};
    std::atomic<int> errors{0};
    std::atomic<int64_t> nested{-1};
    AsyncResult<int64_t> done = pool.apply_async(
        10, {}, {.on_success = [&](const int64_t& value) {
                   // A blocking call from a callback must not deadlock the pool.
                   nested = *pool.apply(value + 1);
                   successes.fetch_add(1);
                 },
                 .on_error = [&](const absl::Status&) { errors.fetch_add(1); }});
    CHECK(*done.get() == 10);
    REQUIRE(testing::wait_until([&] { return successes.load() == 1; }));
    CHECK(nested.load() == 11);
    absl::SleepFor(absl::Milliseconds(50));
    CHECK(successes.load() == 1);
    CHECK(errors.load() == 0);
  }
}

TEST_CASE("error callbacks, and map_async with its callback") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  std::atomic<int> errors{0};
  absl::Status seen;
  std::mutex mu;
  AsyncResult<int64_t> failed = pool.apply_async(-1, {}, {.on_error = [&](const absl::Status& s) {
                                                   std::lock_guard lock(mu);
                                                   seen = s;
                                                   errors.fetch_add(1);
                                                 }});
  CHECK(failed.get().status().code() == absl::StatusCode::kUnknown);
  REQUIRE(testing::wait_until([&] { return errors.load() == 1; }));
  {
    std::lock_guard lock(mu);
    CHECK(std::string(seen.message()).find("negative") != std::string::npos);
  }

  std::atomic<size_t> delivered{0};
  std::vector<int64_t> jobs = {1, 2, 3, 4};
  AsyncResult<std::vector<int64_t>> all = pool.map_async(
      jobs, {}, {.on_success = [&](const std::vector<int64_t>& r) { delivered = r.size(); }});
  CHECK(*all.get() == std::vector<int64_t>{1, 4, 9, 16});
  REQUIRE(testing::wait_until([&] { return delivered.load() == 4; }));

  AsyncResult<std::vector<int64_t>> empty = pool.map_async({});
  CHECK(empty.get()->empty());
  REQUIRE(pool.close().ok());
  CHECK(pool.map_async(jobs).get().status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(pool.apply_async(1).get().status().code() == absl::StatusCode::kFailedPrecondition);
}

struct Formatter {
  std::string run(const std::string& name, int64_t count, double ratio) {
    return absl::StrCat(name, "/", count, "/", ratio);
  }
};

TEST_CASE("starmap unpacks each tuple into run's parameters") {
  ProcessPool<Formatter> pool(quiet({.workers = 2}));
  static_assert(std::is_same_v<ProcessPool<Formatter>::Job, std::tuple<std::string, int64_t, double>>);
  std::vector<std::tuple<std::string, int64_t, double>> jobs = {{"a", 1, 0.5}, {"b", 2, 1.5}};
  absl::StatusOr<std::vector<std::string>> formatted = pool.starmap(jobs);
  REQUIRE(formatted.ok());
  CHECK(*formatted == std::vector<std::string>{"a/1/0.5", "b/2/1.5"});
}

int64_t cube(const int64_t& x) { return x * x * x; }
absl::StatusOr<std::string> describe(int64_t x) {
  if (x == 13) return absl::InvalidArgumentError("unlucky");
  return absl::StrCat("#", x);
}
double weighted(int64_t value, double weight) { return static_cast<double>(value) * weight; }

TEST_CASE("Pool runs plain functions and captureless lambdas, like pool.map(f, xs)") {
  PROCPOOL_LOCAL_ONLY("procpool::Pool cannot have remote workers");
  Pool pool(quiet({.workers = 2}));
  std::vector<int64_t> jobs = {1, 2, 3};
  CHECK(*pool.map(cube, jobs) == std::vector<int64_t>{1, 8, 27});
  CHECK(*pool.map(&cube, jobs, {.chunksize = 1}) == std::vector<int64_t>{1, 8, 27});
  CHECK(*pool.map([](const int64_t& x) { return x + 100; }, jobs) == std::vector<int64_t>{101, 102, 103});
  CHECK(*pool.apply(describe, 7) == "#7");
  CHECK(pool.apply(describe, 13).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(*pool.apply_async(cube, 4).get() == 64);
  std::vector<std::tuple<int64_t, double>> pairs = {{2, 0.5}, {10, 0.1}};
  absl::StatusOr<std::vector<double>> products = pool.starmap(weighted, pairs);
  REQUIRE(products.ok());
  CHECK((*products)[0] == doctest::Approx(1.0));
  CHECK((*products)[1] == doctest::Approx(1.0));
  std::vector<int64_t> cubes;
#if PROCPOOL_TEST_STD_VIEWS
  for (absl::StatusOr<int64_t> c : pool.imap(cube, std::views::iota(int64_t{0}, int64_t{5}))) cubes.push_back(*c);
  CHECK(cubes == std::vector<int64_t>{0, 1, 8, 27, 64});
#endif
  std::set<std::string> described;
  for (absl::StatusOr<std::string> d : pool.imap_unordered(describe, jobs)) described.insert(*d);
  CHECK(described == std::set<std::string>{"#1", "#2", "#3"});
}

// A program-wide pool that task functions call, as a recursive divide-and-conquer would, made
// as a namespace-scope `procpool::Pool pool;` is: in storage that exists before the pool, so that
// the workers its constructor forks see the pool half made, as they see a global. (Placement new
// lets each test make it when it starts.)
template <typename P>
struct GlobalPool {
  template <typename... Args>
  void make(Args&&... args) { new (storage) P(std::forward<Args>(args)...); }
  P& operator*() { return *std::launder(reinterpret_cast<P*>(storage)); }
  P* operator->() { return &**this; }
  void destroy() { (**this).~P(); }
  alignas(P) unsigned char storage[sizeof(P)] = {};
};

GlobalPool<Pool> global_pool;

int64_t status_code(const absl::Status& status) { return static_cast<int64_t>(status.code()); }

// What a worker got from the pool it inherited (a status code), for each way of calling it; job
// 5 is the sum of a Pool made inside the worker; job 6 destroys the inherited pool, as a worker's
// exit() would run its destructor.
int64_t use_global_pool(const int64_t& job) {
  std::vector<int64_t> jobs = {1, 2, 3};
  switch (job) {
    case 0:
      return status_code(global_pool->map(cube, jobs).status());
    case 1:
      return status_code(global_pool->apply(cube, 3).status());
    case 2:
      return status_code(global_pool->apply_async(cube, 3).get().status());
    case 3:
      return status_code(global_pool->map_async(cube, jobs).get().status());
    case 4: {
      auto results = global_pool->imap(cube, jobs);
      auto first = results.begin();
      if (first == results.end()) return -1;
      return status_code(first->status());
    }
    case 5: {
      Pool nested(quiet({.workers = 1}));
      absl::StatusOr<std::vector<int64_t>> cubes = nested.map(cube, jobs);
      if (!cubes.ok()) return -1;
      return (*cubes)[0] + (*cubes)[1] + (*cubes)[2];
    }
    default:
      global_pool.destroy();
      return 0;
  }
}

TEST_CASE("a task function that calls the global Pool its worker came from gets kFailedPrecondition") {
  PROCPOOL_LOCAL_ONLY("procpool::Pool cannot have remote workers");
  global_pool.make(quiet({.workers = 2}));
  std::vector<int64_t> jobs = {0, 1, 2, 3, 4, 5};
  absl::StatusOr<std::vector<int64_t>> got = global_pool->map(use_global_pool, jobs, {.chunksize = 1});
  REQUIRE_MESSAGE(got.ok(), got.status());
  const int64_t refused = status_code(absl::FailedPreconditionError(""));
  CHECK((*got)[0] == refused);  // map
  CHECK((*got)[1] == refused);  // apply
  CHECK((*got)[2] == refused);  // apply_async
  CHECK((*got)[3] == refused);  // map_async
  CHECK((*got)[4] == refused);  // imap
  CHECK((*got)[5] == 1 + 8 + 27);  // a Pool made inside a worker works
  // The inherited pool's destructor in a worker neither hangs nor touches the parent's workers.
  CHECK(*global_pool->apply(use_global_pool, 6) == 0);
  CHECK(*global_pool->map(cube, jobs, {.chunksize = 1}) == std::vector<int64_t>{0, 1, 8, 27, 64, 125});
  CHECK(global_pool->stats().workers.size() == 2);
  global_pool.destroy();
}

// The same for a ProcessPool whose worker type calls the global pool it runs in.
struct CallsOwnPool {
  int64_t run(int64_t job);
};
GlobalPool<ProcessPool<CallsOwnPool>> global_process_pool;

int64_t CallsOwnPool::run(int64_t job) {
  if (job > 0) return job;
  std::vector<int64_t> jobs = {1, 2};
  return status_code(global_process_pool->map(jobs).status());
}

TEST_CASE("a worker that calls the global ProcessPool it belongs to gets kFailedPrecondition") {
  PROCPOOL_LOCAL_ONLY("a remote worker is another program: it inherits no pool");
  global_process_pool.make(quiet({.workers = 1}));
  absl::StatusOr<int64_t> got = global_process_pool->apply(0);
  REQUIRE_MESSAGE(got.ok(), got.status());
  CHECK(*got == status_code(absl::FailedPreconditionError("")));
  global_process_pool.destroy();
}

// Records enter, each run and exit, per pid.
struct Recorder {
  explicit Recorder(std::string log) : log_(std::move(log)) {}
  void enter() { testing::append_line(log_, absl::StrCat("enter ", getpid())); }
  int64_t run(int64_t job) {
    testing::append_line(log_, absl::StrCat("run ", getpid(), " ", job));
    return job;
  }
  void exit() { testing::append_line(log_, absl::StrCat("exit ", getpid())); }
  std::string log_;
};

TEST_CASE("max_tasks_per_worker recycles workers; no task is lost or run twice") {
  PROCPOOL_LOCAL_ONLY("Recorder is built by a factory, which a remote program cannot run");
  testing::TempDir dir;
  const std::string log = dir.file("events");
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 40; ++i) jobs.push_back(i);
  int64_t restarted = 0;
  {
    ProcessPool<Recorder> pool(quiet({.workers = 2, .max_tasks_per_worker = 3}),
                               [log] { return Recorder(log); });
    absl::StatusOr<std::vector<int64_t>> echoed = pool.map(jobs);  // automatic chunks of 5 > 3
    REQUIRE(echoed.ok());
    CHECK(*echoed == jobs);
    restarted = pool.stats().workers_restarted;
  }
  std::map<std::string, std::map<std::string, int>> per_pid;  // pid -> kind -> count
  std::map<int64_t, int> runs;
  for (const std::string& line : testing::read_lines(log)) {
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    ++per_pid[parts[1]][parts[0]];
    if (parts[0] == "run") {
      int64_t job;
      REQUIRE(absl::SimpleAtoi(parts[2], &job));
      ++runs[job];
    }
  }
  CHECK(runs.size() == jobs.size());
  for (const auto& [job, count] : runs) CHECK(count == 1);
  CHECK(per_pid.size() >= 40 / 3);
  for (auto& [pid, kinds] : per_pid) {
    const auto worker_pid = pid;  // clang before 16 cannot capture a structured binding
    CAPTURE(worker_pid);
    CHECK(kinds["run"] <= 3);
    CHECK(kinds["enter"] == 1);
    CHECK(kinds["exit"] == 1);
  }
  CHECK(restarted >= 40 / 3 - 2);
}

struct Hog {
  int64_t run(int64_t megabytes) {
    // Touch the memory so it is resident, and keep it.
    static std::vector<std::string> kept;
    kept.emplace_back(static_cast<size_t>(megabytes) << 20, 'x');
    return getpid();
  }
};

TEST_CASE("max_worker_rss_bytes recycles a worker that grew too big") {
  ProcessPool<Hog> pool(quiet({.workers = 1, .max_worker_rss_bytes = size_t{64} << 20}));
  std::set<int64_t> pids;
  for (int i = 0; i < 12; ++i) {
    absl::StatusOr<int64_t> pid = pool.apply(16);
    REQUIRE(pid.ok());
    pids.insert(*pid);
    absl::SleepFor(absl::Milliseconds(60));  // past the 50 ms check interval
  }
  CHECK(pids.size() >= 2);
  CHECK(pool.stats().workers_restarted >= 1);
}

TEST_CASE("two threads can map on one pool at once; results do not mix") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  auto work = [&pool](int64_t base, bool* ok) {
    std::vector<int64_t> jobs;
    for (int64_t i = 0; i < 5000; ++i) jobs.push_back(base + i);
    for (int round = 0; round < 5; ++round) {
      absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs, {.chunksize = 16});
      if (!squares.ok() || squares->size() != jobs.size()) return;
      for (size_t i = 0; i < jobs.size(); ++i) {
        if ((*squares)[i] != jobs[i] * jobs[i]) return;
      }
    }
    *ok = true;
  };
  bool first = false, second = false;
  std::thread a(work, 0, &first);
  std::thread b(work, 1'000'000, &second);
  a.join();
  b.join();
  CHECK(first);
  CHECK(second);
}

TEST_CASE("progress callbacks and stats add up after a run with failures") {
  std::vector<LogEvent> events;
  std::mutex events_mu;
  PoolOptions options{.workers = 2};
  options.log_sink = [&](const LogEvent& event) {
    std::lock_guard lock(events_mu);
    events.push_back(event);
  };
  {
    ProcessPool<Squarer> pool(options);
    std::vector<int64_t> jobs;
    for (int64_t i = 0; i < 100; ++i) jobs.push_back(i % 10 == 0 ? -i - 1 : i);
    std::atomic<size_t> calls{0};
    std::atomic<size_t> last_done{0};
    absl::StatusOr<std::vector<int64_t>> result =
        pool.map(jobs, {.progress = [&](size_t done, size_t total) {
                          CHECK(total == 100);
                          calls.fetch_add(1);
                          last_done = std::max(last_done.load(), done);
                        }});
    CHECK_FALSE(result.ok());
    CHECK(calls.load() == 100);
    CHECK(last_done.load() == 100);
    // A worker may still be starting if the other one did all the work.
    CHECK(testing::wait_until([&] { return testing::all_idle(pool.stats()); }));
    PoolStats stats = pool.stats();
    CHECK(stats.tasks_submitted == 100);
    CHECK(stats.tasks_done == 90);
    CHECK(stats.tasks_failed == 10);
    CHECK(stats.workers_restarted == 0);
    REQUIRE(stats.workers.size() == 2);
    int64_t done_by_workers = 0;
    for (const WorkerStats& worker : stats.workers) {
      CHECK(worker.pid > 0);
      CHECK(worker.state == WorkerState::kIdle);
      CHECK_FALSE(worker.current_task.has_value());
      done_by_workers += worker.tasks_done;
    }
    CHECK(done_by_workers == 100);
  }
  std::lock_guard lock(events_mu);
  int started = 0, stopped = 0;
  for (const LogEvent& event : events) {
    CHECK(event.process.rfind("procpool", 0) == 0);
    CHECK(event.since_start >= absl::ZeroDuration());
    if (event.message == "started") ++started;
    if (event.message.find("exited with status 0") != std::string::npos) ++stopped;
  }
  CHECK(started == 2);
  CHECK(stopped == 2);
}

struct SelfKiller {
  int64_t run(int64_t x) {
    if (x < 0) ::_exit(3);
    return x;
  }
};

TEST_CASE("a progress function or a log sink that throws is logged; the calls and the pool go on") {
  // Both are the program's code, run on the pool's thread (or a caller's) under its lock: an
  // exception escaping them must not end the program or wedge the pool.
  std::vector<LogEvent> events;
  std::mutex events_mu;
  PoolOptions options{.workers = 2};
  options.log_sink = [&](const LogEvent& event) {
    std::lock_guard lock(events_mu);
    events.push_back(event);
  };
  {
    ProcessPool<Squarer> pool(testing::on_link(options));
    std::vector<int64_t> jobs = {1, 2, 3, 4, 5, 6};
    SUBCASE("a std::exception") {
      absl::StatusOr<std::vector<int64_t>> squares =
          pool.map(jobs, {.progress = [](size_t, size_t) { throw std::runtime_error("no tty"); }});
      REQUIRE(squares.ok());
      CHECK(squares->back() == 36);
    }
    SUBCASE("anything else, without blocking the call") {
      AsyncResult<std::vector<int64_t>> squares =
          pool.map_async(jobs, {.progress = [](size_t, size_t) { throw 42; }});
      REQUIRE(squares.get().ok());
      CHECK(squares.get()->back() == 36);
    }
    CHECK(pool.map(jobs).ok());
  }
  std::lock_guard lock(events_mu);
  size_t logged = 0;
  for (const LogEvent& event : events) {
    if (event.message.find("a progress function threw") != std::string::npos) {
      CHECK(event.severity == LogSeverity::kError);
      CHECK((event.message.find("std::runtime_error: no tty") != std::string::npos ||
             event.message.find("int (not derived from std::exception)") != std::string::npos));
      ++logged;
    }
  }
  CHECK(logged == 6);
}

TEST_CASE("a log sink that throws does not end the program or wedge the pool") {
  PROCPOOL_LOCAL_ONLY("it counts the test's child processes");
  {
    ProcessPool<SelfKiller> pool({.workers = 1, .log_sink = [](const LogEvent&) { throw 7; }});
    for (int round = 0; round < 3; ++round) {
      // A worker's death is logged, by the pool thread or by this one when it borrowed the worker.
      absl::StatusOr<int64_t> died = pool.apply(-1);
      CHECK(died.status().code() == absl::StatusCode::kAborted);
      absl::StatusOr<std::vector<int64_t>> fine = pool.map(std::vector<int64_t>{1, 2, 3});
      REQUIRE(fine.ok());
    }
    CHECK(pool.close().ok());
    CHECK(pool.join().ok());
  }
  CHECK(testing::worker_children().empty());
}

TEST_CASE("stats show a busy worker and its current task") {
  ProcessPool<Sleeper> pool(quiet({.workers = 1}));
  AsyncResult<int64_t> slow = pool.apply_async(300);
  REQUIRE(testing::wait_until([&] { return pool.stats().workers[0].current_task.has_value(); }));
  WorkerStats worker = pool.stats().workers[0];
  CHECK(worker.state == WorkerState::kBusy);
  CHECK(*worker.current_task == 0);
  CHECK(*slow.get() == 300);
  // A remote worker's time comes from its relay's next report, a few milliseconds after its
  // result: stats are a moment behind, never wrong.
  CHECK(testing::wait_until(
      [&] { return pool.stats().workers[0].time_busy >= absl::Milliseconds(250); }));
}

}  // namespace
}  // namespace procpool
