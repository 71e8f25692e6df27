// CPU-bound scaling: 200 jobs, each hashing its string 2,000 times in a chain with SHA-512
// (OpenSSL's libcrypto): h = SHA512(job); then h = SHA512(h), 1,999 more times; result = h.
//   bench_cpu jobs=200 rounds=2000 reps=5
// Each repetition times the same work once in this process (serial) and once through a fresh
// pool with workers = cores (map, automatic chunking; fork time excluded), and prints both and
// the speedup serial / pool, and how many of the jobs the busiest worker ran.

#include <openssl/sha.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "bench/bench_util.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

std::string hash_chain(const std::string& input, int rounds) {
  unsigned char digest[SHA512_DIGEST_LENGTH];
  SHA512(reinterpret_cast<const unsigned char*>(input.data()), input.size(), digest);
  for (int i = 1; i < rounds; ++i) SHA512(digest, sizeof(digest), digest);
  return std::string(reinterpret_cast<const char*>(digest), sizeof(digest));
}

struct Hasher {
  using Job = std::string;
  using Result = std::string;
  int rounds = 2000;
  std::string run(const std::string& job) { return hash_chain(job, rounds); }
};

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const int n = static_cast<int>(args.get_int("jobs", 200));
  const int rounds = static_cast<int>(args.get_int("rounds", 2000));
  const int workers = static_cast<int>(args.get_int("workers", 0));

  std::vector<std::string> jobs;
  for (int i = 0; i < n; ++i) jobs.push_back("procpool-job-" + std::to_string(i));

  for (int rep = 0; rep < reps; ++rep) {
    int64_t start = now_ns();
    std::vector<std::string> serial;
    serial.reserve(jobs.size());
    for (const std::string& job : jobs) serial.push_back(hash_chain(job, rounds));
    const double serial_s = seconds_since(start);

    procpool::ProcessPool<Hasher> pool({.workers = workers}, [rounds] { return Hasher{rounds}; });
    std::vector<std::string> warmup(static_cast<size_t>(pool.workers()), "warm-up");
    if (!pool.map(warmup, {.chunksize = 1}).ok()) die("warm-up map");
    std::vector<int64_t> done_before;
    for (const procpool::WorkerStats& worker : pool.stats().workers) {
      done_before.push_back(worker.tasks_done);
    }
    start = now_ns();
    absl::StatusOr<std::vector<std::string>> parallel = pool.map(jobs);
    const double pool_s = seconds_since(start);
    // How evenly the jobs were spread: the busiest worker's share of them (1/workers is even).
    int64_t busiest = 0;
    const procpool::PoolStats stats = pool.stats();
    for (size_t i = 0; i < stats.workers.size() && i < done_before.size(); ++i) {
      busiest = std::max(busiest, stats.workers[i].tasks_done - done_before[i]);
    }
    if (!parallel.ok()) die(parallel.status().ToString());
    if (*parallel != serial) die("the pool's hashes differ from the serial ones");
    // The first 16 hex digits of job 0's final digest, to check that Python did the same work.
    const double check = static_cast<double>(
        std::stoull(absl::BytesToHexString(serial[0].substr(0, 6)), nullptr, 16));
    emit("cpu_sha512", "speedup", serial_s / pool_s, "x",
         {{"serial_s", serial_s}, {"pool_s", pool_s}, {"workers", pool.workers()},
          {"check", check}, {"busiest_worker_jobs", static_cast<double>(busiest)}});
  }
  return 0;
}
