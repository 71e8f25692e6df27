// The worker type of the remote tests, shared by the pool (tests/remote_test.cc) and the worker
// program (tests/remote_worker_helper.cc): both must name the same type for the handshake.
//
// Every hook and task appends a line to the file named by $REMOTE_EVENTS (if set): "enter <pid>",
// "run <pid> <job>", "exit <pid>". Negative jobs misbehave.

#ifndef PROCPOOL_TESTS_REMOTE_WORKER_H_
#define PROCPOOL_TESTS_REMOTE_WORKER_H_

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/test_support.h"

namespace procpool::testing {

inline constexpr int64_t kRemoteKillSelf = -9;    // SIGKILLs its own worker process
inline constexpr int64_t kRemoteHang = -100;      // sleeps until killed
inline constexpr int64_t kRemoteSleep300 = -300;  // then returns 300
inline constexpr int64_t kRemoteGarbage = -5;     // writes garbage on its channel, then hangs
inline constexpr int64_t kRemotePid = -7;         // returns its pid
// Returns 0 if the token is nowhere in its environment: 1 if getenv("PROCPOOL_TOKEN") finds it,
// 2 if getenv("PROCPOOL_TOKEN_FILE") does, 4 if /proc/self/environ names either.
inline constexpr int64_t kRemoteTokenVisible = -11;
// Starts a double-forked setsid `sleep 1000` carrying PROCPOOL_TREE_MARK=$REMOTE_TREE_MARK in its
// environment, then hangs (tests/process_tree_test.cc looks for it).
inline constexpr int64_t kRemoteSetsidDaemon = -12;
inline constexpr int64_t kRemoteAllocate512MiB = -13;  // touches 512 MiB, returns 0

struct RemoteWorker {
  using Job = int64_t;
  using Result = int64_t;

  RemoteWorker() {
    if (const char* path = std::getenv("REMOTE_EVENTS")) events_ = path;
  }
  void note(const std::string& line) const {
    if (!events_.empty()) append_line(events_, line);
  }
  void enter() { note(absl::StrCat("enter ", ::getpid())); }
  int64_t run(int64_t job) {
    note(absl::StrCat("run ", ::getpid(), " ", job));
    switch (job) {
      case kRemoteKillSelf:
        ::raise(SIGKILL);
        break;
      case kRemoteHang:
        while (true) ::pause();
      case kRemoteSleep300:
        absl::SleepFor(absl::Milliseconds(300));
        return 300;
      case kRemoteGarbage: {
        const char garbage[] = "\xde\xad\xbe\xef not a frame \xff\xff\xff\xff";
        (void)!::write(3, garbage, sizeof(garbage));
        while (true) ::pause();
      }
      case kRemotePid:
        return ::getpid();
      case kRemoteSetsidDaemon: {
        const pid_t first = ::fork();
        if (first == 0) {
          ::setsid();
          if (::fork() == 0) {
            const char* mark = std::getenv("REMOTE_TREE_MARK");
            ::setenv("PROCPOOL_TREE_MARK", mark != nullptr ? mark : "", 1);
            ::execlp("sleep", "sleep", "1000", static_cast<char*>(nullptr));
            ::_exit(127);
          }
          ::_exit(0);
        }
        ::waitpid(first, nullptr, 0);
        while (true) ::pause();
      }
      case kRemoteAllocate512MiB: {
        constexpr size_t kBytes = size_t{512} << 20;
        auto* bytes = new char[kBytes];
        for (size_t i = 0; i < kBytes; i += 4096) bytes[i] = static_cast<char>(i);
        const int64_t touched = bytes[kBytes - 4096];
        delete[] bytes;
        return touched * 0;
      }
      case kRemoteTokenVisible: {
        int64_t seen = 0;
        if (std::getenv("PROCPOOL_TOKEN") != nullptr) seen |= 1;
        if (std::getenv("PROCPOOL_TOKEN_FILE") != nullptr) seen |= 2;
        std::ifstream in("/proc/self/environ", std::ios::binary);
        const std::string environment((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        if (environment.find("PROCPOOL_TOKEN") != std::string::npos) seen |= 4;
        return seen;
      }
      default:
        break;
    }
    return job * job;
  }
  void exit() { note(absl::StrCat("exit ", ::getpid())) ; }

  std::string events_;
};

// Another worker type: a pool of RemoteWorker must refuse a program serving this one.
struct OtherRemoteWorker {
  std::string run(const std::string& job) { return job; }
};

}  // namespace procpool::testing

#endif  // PROCPOOL_TESTS_REMOTE_WORKER_H_
