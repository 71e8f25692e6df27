// The shapes of calls: tasks with no value (run returning void or absl::Status), map over any
// sized range of things that convert to Job, Job = bool, imap as a view, starmap_async. Both
// pool kinds (ProcessPool<W> and the plain-function Pool), real processes.

#include "procpool/process_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <list>
#include <ranges>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "doctest/doctest.h"
#include "procpool/codec.h"
#include "procpool/procpool.h"
#include "tests/test_support.h"

// A job type that counts its copies in this process, to tell a borrowed input from a copied one.
namespace procpool::testing {
struct Tracked {
  static std::atomic<int> copies;
  int64_t value = 0;
  Tracked() = default;
  Tracked(int64_t v) : value(v) {}  // NOLINT: implicit, like a number
  Tracked(const Tracked& other) : value(other.value) { copies.fetch_add(1); }
  Tracked& operator=(const Tracked& other) {
    value = other.value;
    copies.fetch_add(1);
    return *this;
  }
};
std::atomic<int> Tracked::copies{0};
}  // namespace procpool::testing

namespace procpool {
template <>
struct Codec<testing::Tracked> {
  static void encode(const testing::Tracked& t, wire::Value::Builder out) { out.setInt(t.value); }
  static absl::Status decode(wire::Value::Reader in, testing::Tracked& out) {
    return Codec<int64_t>::decode(in, out.value);
  }
};
}  // namespace procpool

namespace procpool {
namespace {

using testing::Tracked;

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return options;
}

// ---- tasks with no value ----

// Appends each job to a file; a negative job throws.
struct Toucher {
  explicit Toucher(std::string log) : log_(std::move(log)) {}
  void run(int64_t job) {
    if (job < 0) throw std::invalid_argument(absl::StrCat("negative job ", job));
    testing::append_line(log_, absl::StrCat(job));
  }
  std::string log_;
};

std::multiset<int64_t> touched(const std::string& log) {
  std::multiset<int64_t> jobs;
  for (const std::string& line : testing::read_lines(log)) {
    int64_t job = 0;
    if (absl::SimpleAtoi(line, &job)) jobs.insert(job);
  }
  return jobs;
}

TEST_CASE("a worker whose run returns void: map and apply return absl::Status") {
  testing::TempDir dir;
  const std::string log = dir.file("touched");
  ProcessPool<Toucher> pool(quiet({.workers = 2}), [log] { return Toucher(log); });
  static_assert(std::is_void_v<ProcessPool<Toucher>::Result>);
  static_assert(std::is_same_v<ProcessPool<Toucher>::MapOutcome, absl::Status>);

  std::vector<int64_t> jobs = {1, 2, 3, 4};
  absl::Status all = pool.map(jobs);
  CHECK(all.ok());
  CHECK(touched(log) == std::multiset<int64_t>{1, 2, 3, 4});

  absl::Status failed = pool.map(std::vector<int64_t>{5, -6, 7, -8}, {.chunksize = 1});
  CHECK(failed.code() == absl::StatusCode::kUnknown);
  CHECK(std::string(failed.message()).rfind("job 1: ", 0) == 0);  // the first failure in job order
  CHECK(std::string(failed.message()).find("negative job -6") != std::string::npos);

  absl::Status one = pool.apply(10);
  CHECK(one.ok());
  CHECK(pool.apply(-1).code() == absl::StatusCode::kUnknown);
  CHECK(pool.map(std::vector<int64_t>{}).ok());
}

TEST_CASE("a void task's apply_async and map_async give AsyncResult<void>") {
  testing::TempDir dir;
  const std::string log = dir.file("touched");
  ProcessPool<Toucher> pool(quiet({.workers = 2}), [log] { return Toucher(log); });
  std::atomic<int> successes{0};
  std::atomic<int> done_callbacks{0};
  AsyncResult<void> one = pool.apply_async(1, {}, {.on_success = [&] { successes.fetch_add(1); }});
  one.add_done_callback([&](const absl::Status& status) {
    CHECK(status.ok());
    done_callbacks.fetch_add(1);
  });
  absl::Status outcome = one.get();
  CHECK(outcome.ok());
  CHECK(one.successful());

  AsyncResult<void> many = pool.map_async(std::vector<int64_t>{2, 3, -4});
  CHECK(many.get().code() == absl::StatusCode::kUnknown);
  CHECK(std::string(many.get(absl::Seconds(1)).message()).rfind("job 2: ", 0) == 0);
  CHECK_FALSE(many.successful());
  REQUIRE(testing::wait_until([&] { return successes.load() == 1 && done_callbacks.load() == 1; }));
  CHECK(touched(log) == std::multiset<int64_t>{1, 2, 3});
}

TEST_CASE("a void task's imap and imap_unordered yield absl::Status") {
  testing::TempDir dir;
  const std::string log = dir.file("touched");
  ProcessPool<Toucher> pool(quiet({.workers = 2}), [log] { return Toucher(log); });
  std::vector<absl::StatusCode> codes;
  for (const absl::Status& status : pool.imap(std::vector<int64_t>{1, -2, 3})) {
    codes.push_back(status.code());
  }
  CHECK(codes == std::vector<absl::StatusCode>{absl::StatusCode::kOk, absl::StatusCode::kUnknown,
                                               absl::StatusCode::kOk});
#if PROCPOOL_TEST_STD_VIEWS
  int ok = 0;
  for (absl::Status status : pool.imap_unordered(std::views::iota(int64_t{10}, int64_t{20}))) {
    ok += status.ok() ? 1 : 0;
  }
  CHECK(ok == 10);
#endif
}

// Returns its verdict as a status.
struct Checker {
  absl::Status run(const std::string& word) {
    if (word.empty()) return absl::InvalidArgumentError("empty word");
    return absl::OkStatus();
  }
};

TEST_CASE("a worker whose run returns absl::Status reports each task's status") {
  ProcessPool<Checker> pool(quiet({.workers = 2}));
  CHECK(pool.map(std::vector<std::string>{"a", "b"}).ok());
  absl::Status failed = pool.map(std::vector<std::string>{"a", "", "c"});
  CHECK(failed.code() == absl::StatusCode::kInvalidArgument);
  CHECK(failed.message() == "job 1: empty word");
  CHECK(pool.apply("").code() == absl::StatusCode::kInvalidArgument);
  CHECK(pool.apply_async(std::string("x")).get().ok());
}

absl::Status must_be_even(const int64_t& x) {
  if (x % 2 != 0) return absl::OutOfRangeError(absl::StrCat(x, " is odd"));
  return absl::OkStatus();
}
void record(const std::string& log, int64_t value) { testing::append_line(log, absl::StrCat(value)); }

TEST_CASE("Pool runs plain functions returning void or absl::Status") {
  Pool pool(quiet({.workers = 2}));
  CHECK(pool.map(must_be_even, std::vector<int64_t>{2, 4}).ok());
  CHECK(pool.map(must_be_even, std::vector<int64_t>{2, 3}).message() == "job 1: 3 is odd");
  CHECK(pool.apply(must_be_even, 5).code() == absl::StatusCode::kOutOfRange);
  AsyncResult<void> later = pool.apply_async(must_be_even, 6);
  CHECK(later.get().ok());

  testing::TempDir dir;
  const std::string log = dir.file("recorded");
  std::vector<std::tuple<std::string, int64_t>> pairs = {{log, 1}, {log, 2}};
  CHECK(pool.starmap(record, pairs).ok());
  AsyncResult<void> async_pairs = pool.starmap_async(record, pairs);
  CHECK(async_pairs.get().ok());
  CHECK(touched(log) == std::multiset<int64_t>{1, 1, 2, 2});
  int statuses = 0;
  for (absl::Status status : pool.imap(must_be_even, std::vector<int64_t>{2, 3})) {
    statuses += status.ok() ? 1 : 10;
  }
  CHECK(statuses == 11);
}

// ---- map over any sized range ----

struct Squarer {
  int64_t run(int64_t x) { return x * x; }
};

struct Negator {
  bool run(bool b) { return !b; }
};

TEST_CASE("map takes any sized range whose elements convert to Job") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  const std::vector<int64_t> expected = {0, 1, 4, 9, 16};
  CHECK(*pool.map(std::vector<int>{0, 1, 2, 3, 4}) == expected);
#if PROCPOOL_TEST_STD_VIEWS
  CHECK(*pool.map(std::views::iota(0, 5)) == expected);
  CHECK(*pool.map(std::views::iota(int64_t{0}, int64_t{5})) == expected);
#endif
  CHECK(*pool.map(std::set<int16_t>{4, 3, 2, 1, 0}) == expected);
  CHECK(*pool.map(std::deque<int64_t>{0, 1, 2, 3, 4}) == expected);
  CHECK(*pool.map(std::list<int64_t>{0, 1, 2, 3, 4}) == expected);
#if PROCPOOL_TEST_STD_VIEWS
  std::vector<int64_t> source = {0, 1, 2, 3, 4, 5, 6};
  CHECK(*pool.map(source | std::views::take(5)) == expected);
  CHECK(*pool.map(std::views::iota(0, 5) | std::views::transform([](int i) { return i; })) ==
        expected);
#endif
  CHECK(*pool.map({0, 1, 2}) == std::vector<int64_t>{0, 1, 4});
#if PROCPOOL_TEST_STD_VIEWS
  CHECK(pool.map(std::views::iota(0, 0))->empty());

  AsyncResult<std::vector<int64_t>> later = pool.map_async(std::views::iota(0, 5));
  CHECK(*later.get() == expected);
#endif
  CHECK(*pool.map_async(std::vector<int>{3}).get() == std::vector<int64_t>{9});
}

TEST_CASE("Job = bool works, from a std::vector<bool> too") {
  ProcessPool<Negator> pool(quiet({.workers = 2}));
  static_assert(std::is_same_v<ProcessPool<Negator>::Job, bool>);
  std::vector<bool> flags = {true, false, false, true};
  absl::StatusOr<std::vector<bool>> negated = pool.map(flags);
  REQUIRE(negated.ok());
  CHECK(*negated == std::vector<bool>{false, true, true, false});
  CHECK(*pool.apply(true) == false);
  CHECK(*pool.map_async(flags).get() == std::vector<bool>{false, true, true, false});
  bool buffer[] = {false, true};
  CHECK(*pool.map(buffer) == std::vector<bool>{true, false});
  std::vector<bool> seen;
  for (absl::StatusOr<bool> b : pool.imap(flags)) seen.push_back(*b);
  CHECK(seen == std::vector<bool>{false, true, true, false});
}

struct TrackedSquarer {
  int64_t run(const Tracked& t) { return t.value * t.value; }
};

TEST_CASE("map reads a contiguous range of exactly Job in place, and copies anything else") {
  ProcessPool<TrackedSquarer> pool(quiet({.workers = 2}));
  std::vector<Tracked> jobs(100);
  for (int i = 0; i < 100; ++i) jobs[i].value = i;
  Tracked::copies = 0;
  absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
  REQUIRE(squares.ok());
  CHECK((*squares)[99] == 99 * 99);
  CHECK(Tracked::copies.load() == 0);
  std::span<const Tracked> view(jobs.data(), 10);
  CHECK(pool.map(view)->size() == 10);
  CHECK(Tracked::copies.load() == 0);

  std::deque<Tracked> scattered(jobs.begin(), jobs.begin() + 10);
  Tracked::copies = 0;
  CHECK(pool.map(scattered)->size() == 10);
  CHECK(Tracked::copies.load() == 10);
}

TEST_CASE("Pool's map takes ranges too") {
  Pool pool(quiet({.workers = 2}));
  auto twice = +[](const int64_t& x) { return 2 * x; };
#if PROCPOOL_TEST_STD_VIEWS
  CHECK(*pool.map(twice, std::views::iota(1, 4)) == std::vector<int64_t>{2, 4, 6});
#endif
  CHECK(*pool.map(twice, std::vector<int>{5}) == std::vector<int64_t>{10});
  CHECK(*pool.map_async(twice, std::set<int64_t>{3, 1}).get() == std::vector<int64_t>{2, 6});
  auto flip = +[](bool b) { return !b; };
  CHECK(*pool.map(flip, std::vector<bool>{true}) == std::vector<bool>{false});
}

// ---- imap as a view ----

TEST_CASE("imap of a temporary composes with std::views::take and stops there") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  using Range = decltype(pool.imap(std::vector<int64_t>{}));
  static_assert(std::ranges::input_range<Range>);
  static_assert(std::ranges::view<Range>);

#if PROCPOOL_TEST_STD_VIEWS
  std::vector<int64_t> firsts;
  for (absl::StatusOr<int64_t> square :
       pool.imap(std::vector<int64_t>{1, 2, 3, 4, 5, 6}) | std::views::take(3)) {
    firsts.push_back(*square);
  }
  CHECK(firsts == std::vector<int64_t>{1, 4, 9});

  // Endless: take(n) must not wait for element n + 1 either.
  std::vector<int64_t> endless;
  for (absl::StatusOr<int64_t> square : pool.imap(std::views::iota(int64_t{0})) | std::views::take(5)) {
    endless.push_back(*square);
  }
  CHECK(endless == std::vector<int64_t>{0, 1, 4, 9, 16});

  auto squares = pool.imap_unordered(std::vector<int64_t>{7, 8}) |
                 std::views::transform([](const absl::StatusOr<int64_t>& r) { return *r; });
  std::set<int64_t> got;
  for (int64_t square : squares) got.insert(square);
  CHECK(got == std::set<int64_t>{49, 64});
#endif
  CHECK(*pool.map(std::vector<int64_t>{3}) == std::vector<int64_t>{9});  // still usable
}

TEST_CASE("a moved imap range keeps going where it was") {
  ProcessPool<Squarer> pool(quiet({.workers = 2}));
  auto results = pool.imap(std::vector<int64_t>{1, 2, 3});
  auto it = results.begin();
  CHECK(**it == 1);
  auto moved = std::move(results);
  ++it;
  CHECK(**it == 4);  // iterators survive the move
  std::vector<int64_t> rest;
  for (; it != moved.end(); ++it) rest.push_back(**it);
  CHECK(rest == std::vector<int64_t>{4, 9});
}

// ---- starmap_async ----

struct Joiner {
  std::string run(const std::string& word, int64_t times) {
    std::string out;
    for (int64_t i = 0; i < times; ++i) out += word;
    return out;
  }
};

TEST_CASE("starmap_async unpacks tuples without blocking, on both pool kinds") {
  ProcessPool<Joiner> pool(quiet({.workers = 2}));
  std::vector<std::tuple<std::string, int64_t>> jobs = {{"a", 2}, {"bc", 1}};
  AsyncResult<std::vector<std::string>> joined = pool.starmap_async(jobs);
  CHECK(*joined.get() == std::vector<std::string>{"aa", "bc"});
  std::list<std::tuple<std::string, int64_t>> listed(jobs.begin(), jobs.end());
  CHECK(*pool.starmap(listed) == std::vector<std::string>{"aa", "bc"});
  CHECK(*pool.starmap_async(listed).get() == std::vector<std::string>{"aa", "bc"});

  Pool functions(quiet({.workers = 1}));
  auto multiply = +[](int64_t a, int64_t b) { return a * b; };
  std::vector<std::tuple<int64_t, int64_t>> pairs = {{2, 3}, {4, 5}};
  std::atomic<size_t> delivered{0};
  AsyncResult<std::vector<int64_t>> products = functions.starmap_async(
      multiply, pairs, {}, {.on_success = [&](const std::vector<int64_t>& r) { delivered = r.size(); }});
  CHECK(*products.get() == std::vector<int64_t>{6, 20});
  REQUIRE(testing::wait_until([&] { return delivered.load() == 2; }));
}

}  // namespace
}  // namespace procpool
