// Launch and go away: fire off risky tasks (a transfer that may hang forever, code that may crash)
// with a timeout, never block on them, and let the pool clean up. A task past its timeout has its
// worker killed and replaced; a crash costs only that task; the program carries on with its own
// work and hears about outcomes through callbacks. The scope's end (close-then-join) waits only
// for what is still in flight, and the timeout bounds that.
//
// Run: bazel run //examples/fire_and_forget

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "procpool/procpool.h"

namespace {

const auto program_start = std::chrono::steady_clock::now();

void say(const std::string& text) {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - program_start).count();
  const std::string line = absl::StrFormat("[+%.3fs pid %d] %s\n", seconds, getpid(), text);
  (void)!::write(STDOUT_FILENO, line.data(), line.size());
}

// Stands in for an upload whose behaviour we do not control.
std::string upload(const std::string& name) {
  say("upload " + name + ": starting");
  if (name == "stuck.bin") {
    while (true) pause();  // a server that never answers
  }
  if (name == "corrupt.bin") ::raise(SIGSEGV);  // a library that crashes
  absl::SleepFor(absl::Milliseconds(100));
  return "uploaded " + name;
}

}  // namespace

int main() {
  std::atomic<int> finished{0};
  {
    procpool::Pool pool({.workers = 2, .task_timeout = absl::Milliseconds(500)});
    for (const std::string name : {"a.txt", "stuck.bin", "b.txt", "corrupt.bin", "c.txt"}) {
      // Fire and forget: the AsyncResult is dropped; the callbacks report.
      pool.apply_async(upload, name, {},
                       {.on_success = [&finished](const std::string& what) {
                          say("done: " + what);
                          ++finished;
                        },
                        .on_error = [&finished, name](const absl::Status& status) {
                          say("gave up on " + name + ": " + status.ToString());
                          ++finished;
                        }});
    }
    say("main: all launched; doing my own work");
    absl::SleepFor(absl::Milliseconds(50));
    say("main: leaving the pool's scope");
  }
  say(absl::StrFormat("main: pool closed and joined; %d of 5 outcomes reported, no process left",
                      finished.load()));
  return finished.load() == 5 ? 0 : 1;
}
