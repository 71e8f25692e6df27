// Workers do not map each other's memory (issue 15, item 8): each worker maps only its own blob
// region and control page, whichever start method made it; a replaced worker's memory is gone
// from every process of the pool; a task cannot write into a sibling's area; and
// max_worker_rss_bytes counts a worker's own memory, not the shared pages it reads.

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/bytes.h"
#include "procpool/process_pool.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::wait_until;

constexpr const char* kPoolName = "isolate";

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return options;
}

// One mapping of a memfd in /proc/<pid>/maps.
struct MemfdMapping {
  uint64_t start = 0;
  uint64_t end = 0;
  uint64_t inode = 0;
  std::string name;  // "/memfd:isolate-w1-blobs (deleted)"
};

std::vector<MemfdMapping> memfd_mappings(pid_t pid) {
  std::ifstream maps(absl::StrCat("/proc/", pid, "/maps"));
  std::vector<MemfdMapping> found;
  std::string line;
  while (std::getline(maps, line)) {
    const size_t name_at = line.find("/memfd:");
    if (name_at == std::string::npos) continue;
    // start-end perms offset dev inode name
    std::vector<std::string> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    REQUIRE(fields.size() >= 6);
    std::vector<std::string> range = absl::StrSplit(fields[0], '-');
    MemfdMapping mapping;
    mapping.start = std::strtoull(range[0].c_str(), nullptr, 16);
    mapping.end = std::strtoull(range[1].c_str(), nullptr, 16);
    REQUIRE(absl::SimpleAtoi(fields[4], &mapping.inode));
    mapping.name = line.substr(name_at);
    found.push_back(mapping);
  }
  return found;
}

// The inodes of the memfds `pid` holds a descriptor of.
std::set<uint64_t> memfd_descriptors(pid_t pid) {
  std::set<uint64_t> found;
  for (int fd = 0; fd < 1024; ++fd) {
    const std::string path = absl::StrCat("/proc/", pid, "/fd/", fd);
    char target[256] = {};
    if (::readlink(path.c_str(), target, sizeof(target) - 1) <= 0) continue;
    struct stat info {};
    if (absl::StartsWith(target, "/memfd:") && ::stat(path.c_str(), &info) == 0) {
      found.insert(info.st_ino);
    }
  }
  return found;
}

// Every inode `pid` maps or holds.
std::set<uint64_t> memfds_of(pid_t pid) {
  std::set<uint64_t> inodes = memfd_descriptors(pid);
  for (const MemfdMapping& mapping : memfd_mappings(pid)) inodes.insert(mapping.inode);
  return inodes;
}

using ::procpool::testing::parent_of;

// Reads the pages of its job (a view into its blob region) and says who it is.
struct Reader {
  int64_t run(const Bytes& job) {
    int64_t sum = 0;
    for (size_t i = 0; i < job.size(); i += 4096) sum += job.data()[i];
    return sum == -1 ? 0 : ::getpid();
  }
};

std::vector<Bytes> big_jobs(const std::string& payload, size_t count) {
  return std::vector<Bytes>(count, Bytes::borrow(payload));
}

// Waits until each of the pool's slots has a ready worker; returns their pids by slot.
template <typename Pool>
std::vector<pid_t> ready_workers(Pool& pool, int expected) {
  std::vector<pid_t> pids;
  REQUIRE(wait_until([&] {
    const PoolStats stats = pool.stats();
    pids.clear();
    for (const WorkerStats& worker : stats.workers) {
      if (worker.pid <= 0 || worker.state != WorkerState::kIdle) return false;
      pids.push_back(worker.pid);
    }
    return static_cast<int>(pids.size()) == expected;
  }, absl::Seconds(60)));
  return pids;
}

TEST_CASE("each worker maps only its own region and control page, and holds no memfd") {
  StartMethod method = StartMethod::kFork;
  SUBCASE("fork") { method = StartMethod::kFork; }
  SUBCASE("fork server") { method = StartMethod::kForkServer; }
  ProcessPool<Reader> pool(quiet({.workers = 3, .name = kPoolName, .start_method = method}));
  const std::string payload(1 << 20, 'x');
  REQUIRE(pool.map(big_jobs(payload, 6), {.chunksize = 1}).ok());
  const std::vector<pid_t> pids = ready_workers(pool, 3);

  std::vector<std::set<uint64_t>> own(pids.size());
  for (size_t slot = 0; slot < pids.size(); ++slot) {
    CAPTURE(slot);
    const std::vector<MemfdMapping> mappings = memfd_mappings(pids[slot]);
    int controls = 0, regions = 0;
    for (const MemfdMapping& mapping : mappings) {
      CAPTURE(mapping.name);
      // Named for the worker they belong to: this one.
      CHECK(absl::StrContains(mapping.name, absl::StrCat(kPoolName, "-w", slot, "-")));
      controls += absl::StrContains(mapping.name, "-control");
      regions += absl::StrContains(mapping.name, "-blobs");
      own[slot].insert(mapping.inode);
    }
    CHECK(controls == 1);
    // The fork server's workers have no blob region.
    CHECK(regions == (method == StartMethod::kFork ? 1 : 0));
    // Its own memfds closed once mapped; nobody else's was inherited.
    CHECK(memfd_descriptors(pids[slot]).empty());
  }
  for (size_t a = 0; a < own.size(); ++a) {
    for (size_t b = a + 1; b < own.size(); ++b) {
      CAPTURE(a);
      CAPTURE(b);
      for (uint64_t inode : own[a]) CHECK(own[b].count(inode) == 0);
    }
  }
  if (method == StartMethod::kForkServer) {
    // The zygote forks them all and keeps none.
    const pid_t server = parent_of(pids[0]);
    REQUIRE(server != ::getpid());
    CHECK(memfds_of(server).empty());
  }
}

TEST_CASE("a replaced worker's region and control page are gone from every process of the pool") {
  StartMethod method = StartMethod::kFork;
  SUBCASE("fork") { method = StartMethod::kFork; }
  SUBCASE("fork server") { method = StartMethod::kForkServer; }
  ProcessPool<Reader> pool(quiet({.workers = 3, .name = kPoolName, .start_method = method}));
  const std::string payload(1 << 20, 'y');
  REQUIRE(pool.map(big_jobs(payload, 6), {.chunksize = 1}).ok());
  const std::vector<pid_t> before = ready_workers(pool, 3);
  const pid_t server = method == StartMethod::kForkServer ? parent_of(before[0]) : 0;

  // The first worker's memory: the one every later fork would have copied.
  const pid_t victim = before[0];
  std::set<uint64_t> victims;
  for (const MemfdMapping& mapping : memfd_mappings(victim)) victims.insert(mapping.inode);
  REQUIRE(!victims.empty());
  REQUIRE(::kill(victim, SIGKILL) == 0);
  REQUIRE(wait_until([&] {
    const PoolStats stats = pool.stats();
    return stats.workers_restarted == 1 && stats.workers[0].pid != victim &&
           stats.workers[0].state == WorkerState::kIdle;
  }, absl::Seconds(60)));
  REQUIRE(pool.map(big_jobs(payload, 6), {.chunksize = 1}).ok());

  std::vector<pid_t> everyone = ready_workers(pool, 3);
  everyone.push_back(::getpid());
  if (server != 0) everyone.push_back(server);
  // No mapping and no descriptor left anywhere: the kernel has freed its pages.
  for (pid_t pid : everyone) {
    CAPTURE(pid);
    const std::set<uint64_t> held = memfds_of(pid);
    for (uint64_t inode : victims) CHECK(held.count(inode) == 0);
  }
}

// Writes a byte at the address it is given, unless that address is its own: what a stray
// pointer in user code does.
struct Scribbler {
  std::string run(const std::string& job) {
    std::vector<std::string> parts = absl::StrSplit(job, ' ');
    if (parts.size() != 2) return "not an address";
    const uint64_t address = std::strtoull(parts[0].c_str(), nullptr, 16);
    if (std::to_string(::getpid()) == parts[1]) {
      absl::SleepFor(absl::Milliseconds(300));  // the others take the rest
      return "owner";
    }
    // Only where nothing of our own lies there (an unrelated mapping of ours could have taken
    // the hole): then the write must fault.
    std::ifstream maps("/proc/self/maps");
    std::string line;
    while (std::getline(maps, line)) {
      std::vector<std::string> range = absl::StrSplit(line.substr(0, line.find(' ')), '-');
      if (std::strtoull(range[0].c_str(), nullptr, 16) <= address &&
          address < std::strtoull(range[1].c_str(), nullptr, 16)) {
        return absl::StrCat("mapped: ", line);
      }
    }
    *reinterpret_cast<volatile char*>(address) = 1;
    return "wrote";
  }
};

TEST_CASE("a task cannot write into a sibling's region or control page") {
  ProcessPool<Scribbler> pool(quiet({.workers = 3, .name = kPoolName}));
  REQUIRE(pool.map(std::vector<std::string>(3, std::string(1 << 20, 'z'))).ok());
  const std::vector<pid_t> pids = ready_workers(pool, 3);
  // The first worker forked: its siblings were all forked after its memory was made.
  const pid_t owner = pids[0];
  const std::vector<MemfdMapping> mappings = memfd_mappings(owner);
  REQUIRE(mappings.size() == 2);
  for (const MemfdMapping& target : mappings) {
    CAPTURE(target.name);
    // Its first page: a hole in a sibling's address space fills from the top, if at all.
    const std::string job = absl::StrCat(absl::Hex(target.start), " ", owner);
    std::vector<AsyncResult<std::string>> calls;
    for (int i = 0; i < 6; ++i) calls.push_back(pool.apply_async(job));
    int faulted = 0;
    for (auto& call : calls) {
      absl::StatusOr<std::string> result = call.get();
      CAPTURE(result.status());
      if (result.ok()) {
        CAPTURE(*result);
        // A mapping of its own that happens to lie there: never a procpool memfd.
        CHECK((*result == "owner" ||
               (absl::StartsWith(*result, "mapped: ") && !absl::StrContains(*result, "memfd:"))));
      } else {
        CHECK(result.status().code() == absl::StatusCode::kAborted);
        CHECK(absl::StrContains(result.status().message(), "SIGSEGV"));
        ++faulted;
      }
    }
    CHECK(faulted >= 1);
    ready_workers(pool, 3);
  }
}

// RssAnon + RssFile of `pid`, in bytes: its own memory, without the shared pages it maps.
size_t private_resident_bytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  size_t kib = 0;
  while (std::getline(status, line)) {
    std::vector<std::string> fields = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    size_t value = 0;
    if (fields.size() >= 2 && (fields[0] == "RssAnon:" || fields[0] == "RssFile:") &&
        absl::SimpleAtoi(fields[1], &value)) {
      kib += value;
    }
  }
  return kib << 10;
}

TEST_CASE("max_worker_rss_bytes counts a worker's own memory, not the shared region it reads") {
  // The limit is generous against what the worker holds of its own (more under ASan); its one
  // job, read in place in its region, is far larger.
  const size_t limit = [] {
    ProcessPool<Reader> probe(quiet({.workers = 1}));
    return private_resident_bytes(ready_workers(probe, 1)[0]) + (size_t{64} << 20);
  }();
  ProcessPool<Reader> pool(quiet({.workers = 1, .max_worker_rss_bytes = limit}));
  const pid_t first = ready_workers(pool, 1)[0];
  const std::string payload(size_t{160} << 20, 's');
  auto pid = pool.apply(Bytes::borrow(payload));
  REQUIRE(pid.ok());
  CHECK(*pid == first);
  // Several looks at its memory (every 50 ms), the job's pages still mapped in its region.
  absl::SleepFor(absl::Milliseconds(500));
  pid = pool.apply(Bytes::borrow(payload.substr(0, 100)));
  REQUIRE(pid.ok());
  CHECK(*pid == first);
  CHECK(pool.stats().workers_restarted == 0);
}

struct PrivateHog {
  int64_t run(int64_t megabytes) {
    static std::vector<std::string> kept;
    kept.emplace_back(static_cast<size_t>(megabytes) << 20, 'h');
    return ::getpid();
  }
};

TEST_CASE("max_worker_rss_bytes still recycles a worker whose own memory grows past it") {
  ProcessPool<PrivateHog> pool(quiet({.workers = 1, .max_worker_rss_bytes = size_t{64} << 20}));
  const int64_t first = *pool.apply(0);
  REQUIRE(pool.apply(256).ok());
  REQUIRE(wait_until([&] { return pool.stats().workers_restarted >= 1; }, absl::Seconds(60)));
  auto next = pool.apply(0);
  REQUIRE(next.ok());
  CHECK(*next != first);
}

}  // namespace
}  // namespace procpool
