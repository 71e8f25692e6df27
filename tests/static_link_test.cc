// The --config=static build (.bazelrc, deps.bzl): Abseil and Cap'n Proto are linked from their
// static archives, so no libabsl_*, libcapnp* or libkj* shared object is mapped into the process,
// and a pool works as in the default build. Built by tools/test.sh with --config=static; in the
// default build the same test checks the opposite, so a config that silently did nothing fails.

#include "procpool/process_pool.h"

#include <fstream>
#include <string>
#include <vector>

#include "doctest/doctest.h"

namespace procpool {
namespace {

// Shared objects of Abseil and Cap'n Proto mapped into this process.
std::vector<std::string> mapped_dependency_objects() {
  std::vector<std::string> found;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    for (const char* name : {"libabsl_", "libcapnp", "libkj"}) {
      if (line.find(name) != std::string::npos && line.find(".so") != std::string::npos) {
        found.push_back(line);
        break;
      }
    }
  }
  return found;
}

struct Squarer {
  int64_t run(int64_t x) { return x * x; }
};

TEST_CASE("the static build maps no Abseil or Cap'n Proto shared object, and pools work") {
  const std::vector<std::string> objects = mapped_dependency_objects();
#if PROCPOOL_EXPECT_STATIC
  for (const std::string& line : objects) MESSAGE("mapped: ", line);
  CHECK(objects.empty());
#else
  CHECK_FALSE(objects.empty());
#endif
  ProcessPool<Squarer> pool({.workers = 2, .log_sink = nullptr});
  std::vector<int64_t> jobs = {1, 2, 3, 4};
  auto squares = pool.map(jobs);
  REQUIRE(squares.ok());
  CHECK(*squares == std::vector<int64_t>{1, 4, 9, 16});
  CHECK(pool.close().ok());
  CHECK(pool.join().ok());
}

}  // namespace
}  // namespace procpool
