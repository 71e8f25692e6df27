// lib/common/cgroup.h on this host's real cgroups, each mechanism alone: v2 cgroup.kill and the
// v1 freezer kill a worker's whole tree (a double-forked setsid daemon included) and the directory
// goes with the WorkerCgroup; a v1 or v2 memory cgroup's cap kills a process that crosses it and
// says so. Each case says why it skips where its mechanism cannot be made here (tests run as root;
// Bazel's sandbox leaves no cgroup writable: the target runs outside it).

#include "lib/common/cgroup.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "tests/test_support.h"

namespace procpool::internal {
namespace {

using testing::wait_until;

// Exists and is not a zombie (the daemon's new parent, init or a subreaper, reaps it).
bool alive(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string text;
  std::getline(stat, text);
  const size_t name_end = text.rfind(')');
  return name_end != std::string::npos && name_end + 2 < text.size() && text[name_end + 2] != 'Z';
}

bool directory_exists(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0;
}

// Forks a "worker" that joins `cgroup`, starts a double-forked setsid daemon (its pid written to
// `report`), and pauses. Returns the worker's pid; `daemon` gets the daemon's.
pid_t start_worker_with_daemon(const WorkerCgroup& cgroup, pid_t* daemon) {
  int report[2];
  REQUIRE(::pipe(report) == 0);
  const pid_t worker = ::fork();
  REQUIRE(worker >= 0);
  if (worker == 0) {
    if (!join_cgroups(cgroup.procs_files())) ::_exit(1);
    const pid_t first = ::fork();
    if (first == 0) {
      ::setsid();
      const pid_t second = ::fork();
      if (second == 0) {
        while (true) ::pause();
      }
      (void)!::write(report[1], &second, sizeof(second));
      ::_exit(0);
    }
    ::waitpid(first, nullptr, 0);
    while (true) ::pause();
  }
  ::close(report[1]);
  REQUIRE(::read(report[0], daemon, sizeof(*daemon)) == sizeof(*daemon));
  ::close(report[0]);
  return worker;
}

void check_kill(const CgroupPlan& plan) {
  std::string dir;
  pid_t daemon = 0;
  {
    absl::StatusOr<WorkerCgroup> cgroup = WorkerCgroup::create(plan, "procpool-cgroup-test");
    REQUIRE_MESSAGE(cgroup.ok(), cgroup.status().ToString());
    REQUIRE(cgroup->stops_tree());
    dir = cgroup->procs_files().front().substr(0, cgroup->procs_files().front().rfind('/'));
    CHECK(directory_exists(dir));
    const pid_t worker = start_worker_with_daemon(*cgroup, &daemon);
    CHECK(alive(daemon));
    cgroup->kill();
    int status = 0;
    REQUIRE(::waitpid(worker, &status, 0) == worker);
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGKILL);
    CHECK(wait_until([&] { return !alive(daemon); }, absl::Seconds(5)));
  }
  CHECK_FALSE(directory_exists(dir));
}

TEST_CASE("cgroup v2 cgroup.kill kills a worker's whole tree, and the cgroup goes with it") {
  const CgroupPlan plan = CgroupPlan::detect(true, 0);
  if (plan.kill != CgroupPlan::Kill::kV2Kill) {
    MESSAGE(absl::StrCat("skipped: no v2 cgroup with cgroup.kill can be made here (", plan.describe(), ")"));
    return;
  }
  check_kill(plan);
}

TEST_CASE("the cgroup v1 freezer kills a worker's whole tree, and the cgroup goes with it") {
  const CgroupPlan plan = CgroupPlan::detect(true, 0, /*allow_v2=*/false);
  if (plan.kill != CgroupPlan::Kill::kV1Freezer) {
    MESSAGE(absl::StrCat("skipped: no v1 freezer cgroup can be made here (", plan.describe(), ")"));
    return;
  }
  check_kill(plan);
}

void check_memory_cap(const CgroupPlan& plan) {
  absl::StatusOr<WorkerCgroup> cgroup = WorkerCgroup::create(plan, "procpool-cgroup-test");
  REQUIRE_MESSAGE(cgroup.ok(), cgroup.status().ToString());
  CHECK_FALSE(cgroup->oom_killed());
  const pid_t worker = ::fork();
  REQUIRE(worker >= 0);
  if (worker == 0) {
    if (!join_cgroups(cgroup->procs_files())) ::_exit(1);
    constexpr size_t kBytes = size_t{256} << 20;
    auto* bytes = static_cast<char*>(std::malloc(kBytes));
    for (size_t i = 0; bytes != nullptr && i < kBytes; i += 4096) bytes[i] = 1;
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(worker, &status, 0) == worker);
  CHECK(WIFSIGNALED(status));
  CHECK(cgroup->oom_killed());
}

TEST_CASE("a memory cgroup's cap kills a process that crosses it, and says so") {
  constexpr size_t kCap = size_t{64} << 20;
  SUBCASE("v1 memory.limit_in_bytes") {
    const CgroupPlan plan = CgroupPlan::detect(true, kCap, /*allow_v2=*/false);
    if (plan.memory != CgroupPlan::Memory::kV1) {
      MESSAGE(absl::StrCat("skipped: no v1 memory cgroup can be made here (", plan.describe(), ")"));
      return;
    }
    check_memory_cap(plan);
  }
  SUBCASE("v2 memory.max") {
    const CgroupPlan plan = CgroupPlan::detect(true, kCap);
    if (plan.memory != CgroupPlan::Memory::kV2) {
      MESSAGE(absl::StrCat("skipped: no v2 memory cgroup can be made here (", plan.describe(), ")"));
      return;
    }
    check_memory_cap(plan);
  }
}

}  // namespace
}  // namespace procpool::internal
