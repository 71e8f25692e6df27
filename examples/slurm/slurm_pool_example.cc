// A pool whose workers are Slurm job steps: this one program is both the pool's parent and its
// workers (run_pool.sbatch runs it both ways).
//
//   slurm_pool_example --workers=N [--jobs=M] [--listen=HOST:PORT] [--address-file=F]
//                      [--status-file=S] [--connect-timeout=SECONDS]
//       the parent. Without --address-file it launches each worker itself, one
//       `srun -n1 --exact --export=ALL slurm_pool_example --procpool-connect={address}` step per
//       worker (replacements included). With --address-file it writes the address to dial there
//       and takes the workers that dial in, started by someone else (`srun` steps of the batch
//       script), up to N at a time: a worker whose step ends (scancel --signal=TERM, its time
//       limit) drains and leaves, and its place waits for the next worker to dial in, for up to
//       --connect-timeout seconds at a time (60 by default). It prints each change of its
//       connected workers, and at the end how many tasks each step ran; with --status-file it also
//       keeps the number of connected workers in S (for a script to wait on).
//   slurm_pool_example --procpool-connect=HOST:PORT
//       a worker (what srun runs): serves the pool until it closes the connection, or drains and
//       leaves on SIGTERM.
//
// The token is PROCPOOL_TOKEN, from the environment (run_pool.sbatch makes one per job).

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "procpool/procpool.h"

namespace {

std::string host_name() {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}

// Some work per job (a few thousand rounds of a hash), and which worker did it: its host and its
// Slurm job step, for the parent's count of tasks per step.
struct Hasher {
  using Job = int64_t;
  using Result = std::pair<uint64_t, std::string>;  // the hash, and "HOST step STEP"
  Hasher() {
    const char* step = std::getenv("SLURM_STEP_ID");
    where = absl::StrCat(host_name(), " step ", step != nullptr ? step : "-");
  }
  Result run(int64_t job) {
    uint64_t h = static_cast<uint64_t>(job) * 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < 20000; ++i) h = (h ^ (h >> 31)) * 0xbf58476d1ce4e5b9ull;
    return {h, where};
  }
  std::string where;
};

std::string flag(int argc, char** argv, const char* name, std::string fallback) {
  const std::string prefix = absl::StrCat("--", name, "=");
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return argv[i] + prefix.size();
  }
  return fallback;
}

// Writes `text` to `path` whole (a reader never sees half of it).
void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path + ".tmp") << text;
  std::filesystem::rename(path + ".tmp", path);
}

// The workers connected now (started and not gone: idle, busy or leaving), as "slot: host pid".
std::vector<std::string> connected_workers(const procpool::PoolStats& stats) {
  std::vector<std::string> connected;
  for (const procpool::WorkerStats& w : stats.workers) {
    if (w.state == procpool::WorkerState::kIdle || w.state == procpool::WorkerState::kBusy ||
        w.state == procpool::WorkerState::kExiting) {
      connected.push_back(absl::StrCat(w.slot, ": ", w.host, " pid ", w.pid,
                                       w.state == procpool::WorkerState::kExiting ? " (leaving)" : ""));
    }
  }
  return connected;
}

std::string per_step(const std::map<std::string, int64_t>& tasks) {
  std::vector<std::string> parts;
  for (const auto& [where, count] : tasks) parts.push_back(absl::StrCat(where, ": ", count));
  return parts.empty() ? "none yet" : absl::StrJoin(parts, ", ");
}

}  // namespace

int main(int argc, char** argv) {
  if (procpool::launched_as_worker(argc, argv)) return procpool::serve<Hasher>(argc, argv);

  int workers = 4;
  int64_t jobs_count = 10000;
  int connect_timeout_s = 60;
  (void)absl::SimpleAtoi(flag(argc, argv, "workers", "4"), &workers);
  (void)absl::SimpleAtoi(flag(argc, argv, "jobs", "10000"), &jobs_count);
  (void)absl::SimpleAtoi(flag(argc, argv, "connect-timeout", "60"), &connect_timeout_s);
  const std::string listen = flag(argc, argv, "listen", absl::StrCat(host_name(), ":0"));
  const std::string address_file = flag(argc, argv, "address-file", "");
  const std::string status_file = flag(argc, argv, "status-file", "");
  const char* token = std::getenv("PROCPOOL_TOKEN");
  if (token == nullptr || *token == '\0') {
    std::fprintf(stderr, "slurm_pool_example: set PROCPOOL_TOKEN (run_pool.sbatch makes one)\n");
    return 2;
  }

  procpool::RemoteOptions remote{.listen = listen,
                                 .token = token,
                                 .connect_timeout = absl::Seconds(connect_timeout_s)};
  if (address_file.empty()) {
    const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
    remote.launch = {"srun", "-n1", "--exact", "--export=ALL", self, "--procpool-connect={address}"};
  }
  procpool::ProcessPool<Hasher> pool({.workers = workers, .remote = remote});
  if (!status_file.empty()) write_file(status_file, "0\n");
  if (!address_file.empty()) write_file(address_file, pool.remote_address() + "\n");
  std::printf("pool: up to %d workers dial %s\n", workers, pool.remote_address().c_str());
  std::fflush(stdout);

  // Results as they come, so that the parent shows the pool growing and shrinking while it works:
  // each change of its connected workers, with how many tasks each step has run so far.
  const absl::Time start = absl::Now();
  std::map<std::string, int64_t> tasks_by_step;
  std::vector<std::string> last_connected;
  int64_t failed = 0;
  uint64_t folded = 0;
  absl::Time next_look = start;
  auto look = [&] {
    std::vector<std::string> connected = connected_workers(pool.stats());
    if (connected == last_connected) return;
    last_connected = std::move(connected);
    std::printf("+%.1fs workers connected: %zu [%s]; tasks by step so far: %s\n",
                absl::ToDoubleSeconds(absl::Now() - start), last_connected.size(),
                absl::StrJoin(last_connected, ", ").c_str(), per_step(tasks_by_step).c_str());
    std::fflush(stdout);
    if (!status_file.empty()) write_file(status_file, absl::StrCat(last_connected.size(), "\n"));
  };
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < jobs_count; ++i) jobs.push_back(i);
  for (absl::StatusOr<Hasher::Result> hashed : pool.imap_unordered(jobs, {.chunksize = 16})) {
    if (hashed.ok()) {
      folded ^= hashed->first;
      ++tasks_by_step[hashed->second];
    } else {
      if (++failed <= 5) std::fprintf(stderr, "a task failed: %s\n", hashed.status().ToString().c_str());
    }
    if (absl::Now() >= next_look) {
      look();
      next_look = absl::Now() + absl::Milliseconds(100);
    }
  }
  look();
  const absl::Duration took = absl::Now() - start;
  std::printf("mapped %lld jobs in %s, %lld failed; tasks by step: %s; fold %016llx\n",
              static_cast<long long>(jobs_count), absl::FormatDuration(took).c_str(),
              static_cast<long long>(failed), per_step(tasks_by_step).c_str(),
              static_cast<unsigned long long>(folded));
  if (absl::Status closed = pool.close(); !closed.ok()) return 1;
  const absl::Status joined = pool.join();
  std::printf("join: %s\n", joined.ToString().c_str());
  return joined.ok() && failed == 0 ? 0 : 1;
}
