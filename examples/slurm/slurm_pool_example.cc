// A pool whose workers are Slurm job steps: this one program is both the pool's parent and its
// workers (run_pool.sbatch runs it both ways).
//
//   slurm_pool_example --workers=N [--jobs=M] [--listen=HOST:PORT] [--address-file=F]
//       the parent. Without --address-file it launches each worker itself, one
//       `srun -n1 --exact --export=ALL slurm_pool_example --procpool-connect={address}` step per
//       worker (replacements included). With --address-file it writes the address to dial there
//       and waits for workers started by someone else (an `srun -n N` step of the batch script).
//   slurm_pool_example --procpool-connect=HOST:PORT
//       a worker (what srun runs): serves the pool until it closes the connection.
//
// The token is PROCPOOL_TOKEN, from the environment (run_pool.sbatch makes one per job).

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "procpool/procpool.h"

namespace {

// Some work per job: a few thousand rounds of a hash, and which host did it.
struct Hasher {
  using Job = int64_t;
  using Result = uint64_t;
  uint64_t run(int64_t job) {
    uint64_t h = static_cast<uint64_t>(job) * 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < 20000; ++i) h = (h ^ (h >> 31)) * 0xbf58476d1ce4e5b9ull;
    return h;
  }
};

std::string flag(int argc, char** argv, const char* name, std::string fallback) {
  const std::string prefix = absl::StrCat("--", name, "=");
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return argv[i] + prefix.size();
  }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  if (procpool::launched_as_worker(argc, argv)) return procpool::serve<Hasher>(argc, argv);

  int workers = 4;
  int64_t jobs_count = 10000;
  (void)absl::SimpleAtoi(flag(argc, argv, "workers", "4"), &workers);
  (void)absl::SimpleAtoi(flag(argc, argv, "jobs", "10000"), &jobs_count);
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::string listen = flag(argc, argv, "listen", absl::StrCat(host, ":0"));
  const std::string address_file = flag(argc, argv, "address-file", "");
  const char* token = std::getenv("PROCPOOL_TOKEN");
  if (token == nullptr || *token == '\0') {
    std::fprintf(stderr, "slurm_pool_example: set PROCPOOL_TOKEN (run_pool.sbatch makes one)\n");
    return 2;
  }

  procpool::RemoteOptions remote{.listen = listen, .token = token};
  if (address_file.empty()) {
    const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
    remote.launch = {"srun", "-n1", "--exact", "--export=ALL", self, "--procpool-connect={address}"};
  }
  procpool::ProcessPool<Hasher> pool({.workers = workers, .remote = remote});
  if (!address_file.empty()) {
    std::ofstream(address_file + ".tmp") << pool.remote_address() << "\n";
    std::filesystem::rename(address_file + ".tmp", address_file);
  }
  std::printf("pool: %d workers dial %s\n", workers, pool.remote_address().c_str());

  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < jobs_count; ++i) jobs.push_back(i);
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<uint64_t>> hashes = pool.map(jobs);
  const absl::Duration took = absl::Now() - start;
  if (!hashes.ok()) {
    std::fprintf(stderr, "map failed: %s\n", hashes.status().ToString().c_str());
    return 1;
  }
  uint64_t folded = 0;
  for (uint64_t h : *hashes) folded ^= h;
  std::printf("mapped %lld jobs in %s over %d remote workers; fold %016llx\n",
              static_cast<long long>(jobs_count), absl::FormatDuration(took).c_str(), workers,
              static_cast<unsigned long long>(folded));
  if (absl::Status closed = pool.close(); !closed.ok()) return 1;
  const absl::Status joined = pool.join();
  std::printf("join: %s\n", joined.ToString().c_str());
  return joined.ok() ? 0 : 1;
}
