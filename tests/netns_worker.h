// The worker type of tests/netns_test.cc, shared with its worker program
// (tests/netns_worker_helper.cc): both must name the same type for the handshake.
//
// A task appends "run <pid> <job>" to the file named by $NETNS_EVENTS (one O_APPEND write, so
// lines from hosts in different network namespaces never mix), sleeps $NETNS_TASK_MS, and returns
// job * 3 + 1. Job kSourceAddress returns instead the local IPv4 address (host byte order) of the
// worker's TCP connection to the pool: the address the host's network stack sends from.

#ifndef PROCPOOL_TESTS_NETNS_WORKER_H_
#define PROCPOOL_TESTS_NETNS_WORKER_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/test_support.h"

namespace procpool::testing {

inline constexpr int64_t kSourceAddress = -1;

struct NetnsWorker {
  using Job = int64_t;
  using Result = int64_t;

  NetnsWorker() {
    if (const char* path = std::getenv("NETNS_EVENTS")) events_ = path;
    if (const char* ms = std::getenv("NETNS_TASK_MS")) (void)absl::SimpleAtoi(ms, &task_ms_);
  }

  int64_t run(int64_t job) {
    if (job == kSourceAddress) return source_address();
    if (!events_.empty()) append_line(events_, absl::StrCat("run ", ::getpid(), " ", job));
    absl::SleepFor(absl::Milliseconds(task_ms_));
    return job * 3 + 1;
  }

  // The local address of the one IPv4 TCP connection this worker has (its data connection); -1
  // when it has none.
  static int64_t source_address() {
    for (int fd = 0; fd < 1024; ++fd) {
      sockaddr_in local{};
      socklen_t length = sizeof(local);
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) != 0) continue;
      if (local.sin_family != AF_INET) continue;
      sockaddr_in peer{};
      length = sizeof(peer);
      if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) != 0) continue;
      return ntohl(local.sin_addr.s_addr);
    }
    return -1;
  }

  std::string events_;
  int64_t task_ms_ = 0;
};

}  // namespace procpool::testing

#endif  // PROCPOOL_TESTS_NETNS_WORKER_H_
