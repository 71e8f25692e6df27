// Which link a suite's pools use. With PROCPOOL_TEST_LINK=tcp in the environment, on_link() gives
// a pool remote workers: this very test binary, launched over loopback, serving whichever
// ProcessPool type the pool asks for (tests/test_main.cc). Otherwise pools fork, as by default.
// The same suite thus runs against both links (tests/BUILD.bazel: the *_tcp_test targets).

#ifndef PROCPOOL_TESTS_TEST_LINK_H_
#define PROCPOOL_TESTS_TEST_LINK_H_

#include <cstdlib>
#include <filesystem>
#include <string>

#include "procpool/pool_options.h"

namespace procpool::testing {

inline bool remote_link() {
  const char* link = std::getenv("PROCPOOL_TEST_LINK");
  return link != nullptr && std::string(link) == "tcp";
}

// Remote workers that are this very test binary, launched by the pool to dial it over loopback.
inline RemoteOptions self_launched(absl::Duration connect_timeout, absl::Duration heartbeat_timeout) {
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  return RemoteOptions{.launch = {self, "--procpool-connect={address}"},
                       .connect_timeout = connect_timeout,
                       .heartbeat_timeout = heartbeat_timeout};
}

inline PoolOptions on_link(PoolOptions options) {
  if (!remote_link()) return options;
  if (options.workers == 0) options.workers = 2;
  options.remote = self_launched(absl::Seconds(30), absl::Seconds(4));
  return options;
}

}  // namespace procpool::testing

// Skips the rest of a test case that only a forked pool can pass (it looks at child processes,
// uses procpool::Pool, or builds W with a factory), saying so.
#define PROCPOOL_LOCAL_ONLY(why)                                         \
  do {                                                                   \
    if (::procpool::testing::remote_link()) {                            \
      MESSAGE("skipped with remote workers: ", why);                     \
      return;                                                            \
    }                                                                    \
  } while (false)

#endif  // PROCPOOL_TESTS_TEST_LINK_H_
