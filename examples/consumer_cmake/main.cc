// Consumer (CMake): procpool used from a separate CMake project through find_package(procpool),
// against an installed procpool. Squares 0..99 in two worker processes with ProcessPool::map and
// checks every result; also checks that the installed headers' version (procpool/version.h) is the
// version the build system that found them reports (PROCPOOL_EXPECTED_VERSION: the CMake package's
// version here; tools/test.sh also builds this file with `pkg-config --cflags --libs procpool` and
// passes `pkg-config --modversion procpool`).

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "absl/status/statusor.h"
#include "procpool/procpool.h"

struct Squarer {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t x) { return x * x; }
};

int main() {
#ifdef PROCPOOL_EXPECTED_VERSION
  if (std::strcmp(PROCPOOL_VERSION_STRING, PROCPOOL_EXPECTED_VERSION) != 0) {
    std::printf("consumer_cmake: FAILED: procpool/version.h says %s, the package %s\n",
                PROCPOOL_VERSION_STRING, PROCPOOL_EXPECTED_VERSION);
    return 1;
  }
#endif
  std::vector<int64_t> jobs;
  std::vector<int64_t> expected;
  for (int64_t i = 0; i < 100; ++i) {
    jobs.push_back(i);
    expected.push_back(i * i);
  }

  procpool::ProcessPool<Squarer> pool({.workers = 2});
  absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
  if (!squares.ok()) {
    std::printf("consumer_cmake: FAILED: %s\n", squares.status().ToString().c_str());
    return 1;
  }
  if (*squares != expected) {
    std::printf("consumer_cmake: FAILED: wrong squares\n");
    return 1;
  }
  std::printf("consumer_cmake: OK (procpool %s, %zu squares over %d workers, 99^2 = %lld)\n",
              PROCPOOL_VERSION_STRING, squares->size(), pool.workers(),
              static_cast<long long>(squares->back()));
  return 0;
}
