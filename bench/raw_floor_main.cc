// The raw floors on their own:
//   bazel run -c opt //bench:raw_floor -- reps=5 iters=20000 payload_mib=16 payloads=16
// One JSON line per repetition and floor.

#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "bench/raw_floor.h"

using namespace procpool_bench;

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const int64_t iters = args.get_int("iters", 20000);
  const size_t payload_bytes = static_cast<size_t>(args.get_int("payload_mib", 16)) << 20;
  const int payload_count = static_cast<int>(args.get_int("payloads", 16));

  std::vector<std::string> payloads;
  for (int i = 0; i < payload_count; ++i) payloads.emplace_back(payload_bytes, static_cast<char>('a' + i % 26));
  for (int rep = 0; rep < reps; ++rep) {
    emit("raw_pingpong", "us_per_round_trip", raw_pingpong_us(iters, iters / 10), "us");
    const double seconds = raw_copy_seconds(payloads, 2);
    emit("raw_copy", "gib_per_s",
         static_cast<double>(payload_bytes) * payload_count / seconds / (1 << 30), "GiB/s");
  }
  return 0;
}
