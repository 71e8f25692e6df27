// A program under test for signal_test: a pool whose workers record enter/run/exit, a long map,
// and procpool::install_signal_handlers(). Usage: signal_helper <dir> <task_ms>
// Prints "started" once every worker runs a task; at the end prints "map <status code>" and exits 0.

#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "procpool/procpool.h"
#include "tests/test_support.h"

namespace {

struct Recorder {
  explicit Recorder(std::string dir) : dir_(std::move(dir)) {}
  int64_t run(int64_t milliseconds) {
    procpool::testing::append_line(dir_ + "/runs", absl::StrCat(getpid()));
    absl::SleepFor(absl::Milliseconds(milliseconds));
    return milliseconds;
  }
  void exit() { procpool::testing::append_line(absl::StrCat(dir_, "/exit.", getpid()), "done"); }
  std::string dir_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const std::string dir = argv[1];
  int64_t task_ms = 0;
  if (!absl::SimpleAtoi(argv[2], &task_ms)) return 2;
  if (!procpool::install_signal_handlers().ok()) return 3;
  absl::StatusCode code;
  {
    procpool::ProcessPool<Recorder> pool({.workers = 3}, [dir] { return Recorder(dir); });
    std::vector<int64_t> jobs(200, task_ms);
    procpool::AsyncResult<std::vector<int64_t>> result = pool.map_async(jobs, {.chunksize = 1});
    // Announce once every worker is running a task.
    for (int i = 0; i < 2000; ++i) {
      int busy = 0;
      for (const auto& worker : pool.stats().workers) busy += worker.current_task.has_value();
      if (busy == 3) break;
      absl::SleepFor(absl::Milliseconds(5));
    }
    std::printf("started\n");
    std::fflush(stdout);
    code = result.get().status().code();
  }
  std::printf("map %s signal %d\n", absl::StatusCodeToString(code).c_str(), procpool::stop_signal());
  return 0;
}
