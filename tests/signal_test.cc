// SIGINT and SIGTERM sent to a whole process group, as a terminal or a supervisor does, against
// a real program using procpool::install_signal_handlers() (tests/signal_helper.cc).

#include "procpool/signals.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

struct Helper {
  pid_t pid = -1;
  FILE* out = nullptr;
};

// Starts the helper in a process group of its own, its stdout on a pipe.
Helper start(const std::string& dir, int task_ms) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const std::string path = testing::helper_program("signal_helper");
  const std::string ms = std::to_string(task_ms);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    ::execl(path.c_str(), path.c_str(), dir.c_str(), ms.c_str(), nullptr);
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // both sides, so it holds whoever runs first
  ::close(fds[1]);
  return Helper{pid, ::fdopen(fds[0], "r")};
}

std::string read_line(FILE* in) {
  char buffer[256] = {};
  if (std::fgets(buffer, sizeof(buffer), in) == nullptr) return "";
  std::string line(buffer);
  if (!line.empty() && line.back() == '\n') line.pop_back();
  return line;
}

struct Ending {
  int wait_status = 0;
  std::string last_line;  // "map <status code> signal <n>"
};

// Sends `signals` to the helper's whole process group, `gap` apart, and reaps the helper.
Ending signal_group(Helper& helper, std::vector<int> signals, absl::Duration gap = absl::ZeroDuration()) {
  for (size_t i = 0; i < signals.size(); ++i) {
    if (i > 0) absl::SleepFor(gap);
    REQUIRE(::kill(-helper.pid, signals[i]) == 0);
  }
  Ending ending;
  ending.last_line = read_line(helper.out);
  REQUIRE(::waitpid(helper.pid, &ending.wait_status, 0) == helper.pid);
  std::fclose(helper.out);
  return ending;
}

int exit_files(const std::string& dir) {
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().filename().string().rfind("exit.", 0) == 0) ++count;
  }
  return count;
}

TEST_CASE("one SIGINT to the process group mid-map: cancelled, every exit() ran, clean exit") {
  testing::TempDir dir;
  Helper helper = start(dir.path(), 50);
  REQUIRE(read_line(helper.out) == "started");
  Ending ending = signal_group(helper, {SIGINT});
  CHECK(WIFEXITED(ending.wait_status));
  CHECK(WEXITSTATUS(ending.wait_status) == 0);
  CHECK(ending.last_line == absl::StrCat("map CANCELLED signal ", SIGINT));
  CHECK(exit_files(dir.path()) == 3);  // every worker's exit() hook ran
  CHECK(testing::read_lines(dir.file("runs")).size() < 200);  // queued tasks were cancelled
  // No worker outlived the program (they were its children; the group is empty now).
  CHECK(testing::wait_until([&] { return ::kill(-helper.pid, 0) != 0; }, absl::Seconds(2)));
}

TEST_CASE("SIGTERM to the process group does the same; workers obey only their pool") {
  testing::TempDir dir;
  Helper helper = start(dir.path(), 50);
  REQUIRE(read_line(helper.out) == "started");
  Ending ending = signal_group(helper, {SIGTERM});
  CHECK(WIFEXITED(ending.wait_status));
  CHECK(ending.last_line == absl::StrCat("map CANCELLED signal ", SIGTERM));
  CHECK(exit_files(dir.path()) == 3);
}

TEST_CASE("a second SIGINT terminates: running tasks stop, no exit hooks") {
  testing::TempDir dir;
  Helper helper = start(dir.path(), 60000);  // tasks that would run a minute
  REQUIRE(read_line(helper.out) == "started");
  REQUIRE(testing::wait_until([&] { return testing::read_lines(dir.file("runs")).size() == 3; }));
  // 100 ms apart, so the first is handled as the first.
  Ending ending = signal_group(helper, {SIGINT, SIGINT}, absl::Milliseconds(100));
  CHECK(WIFEXITED(ending.wait_status));
  CHECK(ending.last_line == absl::StrCat("map CANCELLED signal ", SIGINT));
  CHECK(exit_files(dir.path()) == 0);
}

}  // namespace
}  // namespace procpool
