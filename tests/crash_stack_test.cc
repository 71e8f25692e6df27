// PoolOptions::crash_backtraces: a worker killed by a fatal signal reports the crashing thread's
// stack, symbolized, on its task's kAborted status (procpool::backtrace_of) and in one kError
// event; a handler the program installed is still called. Real crashes, forked, fork-server and
// remote (this binary, launched over loopback) workers.

#include "procpool/logging.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <latch>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "doctest/doctest.h"
#include "procpool/procpool.h"
#include "tests/fault_support.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

// Named so that a symbolized stack shows them. Not inlined, not folded into their callers.
[[gnu::noinline]] void crash_stack_test_segfault() {
  // Not null, which the undefined-behaviour sanitizer would report (ending the worker with an exit
  // status) before the kernel does: an address nothing maps.
  volatile int* nowhere = reinterpret_cast<volatile int*>(uintptr_t{16});
  *nowhere = 1;
  __asm__ volatile("" ::: "memory");
}

[[gnu::noinline]] void crash_stack_test_throws() { throw std::runtime_error("nobody catches this"); }

[[gnu::noinline]] void crash_stack_test_throws_through_noexcept() noexcept {
  // An exception leaving a noexcept function: std::terminate, then SIGABRT.
  crash_stack_test_throws();
}

[[gnu::noinline]] void crash_stack_test_divides(int by) {
  ::raise(SIGFPE);
  __asm__ volatile("" ::"r"(by) : "memory");
}

// Scribbles over its callers' frames (their saved frame pointers and return addresses become
// 0x4141...: a buffer overrun on the stack), then segfaults. Not instrumented: the overrun is
// the point.
[[gnu::noinline]] __attribute__((no_sanitize("address"))) void crash_stack_test_scribbles() {
  auto* frame = static_cast<volatile unsigned char*>(__builtin_frame_address(0));
  for (int i = 0; i < 512; ++i) frame[i] = 0x41;
  crash_stack_test_segfault();
}

// Recurses until the stack runs out: each frame keeps a buffer the compiler cannot drop, and
// the call is not in tail position. (The limit, which no stack reaches, is only there for the
// compilers' infinite-recursion warning.)
volatile int crash_stack_test_depth_limit = 1 << 30;
[[gnu::noinline]] int crash_stack_test_recurses(int depth) {
  if (depth >= crash_stack_test_depth_limit) return 0;
  volatile char frame[1024];
  frame[0] = static_cast<char>(depth);
  const int below = crash_stack_test_recurses(depth + 1);
  return below + frame[0];
}

// Several threads that segfault at once, released together.
[[gnu::noinline]] void crash_stack_test_threads_segfault() {
  constexpr int kThreads = 8;
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&go] {
      go.arrive_and_wait();
      crash_stack_test_segfault();
    });
  }
  for (std::thread& thread : threads) thread.join();
}

namespace procpool {
namespace {

struct Crasher {
  int64_t run(int64_t how) {
    if (how == 1) crash_stack_test_segfault();
    if (how == 2) crash_stack_test_throws_through_noexcept();
    if (how == 3) crash_stack_test_divides(0);
    if (how == 4) crash_stack_test_threads_segfault();
    if (how == 6) crash_stack_test_scribbles();
    if (how == 7) return crash_stack_test_recurses(0);
    return how;
  }
};

PoolOptions remote(PoolOptions options) {
  options.remote = testing::self_launched(absl::Seconds(60), absl::Seconds(10));
  return options;
}

void check_crash_reported(ProcessPool<Crasher>& pool, testing::LogCapture& events, int64_t how,
                          const char* signal_name, const char* function) {
  absl::StatusOr<int64_t> crashed = pool.apply(how);
  REQUIRE_FALSE(crashed.ok());
  CHECK(crashed.status().code() == absl::StatusCode::kAborted);
  // Today's message stays: who died, and by which signal.
  CHECK(absl::StrContains(crashed.status().message(), signal_name));
  std::optional<std::string> stack = backtrace_of(crashed.status());
  REQUIRE(stack.has_value());
  INFO("the stack: ", *stack);
  if (getenv("PROCPOOL_TEST_SHOW_STACK")) MESSAGE(*stack);
  CHECK(absl::StrContains(*stack, function));
  CHECK(absl::StartsWith(*stack, "#0 0x"));
  // One error event carries it.
  REQUIRE(testing::wait_until([&] { return !events.errors().empty(); }, absl::Seconds(30)));
  const std::vector<LogEvent> errors = events.errors();
  REQUIRE(errors.size() == 1);
  CHECK(absl::StrContains(errors[0].message, function));
  CHECK(errors[0].worker >= 0);
  CHECK(errors[0].pid > 0);
  // The pool carries on with a new worker.
  CHECK(pool.apply(5).value_or(-1) == 5);
}

// The same, in a fresh pool of one worker made with `options` (its log_sink is the capture's).
void check_crash_reported(PoolOptions options, int64_t how, const char* signal_name,
                          const char* function) {
  testing::DefaultCrashHandlers quiet;
  testing::LogCapture events;
  options.workers = 1;
  options.log_sink = events.sink();
  ProcessPool<Crasher> pool(options);
  check_crash_reported(pool, events, how, signal_name, function);
}

TEST_CASE("a worker killed by SIGSEGV reports its symbolized stack on the task's status and in one error event") {
  check_crash_reported(PoolOptions{}, 1, "SIGSEGV", "crash_stack_test_segfault");
}

TEST_CASE("an exception that reaches std::terminate in a worker reports the stack that threw it") {
  check_crash_reported(PoolOptions{}, 2, "SIGABRT", "crash_stack_test_throws_through_noexcept");
}

TEST_CASE("of threads that crash at once, one reports its stack: the others wait for it, not end the worker first") {
  check_crash_reported(PoolOptions{}, 4, "SIGSEGV", "crash_stack_test_segfault");
}

TEST_CASE("a crash after an overrun scribbled over its callers' frames reports the frames up to them") {
  check_crash_reported(PoolOptions{}, 6, "SIGSEGV", "crash_stack_test_scribbles");
}

TEST_CASE("a stack overflow in a task reports its stack (the handler runs on a stack of its own)") {
  check_crash_reported(PoolOptions{}, 7, "SIGSEGV", "crash_stack_test_recurses");
}

TEST_CASE("a worker killed by SIGFPE under a fork server reports its stack") {
  check_crash_reported({.start_method = StartMethod::kForkServer}, 3, "SIGFPE",
                       "crash_stack_test_divides");
}

TEST_CASE("map's first failure keeps the crashed worker's stack") {
  testing::DefaultCrashHandlers quiet;
  testing::LogCapture events;
  ProcessPool<Crasher> pool({.workers = 2, .log_sink = events.sink()});
  std::vector<int64_t> jobs = {0, 0, 1, 0};
  absl::StatusOr<std::vector<int64_t>> mapped = pool.map(jobs, {.chunksize = 1});
  REQUIRE_FALSE(mapped.ok());
  CHECK(absl::StartsWith(mapped.status().message(), "job 2: "));
  std::optional<std::string> stack = backtrace_of(mapped.status());
  REQUIRE(stack.has_value());
  CHECK(absl::StrContains(*stack, "crash_stack_test_segfault"));
}

TEST_CASE("with crash_backtraces false a crash records no stack") {
  testing::DefaultCrashHandlers quiet;
  testing::LogCapture events;
  ProcessPool<Crasher> pool(
      {.workers = 1, .log_sink = events.sink(), .crash_backtraces = false});
  absl::StatusOr<int64_t> crashed = pool.apply(1);
  REQUIRE_FALSE(crashed.ok());
  CHECK(crashed.status().code() == absl::StatusCode::kAborted);
  CHECK(absl::StrContains(crashed.status().message(), "SIGSEGV"));
  CHECK_FALSE(backtrace_of(crashed.status()).has_value());
  CHECK(pool.apply(5).value_or(-1) == 5);
  CHECK(events.errors().empty());
}

TEST_CASE("backtrace_of finds nothing in a status without a stack") {
  CHECK_FALSE(backtrace_of(absl::OkStatus()).has_value());
  CHECK_FALSE(backtrace_of(absl::AbortedError("worker 0 (pid 1) was killed by SIGKILL")).has_value());
}

// The program's own SIGSEGV handler: leaves a mark in the file named below, then returns (the
// signal then kills the worker as it would have).
char handler_mark_path[4096];
void program_segv_handler(int) {
  const int fd = ::open(handler_mark_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd >= 0) {
    (void)!::write(fd, "handled\n", 8);
    ::close(fd);
  }
}

TEST_CASE("a SIGSEGV handler the program installed before the pool still runs in a crashing worker") {
  testing::TempDir dir;
  const std::string mark = dir.path() + "/mark";
  std::snprintf(handler_mark_path, sizeof(handler_mark_path), "%s", mark.c_str());
  struct sigaction mine {};
  mine.sa_handler = program_segv_handler;
  sigemptyset(&mine.sa_mask);
  struct sigaction before {};
  REQUIRE(::sigaction(SIGSEGV, &mine, &before) == 0);
  {
    testing::LogCapture events;
    ProcessPool<Crasher> pool({.workers = 1, .log_sink = events.sink()});
    absl::StatusOr<int64_t> crashed = pool.apply(1);
    REQUIRE_FALSE(crashed.ok());
    CHECK(absl::StrContains(crashed.status().message(), "SIGSEGV"));
    std::optional<std::string> stack = backtrace_of(crashed.status());
    REQUIRE(stack.has_value());
    CHECK(absl::StrContains(*stack, "crash_stack_test_segfault"));
  }
  ::sigaction(SIGSEGV, &before, nullptr);
  const std::vector<std::string> marks = testing::read_lines(mark);
  REQUIRE(marks.size() == 1);
  CHECK(marks[0] == "handled");
}

TEST_CASE("a remote worker's crash stack reaches the pool through its relay") {
  testing::DefaultCrashHandlers quiet;
  testing::LogCapture events;
  ProcessPool<Crasher> pool(remote({.workers = 1, .log_sink = events.sink()}));
  check_crash_reported(pool, events, 1, "SIGSEGV", "crash_stack_test_segfault");
  const std::vector<LogEvent> errors = events.errors();
  REQUIRE(errors.size() == 1);
  CHECK_FALSE(errors[0].host.empty());
}

}  // namespace
}  // namespace procpool
