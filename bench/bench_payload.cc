// Large payloads: 16 MiB byte-string jobs, result = their length.
//   bench_payload payload_mib=16 payloads=16 reps=5
// Each repetition measures, back to back on the same payloads: the raw floor (one socketpair to
// one child, see raw_floor.h) and a map over a fresh pool (workers = cores, automatic chunking,
// one warm-up map of one payload per worker; fork time excluded). GiB/s of payload bytes.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "bench/raw_floor.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

struct Length {
  using Job = std::string;
  using Result = int64_t;
  int64_t run(const std::string& payload) { return static_cast<int64_t>(payload.size()); }
};

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const size_t bytes = static_cast<size_t>(args.get_int("payload_mib", 16)) << 20;
  const int count = static_cast<int>(args.get_int("payloads", 16));
  const int workers = static_cast<int>(args.get_int("workers", 0));

  std::vector<std::string> payloads;
  for (int i = 0; i < count; ++i) payloads.emplace_back(bytes, static_cast<char>('a' + i % 26));
  const double total_gib = static_cast<double>(bytes) * count / (1 << 30);

  for (int rep = 0; rep < reps; ++rep) {
    const double raw_s = raw_copy_seconds(payloads, 2);
    const double raw_gibs = total_gib / raw_s;

    procpool::ProcessPool<Length> pool({.workers = workers});
    std::vector<std::string> warmup(payloads.begin(),
                                    payloads.begin() + std::min(count, pool.workers()));
    if (!pool.map(warmup, {.chunksize = 1}).ok()) die("warm-up map");
    const int64_t start = now_ns();
    absl::StatusOr<std::vector<int64_t>> lengths = pool.map(payloads);
    const double pool_s = seconds_since(start);
    if (!lengths.ok()) die(lengths.status().ToString());
    for (int64_t length : *lengths) {
      if (length != static_cast<int64_t>(bytes)) die("wrong length");
    }
    const double pool_gibs = total_gib / pool_s;
    emit("payload", "gib_per_s", pool_gibs, "GiB/s",
         {{"raw_gib_per_s", raw_gibs}, {"ratio_to_raw", pool_gibs / raw_gibs},
          {"workers", pool.workers()}});
  }
  return 0;
}
