// Helpers shared by the procpool benchmarks: a monotonic clock, key=value arguments, one JSON
// line per measurement on stdout (read by bench/run.py), and the process's resident memory.

#ifndef PROCPOOL_BENCH_BENCH_UTIL_H_
#define PROCPOOL_BENCH_BENCH_UTIL_H_

#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace procpool_bench {

// The trivial worker of the map benchmarks: x*x over int64 jobs.
struct Squarer {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t x) { return x * x; }
};

inline int64_t now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

inline double seconds_since(int64_t start_ns) { return (now_ns() - start_ns) / 1e9; }

// The CPUs this process may run on (what procpool's workers = 0 means).
inline int cpu_count() {
  cpu_set_t set;
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN));
}

// Arguments of the form key=value (a leading "--" is allowed).
class Args {
 public:
  Args(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg.rfind("--", 0) == 0) arg = arg.substr(2);
      size_t eq = arg.find('=');
      if (eq == std::string::npos) {
        values_[arg] = "1";
      } else {
        values_[arg.substr(0, eq)] = arg.substr(eq + 1);
      }
    }
  }
  int64_t get_int(const std::string& key, int64_t fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : std::strtoll(it->second.c_str(), nullptr, 10);
  }
  std::string get(const std::string& key, const std::string& fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : it->second;
  }

 private:
  std::map<std::string, std::string> values_;
};

// One measurement as a JSON line: {"bench": ..., "metric": ..., "value": ..., "unit": ..., extras}.
// Numeric extras only; flushed at once so the runner sees it even if a later step crashes.
inline void emit(const std::string& bench, const std::string& metric, double value,
                 const std::string& unit,
                 const std::vector<std::pair<std::string, double>>& extras = {}) {
  std::string line = "{\"bench\": \"" + bench + "\", \"metric\": \"" + metric +
                     "\", \"value\": " + std::to_string(value) + ", \"unit\": \"" + unit + "\"";
  char buf[64];
  for (const auto& [key, number] : extras) {
    std::snprintf(buf, sizeof(buf), "%.17g", number);
    line += ", \"" + key + "\": " + buf;
  }
  line += "}\n";
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fflush(stdout);
}

// A field of /proc/self/status in KiB ("VmRSS", "VmHWM"), or -1.
inline int64_t proc_status_kib(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(field);
  while (std::getline(status, line)) {
    if (line.compare(0, n, field) == 0 && line.size() > n && line[n] == ':') {
      return std::strtoll(line.c_str() + n + 1, nullptr, 10);
    }
  }
  return -1;
}

// Resets VmHWM (the peak resident size) to the current size (Linux >= 4.0).
inline bool reset_peak_rss() {
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  bool ok = std::fputs("5", f) >= 0;
  ok = (std::fclose(f) == 0) && ok;
  return ok;
}

[[noreturn]] inline void die(const std::string& what) {
  std::fprintf(stderr, "benchmark failed: %s\n", what.c_str());
  std::exit(2);
}

}  // namespace procpool_bench

#endif  // PROCPOOL_BENCH_BENCH_UTIL_H_
