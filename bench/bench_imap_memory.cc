// Parent memory while imap consumes a lazy input of 10,000,000 items (std::views::iota: nothing
// is materialized):
//   bench_imap_memory items=10000000 chunksize=1000 reps=3 max_seconds=45 [unordered=1]
// Each repetition forks a fresh pool (workers = cores), warms it up, records the parent's RSS
// (VmRSS) and resets its peak (VmHWM, via /proc/self/clear_refs), runs the whole imap, reading
// and summing every result, then reads the peak. Prints peak - start in MiB, with both. A
// repetition still running after max_seconds stops early (leaving the loop cancels the rest) and
// is reported with "complete": 0; no further repetition runs then.

#include <cstdint>
#include <ranges>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

int main(int argc, char** argv) {
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 3));
  const int64_t items = args.get_int("items", 10'000'000);
  const size_t chunksize = static_cast<size_t>(args.get_int("chunksize", 1000));
  const size_t max_in_flight = static_cast<size_t>(args.get_int("max_in_flight", 0));
  const int workers = static_cast<int>(args.get_int("workers", 0));
  const double max_seconds = static_cast<double>(args.get_int("max_seconds", 0));
  const bool unordered = args.get_int("unordered", 0) != 0;

  for (int rep = 0; rep < reps; ++rep) {
    procpool::ProcessPool<Squarer> pool({.workers = workers});
    for (auto warm : pool.imap(std::views::iota(int64_t{0}, int64_t{64}))) {
      if (!warm.ok()) die("warm-up imap");
    }
    const int64_t start_kib = proc_status_kib("VmRSS");
    if (!reset_peak_rss()) die("cannot reset the peak RSS (/proc/self/clear_refs)");
    const int64_t start = now_ns();
    int64_t count = 0;
    uint64_t sum = 0;
    auto consume = [&](auto&& results) {
      for (absl::StatusOr<int64_t> square : results) {
        if (!square.ok()) die(square.status().ToString());
        if (!unordered && *square != count * count) die("wrong result or order");
        sum += static_cast<uint64_t>(*square);
        ++count;
        if (max_seconds > 0 && (count & 0xffff) == 0 && seconds_since(start) > max_seconds) break;
      }
    };
    const procpool::CallOptions options{.chunksize = chunksize, .max_in_flight = max_in_flight};
    if (unordered) {
      consume(pool.imap_unordered(std::views::iota(int64_t{0}, items), options));
    } else {
      consume(pool.imap(std::views::iota(int64_t{0}, items), options));
    }
    // Every square once: the sum of i^2 for i < items.
    const unsigned __int128 n = static_cast<unsigned __int128>(items);
    if (count == items && sum != static_cast<uint64_t>((n - 1) * n * (2 * n - 1) / 6)) {
      die("wrong sum of results");
    }
    const double seconds = seconds_since(start);
    const int64_t peak_kib = proc_status_kib("VmHWM");
    const bool complete = count == items;
    if (!complete && !(max_seconds > 0 && seconds >= max_seconds)) {
      die("imap yielded the wrong number of results");
    }
    emit(unordered ? "imap_unordered_memory" : "imap_memory", "peak_minus_start_mib", (peak_kib - start_kib) / 1024.0, "MiB",
         {{"start_mib", start_kib / 1024.0}, {"peak_mib", peak_kib / 1024.0},
          {"seconds", seconds}, {"items_per_s", count / seconds}, {"items_done", double(count)},
          {"complete", complete ? 1.0 : 0.0}, {"workers", pool.workers()}});
    if (!complete) break;
  }
  return 0;
}
