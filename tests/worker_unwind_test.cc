// A worker never returns into the program that forked it (issue 17: isolation a native-code user
// can rely on). Whatever fails inside a worker's own code (an allocation past
// max_worker_memory_bytes as RLIMIT_AS, which the worker inherits its parent's address space
// under) ends that worker; an exception must not unwind out of fork() into the program's stack,
// where a second copy of the program would run on.

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/process_pool.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

struct Echo {
  using Job = std::string;
  using Result = int64_t;
  int64_t run(const std::string& job) { return static_cast<int64_t>(job.size()); }
};

constexpr size_t kReserved = size_t{1} << 30;  // the program's address space, untouched
constexpr size_t kCap = size_t{64} << 20;

// The program: holds more address space than the cap (as one with many threads' malloc arenas,
// or a GPU runtime's reservations, does), and runs a pool capped below it, without cgroups.
// Whichever process gets past the pool says so in `said`: only the program itself may.
[[noreturn]] void program(const std::string& said) {
  const pid_t program_pid = ::getpid();
  void* reserved = ::mmap(nullptr, kReserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0);
  if (reserved == MAP_FAILED) ::_exit(3);
  try {
    ProcessPool<Echo> pool({.workers = 1,
                            .max_worker_memory_bytes = kCap,
                            .cgroups = Cgroups::kOff,
                            .log_sink = nullptr,
                            .respawn_max_delay = absl::Milliseconds(200)});
    AsyncResult<int64_t> result = pool.apply_async(std::string(size_t{4} << 20, 'x'));
    (void)result.wait(absl::Seconds(2));
    pool.terminate();
  } catch (...) {
    testing::append_line(said, absl::StrCat(::getpid() == program_pid ? "program" : "worker",
                                            " caught an exception"));
    ::_exit(0);
  }
  testing::append_line(said, ::getpid() == program_pid ? "program" : "worker");
  ::_exit(0);
}

TEST_CASE("a worker whose own allocations fail under RLIMIT_AS leaves, and never unwinds into the program") {
#if defined(PROCPOOL_TEST_ASAN)
  MESSAGE("skipped: AddressSanitizer's shadow memory exceeds any RLIMIT_AS");
  return;
#endif
  testing::TempDir dir;
  const std::string said = dir.file("said");
  std::cout.flush();
  std::fflush(nullptr);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) program(said);
  int status = 0;
  const bool ended = testing::wait_until([&] { return ::waitpid(child, &status, WNOHANG) == child; },
                                         absl::Seconds(60));
  if (!ended) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
  }
  CHECK(ended);
  // The worker's own copy of the program ran on, if it did, before the program ended (its pool
  // stops it at terminate()): what it said is in the file by now.
  const std::vector<std::string> lines = testing::read_lines(said);
  CHECK(lines == std::vector<std::string>{"program"});
  for (const std::string& line : lines) MESSAGE(line);
}

}  // namespace
}  // namespace procpool
