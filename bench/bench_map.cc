// map of trivial int64 jobs (x*x):
//   bench_map jobs=1000000 chunksize=0 reps=5   (automatic chunking)
//   bench_map jobs=20000 chunksize=1 reps=5
//   bench_map jobs=1000000 timeout_ms=1000 reps=5 (with a task timeout: each result is published
//                                                  before the next task starts)
// Each repetition forks a fresh pool (workers = cores), warms it up with one small map, then
// times one map over all the jobs (fork time excluded); for automatic chunking, then measures the
// raw floor of the same map (raw_floor.h: packed int64 chunks of the same size over plain
// socketpairs to as many children), with a fresh result array as a map returns, and once more
// with a result array made and faulted in before the clock starts. Prints items/s per repetition.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bench/bench_util.h"
#include "bench/raw_floor.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const int64_t n = args.get_int("jobs", 1'000'000);
  const size_t chunksize = static_cast<size_t>(args.get_int("chunksize", 0));
  const int workers = static_cast<int>(args.get_int("workers", 0));
  const int64_t timeout_ms = args.get_int("timeout_ms", 0);
  procpool::CallOptions options{.chunksize = chunksize};
  if (timeout_ms > 0) options.task_timeout = absl::Milliseconds(timeout_ms);
  const std::string name = args.get("name", chunksize == 0 ? "map_auto" : "map_chunk1");

  std::vector<int64_t> jobs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) jobs[static_cast<size_t>(i)] = i;
  std::vector<int64_t> warmup(64);
  for (int i = 0; i < 64; ++i) warmup[i] = i;

  for (int rep = 0; rep < reps; ++rep) {
    procpool::ProcessPool<Squarer> pool({.workers = workers});
    if (!pool.map(warmup, {.chunksize = 1}).ok()) die("warm-up map");
    const int64_t start = now_ns();
    absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs, options);
    const double seconds = seconds_since(start);
    if (!squares.ok()) die(squares.status().ToString());
    for (int64_t i = 0; i < n; i += 9973) {
      if ((*squares)[static_cast<size_t>(i)] != i * i) die("wrong result");
    }
    const int used = pool.workers();
    std::vector<std::pair<std::string, double>> extras = {{"seconds", seconds}, {"workers", used}};
    if (timeout_ms > 0) extras.emplace_back("timeout_ms", static_cast<double>(timeout_ms));
    if (chunksize == 0) {
      // The floor of the automatic map (with chunksize 1 the same one-in-flight protocol is no
      // floor: procpool pipelines single tasks better).
      const size_t parts = static_cast<size_t>(used) * 4;
      const size_t chunk = (jobs.size() + parts - 1) / parts;
      extras.emplace_back("raw_items_per_s", raw_map_items_per_s(jobs, used, chunk));
      extras.emplace_back("raw_prefaulted_items_per_s",
                          raw_map_items_per_s(jobs, used, chunk, /*fresh_results=*/false));
    }
    emit(name, "items_per_s", static_cast<double>(n) / seconds, "items/s", extras);
  }
  return 0;
}
