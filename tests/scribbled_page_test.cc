// A task that scribbles on its worker's control page (lib/wire/control_page.h), as code with a wild
// pointer might, can fail only itself. The page is the worker's record of which task it runs and
// since when; the pool reads it to tell, after a death, which task died and which never started,
// and to time tasks. A record that was overwritten must never make a call run the task that kills
// its workers again and again (the call would never end), nor let a task outlive its timeout.
// Real workers, real kills; the same suite runs over remote (TCP) workers (scribbled_page_tcp_test).

#include "procpool/process_pool.h"
#include "procpool/logging.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <filesystem>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "lib/wire/control_page.h"
#include "tests/fault_support.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

// Named so that the crash stack shows it (not inlined): random bytes over the whole page, its
// crash stack and the words that say who opens claims included, then SIGSEGV.
[[gnu::noinline]] void scribbled_page_test_random_then_crash(void* page, size_t bytes) {
  std::mt19937_64 random(std::random_device{}());
  auto* words = static_cast<uint64_t*>(page);
  for (size_t i = 0; i < bytes / sizeof(uint64_t); ++i) words[i] = random();
  ::raise(SIGSEGV);
  __asm__ volatile("" ::: "memory");
}

namespace procpool {
namespace {

using internal::ControlPage;
using testing::map_within;
using testing::message_has;

// Jobs below 0 scribble, then die or hang; others return job * 10.
constexpr int64_t kWipeThenDie = -1;       // says it runs nothing, then SIGKILLs itself
constexpr int64_t kRandomThenCrash = -2;   // random bytes over the whole page, then SIGSEGV
constexpr int64_t kForeignClaimsThenDie = -3;  // every claim word another batch's, then SIGKILL
constexpr int64_t kWipeThenHang = -4;      // says it runs nothing, then sleeps 60 s
constexpr int64_t kFutureStartThenHang = -5;  // says it started in a year, then sleeps 60 s
constexpr int64_t kFakeStackThenDie = -6;  // writes a crash stack, then SIGKILLs itself
constexpr int64_t kForeignClaimsThenHang = -7;  // every claim word another batch's, then 60 s

// Where each run of a scribbling task leaves one byte: how many times the pool ran it. A file of
// this test process's own (ctest runs the suite's cases at once, each in a process of its own,
// without a TEST_TMPDIR apart), named in the environment, which the workers (forked, or launched
// by the pool) inherit; it is removed when the test process ends.
constexpr char kRunsPathVariable[] = "PROCPOOL_SCRIBBLED_PAGE_RUNS";

class RunsFile {
 public:
  RunsFile() {
    if (const char* inherited = std::getenv(kRunsPathVariable)) {
      path_ = inherited;
      return;
    }
    const char* dir = std::getenv("TEST_TMPDIR");
    path_ = absl::StrCat(dir != nullptr ? dir : "/tmp", "/procpool_scribbled_page_runs.", ::getpid());
    owner_ = ::getpid();
    ::setenv(kRunsPathVariable, path_.c_str(), 1);
  }
  ~RunsFile() {
    std::error_code ignored;
    if (::getpid() == owner_) std::filesystem::remove(path_, ignored);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  pid_t owner_ = -1;
};
const RunsFile runs_file;

const std::string& runs_path() { return runs_file.path(); }

void count_run() {
  const int fd = ::open(runs_path().c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return;
  testing::write_all(fd, "x", 1);
  ::close(fd);
}

size_t runs() {
  std::error_code error;
  const auto size = std::filesystem::file_size(runs_path(), error);
  return error ? 0 : static_cast<size_t>(size);
}

void reset_runs() {
  std::error_code ignored;
  std::filesystem::remove(runs_path(), ignored);
}

void wipe_stamps(ControlPage& page) {
  page.batch_seq.store(ControlPage::kNoBatch);
  page.task_index.store(0);
  page.running.store(0);
}

struct Scribbler {
  int64_t run(int64_t job) {
    if (job >= 0) return job * 10;
    count_run();
    auto* page = static_cast<ControlPage*>(testing::own_control_mapping());
    if (page == nullptr) return -1;  // found no page: the test sees the wrong value
    switch (job) {
      case kWipeThenDie:
        wipe_stamps(*page);
        ::raise(SIGKILL);
        break;
      case kRandomThenCrash:
        scribbled_page_test_random_then_crash(page, sizeof(ControlPage));
        break;
      case kForeignClaimsThenDie:
      case kForeignClaimsThenHang:
        for (auto& word : page->claims) {
          const uint64_t seen = word.load();
          word.store(internal::pack_claim(internal::claim_tag(seen) ^ 0x5a5a, 0, 0));
        }
        wipe_stamps(*page);
        if (job == kForeignClaimsThenDie) ::raise(SIGKILL);
        absl::SleepFor(absl::Seconds(60));
        break;
      case kWipeThenHang:
        wipe_stamps(*page);
        absl::SleepFor(absl::Seconds(60));
        break;
      case kFakeStackThenDie: {
        const std::string_view fake = "#0 0x1234 a stack no crash handler wrote\n";
        fake.copy(page->crash_stack, fake.size());
        page->crash_stack_bytes.store(static_cast<uint32_t>(fake.size()));
        ::raise(SIGKILL);
        break;
      }
      case kFutureStartThenHang:
        page->started_ns.store(page->started_ns.load() + int64_t{365} * 24 * 3600 * 1'000'000'000);
        absl::SleepFor(absl::Seconds(60));
        break;
    }
    return job * 10;
  }
};

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;

PoolOptions options() {
  return testing::on_link(PoolOptions{.workers = 2, .log_sink = nullptr});
}

std::vector<int64_t> jobs_around(int64_t scribble) {
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 12; ++i) jobs.push_back(i == 5 ? scribble : i);
  return jobs;
}

// The pool goes on serving after the scribbler is gone.
void check_serves_on(ProcessPool<Scribbler>& pool) {
  auto next = map_within(pool, std::vector<int64_t>{1, 2, 3, 4}, {}, absl::Seconds(60));
  REQUIRE_MESSAGE(next.ok(), next.status());
  CHECK(*next == std::vector<int64_t>{10, 20, 30, 40});
}

TEST_CASE("a task that scribbles on its worker's record and dies fails; it is not run again and again") {
  for (const int64_t scribble : {kWipeThenDie, kRandomThenCrash, kForeignClaimsThenDie}) {
    for (const int retries : {0, 1}) {
      CAPTURE(scribble);
      CAPTURE(retries);
      reset_runs();
      ProcessPool<Scribbler> pool(options());
      const absl::Time start = absl::Now();
      auto result =
          map_within(pool, jobs_around(scribble), {.chunksize = 3, .retries = retries}, absl::Seconds(60));
      MESSAGE("after ", absl::FormatDuration(absl::Now() - start), " and ", runs(),
              " runs of the scribbler: ", result.status());
      REQUIRE_FALSE(result.ok());
      // (A remote worker's host may judge the random record a task past its timeout, and stop it
      // before it crashes.)
      const bool random_on_tcp = scribble == kRandomThenCrash && testing::remote_link();
      CHECK((result.status().code() == absl::StatusCode::kAborted ||
             (random_on_tcp && result.status().code() == absl::StatusCode::kDeadlineExceeded)));
      CHECK(message_has(result.status(), "job 5"));
      if (scribble == kRandomThenCrash && result.status().code() == absl::StatusCode::kAborted) {
        // Its stack is the one it crashed with, not the bytes it left where the stack goes.
        const std::optional<std::string> stack = backtrace_of(result.status());
        REQUIRE(stack.has_value());
        INFO("the stack: ", *stack);
        CHECK(absl::StartsWith(*stack, "#0 0x"));
        CHECK(absl::StrContains(*stack, "scribbled_page_test_random_then_crash"));
      }
      // Each run of it is a death: a few per attempt, never without end. (Its first run loses
      // its batch-mates' outcomes with it, so the first of them is charged; they run again
      // publishing each outcome, and it is first in line from its second run: three losses so.)
      CHECK(runs() >= static_cast<size_t>(1 + retries));
      CHECK(runs() <= static_cast<size_t>(1 + 3 * (1 + retries)));
      check_serves_on(pool);
    }
  }
}

TEST_CASE("a task deep in a large batch that wipes its worker's record and dies costs a few "
          "workers, not one per task before it") {
  reset_runs();
  ProcessPool<Scribbler> pool(options());
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 64; ++i) jobs.push_back(i == 40 ? kWipeThenDie : i);
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {.chunksize = 64}, absl::Seconds(60));
  MESSAGE("after ", absl::FormatDuration(absl::Now() - start), " and ", runs(),
          " runs of the scribbler: ", result.status());
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kAborted);
  CHECK(message_has(result.status(), "job 40"));
  // Its first run loses its batch-mates' outcomes with it; they run again publishing each, so
  // its second run puts it first in line; then three runs alone.
  CHECK(runs() <= 5);
  check_serves_on(pool);
}

TEST_CASE("a stack in the page of a worker that no crash killed is not reported as its crash stack") {
  ProcessPool<Scribbler> pool(options());
  // One task a batch: the tasks before it keep their results (held where the pool finds them).
  auto result = map_within(pool, jobs_around(kFakeStackThenDie), {.chunksize = 1}, absl::Seconds(60));
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kAborted);
  CHECK(message_has(result.status(), "job 5"));
  CHECK_FALSE(backtrace_of(result.status()).has_value());
  check_serves_on(pool);
}

TEST_CASE("a task that scribbles on its worker's record and hangs still ends at its task_timeout") {
  for (const int64_t scribble : {kWipeThenHang, kFutureStartThenHang, kForeignClaimsThenHang}) {
    CAPTURE(scribble);
    reset_runs();
    ProcessPool<Scribbler> pool(options());
    const absl::Time start = absl::Now();
    auto result = map_within(pool, jobs_around(scribble),
                             {.chunksize = 3, .task_timeout = absl::Milliseconds(300)}, absl::Seconds(60));
    MESSAGE("after ", absl::FormatDuration(absl::Now() - start), " and ", runs(),
            " runs of the scribbler: ", result.status());
    REQUIRE_FALSE(result.ok());
    CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(runs() >= 1);
    // A remote worker opens its batches' claims itself (lib/wire/control_page.h, revoke_claims):
    // claim words its task overwrote cannot be told from words it has not read yet, so its whole
    // batch (jobs 3, 4 and 5) comes back as never started, and the loss counts against job 3,
    // first in line. Job 3 then runs alone, and 4 and 5 each publish their outcome before the
    // next starts: job 5 is first without one at the next losses, and at the third of those
    // (kMaxUnplacedLosses) it is taken as the task that ended them. So one run more than where
    // the parent opens the claims, and never more.
    const bool claims_lost_remotely = scribble == kForeignClaimsThenHang && testing::remote_link();
    CHECK(runs() <= (claims_lost_remotely ? 4u : 3u));
    check_serves_on(pool);
    // The last of those runs may still hang in a worker after its call has failed: its record and
    // claims say it runs nothing, and without a task_timeout for what it runs (none: its call
    // ended) only join's join_timeout (30 s) would end it. terminate() does at once.
    if (claims_lost_remotely) pool.terminate();
  }
}

}  // namespace
}  // namespace procpool
