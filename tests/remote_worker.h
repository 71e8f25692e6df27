// The worker type of the remote tests, shared by the pool (tests/remote_test.cc) and the worker
// program (tests/remote_worker_helper.cc): both must name the same type for the handshake.
//
// Every hook and task appends a line to the file named by $REMOTE_EVENTS (if set): "enter <pid>",
// "run <pid> <job>", "exit <pid>". Negative jobs misbehave.

#ifndef PROCPOOL_TESTS_REMOTE_WORKER_H_
#define PROCPOOL_TESTS_REMOTE_WORKER_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
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
// Returns how many copies of the token its process holds in memory (anonymous mappings: heap,
// stacks, private pages): the token is $REMOTE_TOKEN_REVERSED reversed (so that the environment
// does not hold it), and its own copy of it does not count.
inline constexpr int64_t kRemoteTokenInMemory = -14;
// A job kRemoteSlow + n sleeps 150 ms, then returns n (tasks slow enough to be caught running).
inline constexpr int64_t kRemoteSlow = int64_t{1} << 40;
// Returns how many copies of the bytes $REMOTE_SECRET_HEX spells in hex (so that the environment
// does not hold them) its process holds in memory, as kRemoteTokenInMemory.
inline constexpr int64_t kRemoteSecretInMemory = -15;
// Whether this worker's task can read its relay's memory (/proc/<relay>/mem, as the same user
// without CAP_SYS_PTRACE: the program runs as nobody, REMOTE_RUN_AS_NOBODY), in tens, plus 1 if
// the worker itself is not dumpable; -1 if it does not run as nobody.
inline constexpr int64_t kRemoteRelayMemoryReadable = -16;
inline constexpr uid_t kNobody = 65534;

// How many times `needle` occurs in this process's anonymous readable mappings, besides at
// `needle` itself. Read through /proc/self/mem, which neither faults nor trips a sanitizer on
// memory this process never allocated; huge reservations (a sanitizer's shadow) are left out.
inline int64_t copies_in_memory(const std::string& needle) {
  if (needle.empty()) return -1;
  const std::vector<std::string> maps = testing::read_lines("/proc/self/maps");
  const int mem = ::open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
  if (mem < 0) return -1;
  std::vector<char> chunk(size_t{1} << 20);
  int64_t found = 0;
  for (const std::string& line : maps) {
    uintptr_t begin = 0, end = 0;
    char perms[5] = {};
    unsigned long long offset = 0, inode = 0;
    char device[16] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s %llx %15s %llu", &begin, &end, perms, &offset,
                    device, &inode) != 6) {
      continue;
    }
    if (perms[0] != 'r' || inode != 0 || line.find("[v") != std::string::npos) continue;
    if (end - begin > (uintptr_t{1} << 32)) continue;
    // Chunks overlap by the needle's length, so that none is missed across a boundary.
    for (uintptr_t at = begin; at < end;) {
      const size_t want = std::min<uintptr_t>(chunk.size(), end - at);
      const ssize_t got = ::pread(mem, chunk.data(), want, static_cast<off_t>(at));
      if (got <= 0) break;
      for (const char* hit = chunk.data(); (hit = static_cast<const char*>(
               ::memmem(hit, chunk.data() + got - hit, needle.data(), needle.size()))) != nullptr;
           ++hit) {
        const uintptr_t where = at + static_cast<uintptr_t>(hit - chunk.data());
        const auto own = reinterpret_cast<uintptr_t>(needle.data());
        const auto buffer = reinterpret_cast<uintptr_t>(chunk.data());
        if (where != own && (where < buffer || where >= buffer + chunk.size())) ++found;
      }
      if (static_cast<size_t>(got) < want || at + static_cast<size_t>(got) >= end) break;
      at += static_cast<size_t>(got) - std::min<size_t>(static_cast<size_t>(got), needle.size() - 1);
    }
  }
  ::close(mem);
  return found;
}

// The worker program of the remote tests (tests/remote_worker_helper.cc), for RemoteOptions::launch
// or to start by hand.
inline std::string worker_program() { return helper_program("remote_worker_helper"); }

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
    if (job >= kRemoteSlow) {
      absl::SleepFor(absl::Milliseconds(150));
      return job - kRemoteSlow;
    }
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
        if (testing::read_file("/proc/self/environ").find("PROCPOOL_TOKEN") != std::string::npos) {
          seen |= 4;
        }
        return seen;
      }
      case kRemoteTokenInMemory: {
        const char* reversed = std::getenv("REMOTE_TOKEN_REVERSED");
        if (reversed == nullptr) return -1;
        const std::string backwards = reversed;
        const std::string token(backwards.rbegin(), backwards.rend());
        return copies_in_memory(token);
      }
      case kRemoteSecretInMemory: {
        const char* hex = std::getenv("REMOTE_SECRET_HEX");
        if (hex == nullptr) return -1;
        return copies_in_memory(absl::HexStringToBytes(hex));
      }
      case kRemoteRelayMemoryReadable: {
        if (::getuid() != kNobody) return -1;
        const int mem = ::open(absl::StrCat("/proc/", ::getppid(), "/mem").c_str(), O_RDONLY | O_CLOEXEC);
        if (mem >= 0) ::close(mem);
        return (mem >= 0 ? 10 : 0) + (::prctl(PR_GET_DUMPABLE) == 1 ? 0 : 1);
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
