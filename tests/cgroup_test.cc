// lib/common/cgroup.h on this host's real cgroups, each mechanism alone: v2 cgroup.kill and the
// v1 freezer kill a worker's whole tree (a double-forked setsid daemon included) and the directory
// goes with the WorkerCgroup; a v1 or v2 memory cgroup's cap kills a process that crosses it and
// says so; cgroups a killed pool left behind are removed and their names never fail a new worker.
// Each case says why it skips where its mechanism cannot be made here (tests run as root;
// Bazel's sandbox leaves no cgroup writable: the target runs outside it).

#include "lib/common/cgroup.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

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

// A pid that no process has: a child's, once it is reaped.
pid_t gone_pid() {
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) ::_exit(0);
  REQUIRE(::waitpid(child, nullptr, 0) == child);
  return child;
}

bool make_dir(const std::string& path, absl::Duration age) {
  if (::mkdir(path.c_str(), 0755) != 0) return false;
  const timespec then = absl::ToTimespec(absl::Now() - age);
  const timespec times[2] = {then, then};
  return ::utimensat(AT_FDCWD, path.c_str(), times, 0) == 0;
}

TEST_CASE("cgroups a killed pool left behind are removed, and never taken for a new worker's") {
  const CgroupPlan plan = CgroupPlan::detect(true, 0);
  if (plan.kill == CgroupPlan::Kill::kNone) {
    MESSAGE(absl::StrCat("skipped: no kill cgroup can be made here (", plan.describe(), ")"));
    return;
  }
  const std::string& parent = plan.kill_parent;
  const pid_t gone = gone_pid();
  const pid_t self = ::getpid();
  const absl::Duration old = absl::Hours(2);
  const std::string abandoned = absl::StrCat(parent, "/leftover-", gone, "-w3-17");
  const std::string abandoned_probe = absl::StrCat(parent, "/procpool-probe-", gone, "-4");
  const std::string fresh = absl::StrCat(parent, "/leftover-", gone, "-w4-18");
  const std::string ours = absl::StrCat(parent, "/leftover-", self, "-w0-19");
  const std::string foreign = absl::StrCat(parent, "/leftover-", gone, "-not-a-worker");
  for (const std::string& dir : {abandoned, abandoned_probe, ours, foreign}) {
    REQUIRE_MESSAGE(make_dir(dir, old), dir);
  }
  REQUIRE(make_dir(fresh, absl::ZeroDuration()));

  remove_abandoned_cgroups(parent);
  CHECK_FALSE(directory_exists(abandoned));
  CHECK_FALSE(directory_exists(abandoned_probe));
  CHECK(directory_exists(fresh));    // could be a pool in another pid namespace, not joined yet
  CHECK(directory_exists(ours));     // its maker is alive
  CHECK(directory_exists(foreign));  // not a name procpool gives
  for (const std::string& dir : {fresh, ours, foreign}) ::rmdir(dir.c_str());

  // A name an earlier process with our pid left (it was SIGKILLed) is skipped, not an error.
  std::vector<std::string> taken;
  for (int n = 0; n < 48; ++n) {
    taken.push_back(absl::StrCat(parent, "/collide-", self, "-w0-", n));
    REQUIRE(make_dir(taken.back(), absl::ZeroDuration()));
  }
  {
    absl::StatusOr<WorkerCgroup> cgroup = WorkerCgroup::create(plan, absl::StrCat("collide-", self, "-w0"));
    CHECK_MESSAGE(cgroup.ok(), cgroup.status().ToString());
  }
  for (const std::string& dir : taken) {
    CHECK(directory_exists(dir));
    ::rmdir(dir.c_str());
  }
}

}  // namespace
}  // namespace procpool::internal
