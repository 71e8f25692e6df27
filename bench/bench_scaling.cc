// Scaling with the number of workers: a map of 1 KiB byte-string jobs (result: a checksum of the
// job) at `low` and at `high` workers, alternating, on however many cores there are:
//   bench_scaling jobs=100000 job_bytes=1024 low=2 high=8 reps=5
// With more workers than cores the work is the same and the cores are the same: throughput
// should hold. Also the parent's resident memory growth per worker: VmRSS after a warm pool of
// `high` workers minus before it, divided by `high`. Prints items/s for both, their ratio, and
// the growth.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

struct Checksum {
  using Job = std::string;
  using Result = int64_t;
  int64_t run(const std::string& job) {
    uint64_t sum = 0;
    for (unsigned char c : job) sum = sum * 31 + c;
    return static_cast<int64_t>(sum);
  }
};

double map_items_per_s(const std::vector<std::string>& jobs, int workers, double* rss_growth_mib) {
  const int64_t before_kib = proc_status_kib("VmRSS");
  procpool::ProcessPool<Checksum> pool({.workers = workers});
  std::vector<std::string> warmup(jobs.begin(), jobs.begin() + 1000);
  if (!pool.map(warmup).ok()) die("warm-up map");
  *rss_growth_mib = (proc_status_kib("VmRSS") - before_kib) / 1024.0;
  const int64_t start = now_ns();
  absl::StatusOr<std::vector<int64_t>> sums = pool.map(jobs);
  const double seconds = seconds_since(start);
  if (!sums.ok()) die(sums.status().ToString());
  Checksum check;
  for (size_t i = 0; i < jobs.size(); i += 997) {
    if ((*sums)[i] != check.run(jobs[i])) die("wrong result");
  }
  return static_cast<double>(jobs.size()) / seconds;
}

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const size_t n = static_cast<size_t>(args.get_int("jobs", 100000));
  const size_t job_bytes = static_cast<size_t>(args.get_int("job_bytes", 1024));
  const int low = static_cast<int>(args.get_int("low", 2));
  const int high = static_cast<int>(args.get_int("high", 8));

  std::vector<std::string> jobs;
  jobs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::string job(job_bytes, '\0');
    for (size_t k = 0; k < job_bytes; ++k) job[k] = static_cast<char>((i + k * 7) & 0xff);
    jobs.push_back(std::move(job));
  }
  for (int rep = 0; rep < reps; ++rep) {
    double low_growth = 0;
    double high_growth = 0;
    const double low_rate = map_items_per_s(jobs, low, &low_growth);
    const double high_rate = map_items_per_s(jobs, high, &high_growth);
    emit("scaling", "ratio_high_to_low", high_rate / low_rate, "x",
         {{"low_workers", low}, {"high_workers", high}, {"low_items_per_s", low_rate},
          {"high_items_per_s", high_rate}, {"rss_growth_per_worker_mib", high_growth / high},
          {"rss_growth_low_mib", low_growth}, {"rss_growth_high_mib", high_growth}});
  }
  return 0;
}
