// Quickstart: the smallest complete use of procpool.
//
// A worker class says what one job is (Job), what it gives back (Result) and how (run). A
// ProcessPool<Squarer> forks four worker processes, each with its own Squarer; map() sends them
// the jobs and returns the results in job order, or the first failure as an absl::Status.
//
//   bazel run //examples/quickstart

#include <cstdint>
#include <iostream>
#include <vector>

#include "absl/status/statusor.h"
#include "procpool/procpool.h"

struct Squarer {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t x) { return x * x; }
};

int main() {
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 10; ++i) jobs.push_back(i);

  procpool::ProcessPool<Squarer> pool({.workers = 4});
  absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
  if (!squares.ok()) {
    std::cerr << "map failed: " << squares.status() << "\n";
    return 1;
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    std::cout << jobs[i] << "^2 = " << (*squares)[i] << "\n";
  }
  return 0;
}  // ~ProcessPool: close() then join(); every worker has exited here
