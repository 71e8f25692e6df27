// Large payloads: 16 MiB byte-string jobs.
//   bench_payload payload_mib=16 payloads=16 reps=5 [kind=string|bytes]
// kind=string: std::string jobs, result = their length (the worker gets its own copy of each).
// kind=bytes:  procpool::Bytes jobs borrowed from the same strings; the worker reads one byte of
//              every 4 KiB page of its payload where it lies (a view, no copy) and returns their
//              sum.
// Each repetition measures, back to back on the same payloads: the raw floor (one socketpair to one
// child, see raw_floor.h), a memcpy of every payload into one reused buffer (what moving them
// through memory once costs), and a map over a fresh pool (workers = cores, automatic chunking,
// one warm-up map of one payload per worker; fork time excluded). GiB/s of payload bytes.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
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

// One byte of every page, read where the payload lies.
int64_t page_sum(const char* data, size_t size) {
  int64_t sum = 0;
  for (size_t i = 0; i < size; i += 4096) sum += static_cast<unsigned char>(data[i]);
  return sum;
}

struct PageReader {
  using Job = procpool::Bytes;
  using Result = int64_t;
  int64_t run(const procpool::Bytes& payload) { return page_sum(payload.data(), payload.size()); }
};

double memcpy_seconds(const std::vector<std::string>& payloads) {
  size_t largest = 0;
  for (const std::string& p : payloads) largest = std::max(largest, p.size());
  std::unique_ptr<char[]> buffer(new char[largest]);
  std::memset(buffer.get(), 0, largest);  // reused and faulted in, as the raw floor's
  const int64_t start = now_ns();
  for (const std::string& p : payloads) {
    std::memcpy(buffer.get(), p.data(), p.size());
    asm volatile("" : : "r"(buffer.get()) : "memory");  // the copy happens, and each one
  }
  return (now_ns() - start) / 1e9;
}

template <typename Worker, typename Jobs, typename Check>
double pool_seconds(const Jobs& jobs, int workers, int count, int* used, Check check) {
  procpool::ProcessPool<Worker> pool({.workers = workers});
  *used = pool.workers();
  Jobs warmup(jobs.begin(), jobs.begin() + std::min(count, pool.workers()));
  if (!pool.map(warmup, {.chunksize = 1}).ok()) die("warm-up map");
  const int64_t start = now_ns();
  absl::StatusOr<std::vector<int64_t>> results = pool.map(jobs);
  const double seconds = seconds_since(start);
  if (!results.ok()) die(results.status().ToString());
  for (size_t i = 0; i < results->size(); ++i) {
    if (!check(i, (*results)[i])) die("wrong result");
  }
  return seconds;
}

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 5));
  const size_t bytes = static_cast<size_t>(args.get_int("payload_mib", 16)) << 20;
  const int count = static_cast<int>(args.get_int("payloads", 16));
  const int workers = static_cast<int>(args.get_int("workers", 0));
  const std::string kind = args.get("kind", "string");
  if (kind != "string" && kind != "bytes") die("kind is string or bytes");

  std::vector<std::string> payloads;
  for (int i = 0; i < count; ++i) payloads.emplace_back(bytes, static_cast<char>('a' + i % 26));
  std::vector<procpool::Bytes> views;
  for (const std::string& p : payloads) views.push_back(procpool::Bytes::borrow(p));
  const double total_gib = static_cast<double>(bytes) * count / (1 << 30);

  for (int rep = 0; rep < reps; ++rep) {
    const double raw_gibs = total_gib / raw_copy_seconds(payloads, 2);
    const double memcpy_gibs = total_gib / memcpy_seconds(payloads);
    int used = 0;
    double pool_s = 0;
    if (kind == "string") {
      pool_s = pool_seconds<Length>(payloads, workers, count, &used, [&](size_t, int64_t length) {
        return length == static_cast<int64_t>(bytes);
      });
    } else {
      pool_s = pool_seconds<PageReader>(views, workers, count, &used, [&](size_t i, int64_t sum) {
        return sum == page_sum(payloads[i].data(), payloads[i].size());
      });
    }
    const double pool_gibs = total_gib / pool_s;
    emit(kind == "string" ? "payload" : "payload_bytes", "gib_per_s", pool_gibs, "GiB/s",
         {{"raw_gib_per_s", raw_gibs}, {"ratio_to_raw", pool_gibs / raw_gibs},
          {"memcpy_gib_per_s", memcpy_gibs}, {"ratio_to_memcpy", pool_gibs / memcpy_gibs},
          {"workers", used}});
  }
  return 0;
}
