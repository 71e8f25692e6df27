// A worker never returns into the program that forked it (issue 17: isolation a native-code user
// can rely on). Whatever fails inside a worker's own code (an allocation past
// max_worker_memory_bytes as RLIMIT_AS, which the worker inherits its parent's address space
// under) ends that worker; an exception must not unwind out of fork() into the program's stack,
// where a second copy of the program would run on.

#include <malloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
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

// The address space this process has mapped (VmSize), in bytes.
int64_t mapped_bytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t pages = 0;
  statm >> pages;
  return pages * ::sysconf(_SC_PAGESIZE);
}

constexpr char kMappedBytes[] = "mapped bytes";

// Returns the job's size, or for kMappedBytes its worker's address space.
struct Echo {
  using Job = std::string;
  using Result = int64_t;
  int64_t run(const std::string& job) {
    return job == kMappedBytes ? mapped_bytes() : static_cast<int64_t>(job.size());
  }
};

// The program: runs a pool capped, without cgroups, 40 MiB above the address space its worker
// starts with (measured by a first pool: so the worker starts,
// lib/worker/worker_main.cc), and hands it a 64 MiB job, which the worker's own code must
// allocate to read. Whichever process gets past the pool says so in `said`: only the program
// itself may. What the task got is in `outcome`.
[[noreturn]] void program(const std::string& said, const std::string& outcome) {
  const pid_t program_pid = ::getpid();
  // One malloc arena: a thread's own (64 MiB of address space, kept after the thread ends) would
  // make the second pool's worker start with more than the first's.
  ::mallopt(M_ARENA_MAX, 1);
  try {
    const std::string job(size_t{64} << 20, 'x');
    int64_t worker_mapped = 0;
    {
      // Capped too (at 1 TiB), so that its worker starts as the next pool's does.
      ProcessPool<Echo> measure({.workers = 1,
                                 .max_worker_memory_bytes = size_t{1} << 40,
                                 .cgroups = Cgroups::kOff,
                                 .log_sink = nullptr});
      worker_mapped = measure.apply(kMappedBytes).value_or(0);
    }
    if (worker_mapped <= 0) ::_exit(4);
    ProcessPool<Echo> pool({.workers = 1,
                            .max_worker_memory_bytes = static_cast<size_t>(worker_mapped) + (size_t{40} << 20),
                            .cgroups = Cgroups::kOff,
                            .log_sink = nullptr,
                            .respawn_max_delay = absl::Milliseconds(200)});
    // Its worker is up before the job is encoded here (workers are forked on the pool's thread):
    // it does not inherit the job's frame.
    if (pool.apply("x").value_or(0) != 1) ::_exit(5);
    AsyncResult<int64_t> result = pool.apply_async(job);
    testing::append_line(outcome, result.wait(absl::Seconds(5)) ? result.get().status().ToString()
                                                                 : "no outcome within 5 s");
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
  const std::string outcome = dir.file("outcome");
  std::cout.flush();
  std::fflush(nullptr);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) program(said, outcome);
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
  // The task failed: its worker could not allocate what reading the job takes (and left), and
  // its replacement, forked while the program held the job's frame, had no room to start.
  const std::vector<std::string> outcomes = testing::read_lines(outcome);
  REQUIRE(outcomes.size() == 1);
  MESSAGE(outcomes[0]);
  CHECK(outcomes[0] != "OK");
}

}  // namespace
}  // namespace procpool
