// The physical floors procpool is compared against, measured with nothing but a socketpair
// between this process and one forked child: a 16-byte ping-pong (the least a round trip to
// another process costs) and a bulk copy of payloads (what moving bytes to another process costs
// when they cross a socket: one copy into the kernel, one out).

#ifndef PROCPOOL_BENCH_RAW_FLOOR_H_
#define PROCPOOL_BENCH_RAW_FLOOR_H_

#include <cstdint>
#include <string>
#include <vector>

namespace procpool_bench {

// Microseconds per 16-byte round trip (write 16 bytes, the child reads them and writes 16 back,
// read them), over `iters` round trips after `warmup` untimed ones. The child is forked before
// the clock starts.
double raw_pingpong_us(int64_t iters, int64_t warmup);

// Seconds to send every payload to a child, one after the other, each as an 8-byte length and
// its bytes; the child reads each whole payload into one reused buffer and answers with its
// length (8 bytes), which is awaited before the next is sent. `warmup` payloads (the first ones,
// cycled) go first, untimed. The child is forked before the clock starts.
double raw_copy_seconds(const std::vector<std::string>& payloads, int warmup);

// Items per second of the least a process pool's map of int64 jobs (x*x) can cost: `workers`
// children forked before the clock starts, each sent chunks of `chunk` jobs as packed int64
// arrays (8-byte count, then the values) over its own socketpair, one chunk in flight per child
// (blocking sockets); a child squares a chunk in place and sends it back, and the parent stores each
// result at its index. With `fresh_results` the result array is made within the timing, as a
// map's must be; else before it, its pages already faulted in. `jobs` must outlive the call;
// results are checked.
double raw_map_items_per_s(const std::vector<int64_t>& jobs, int workers, size_t chunk,
                           bool fresh_results = true);

// Milliseconds to fork `children` children that exit at once, and reap them all: the floor of a
// pool's start + join.
double raw_fork_ms(int children);

}  // namespace procpool_bench

#endif  // PROCPOOL_BENCH_RAW_FLOOR_H_
