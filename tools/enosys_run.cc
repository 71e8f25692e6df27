// enosys_run PROGRAM [ARGS...]: runs PROGRAM as on Linux 4.18 (RHEL 8 / Rocky 8), where
// pidfd_open, pidfd_send_signal, clone3 and close_range do not exist: each fails with ENOSYS in
// PROGRAM and in everything it starts (a seccomp filter, tools/enosys_filter.h). CI runs the pool
// API, fault and remote suites under it (.ci/run), e.g.
//   bazel test --run_under=//tools:enosys_run //tests:pool_api_test

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "tools/enosys_filter.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s PROGRAM [ARGS...]\n", argv[0]);
    return 2;
  }
  if (const int error = procpool::tools::install_enosys_filter(); error != 0) {
    std::fprintf(stderr, "enosys_run: could not install the seccomp filter: %s\n",
                 std::strerror(error));
    return 126;
  }
  ::execvp(argv[1], argv + 1);
  std::fprintf(stderr, "enosys_run: could not run %s: %s\n", argv[1], std::strerror(errno));
  return 127;
}
