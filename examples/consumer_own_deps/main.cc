// procpool built against the workspace's own Abseil and Cap'n Proto (see WORKSPACE). Each
// stand-in under third_party/ adds a define to everything that depends on it; procpool's headers
// reach this file only through @procpool_absl and @procpool_capnp, so the defines prove that those
// forward to the workspace's repositories.
//
//   cd examples/consumer_own_deps && bazel run //:main

#include <cstdint>
#include <cstdio>
#include <vector>

#include "absl/status/statusor.h"
#include "pair.capnp.h"
#include "procpool/procpool.h"

#if !defined(OWN_DEPS_ABSL) || !defined(OWN_DEPS_CAPNP)
#error "procpool did not use this workspace's own Abseil and Cap'n Proto"
#endif

using Pair = procpool::CapnpStruct<own_deps::Pair>;

struct Adder {
  using Job = Pair;
  using Result = int64_t;
  int64_t run(const Pair& pair) { return pair.reader().getA() + pair.reader().getB(); }
};

int main() {
  std::vector<Pair> pairs;
  int64_t want = 0;
  for (int64_t i = 0; i < 20; ++i) {
    pairs.push_back(Pair::build([&](own_deps::Pair::Builder b) {
      b.setA(i);
      b.setB(1000 * i);
    }));
    want += 1001 * i;
  }
  procpool::ProcessPool<Adder> pool({.workers = 2});
  absl::StatusOr<std::vector<int64_t>> sums = pool.map(pairs);
  if (!sums.ok()) {
    std::printf("consumer_own_deps: FAILED: %s\n", sums.status().ToString().c_str());
    return 1;
  }
  int64_t total = 0;
  for (int64_t s : *sums) total += s;
  if (total != want) {
    std::printf("consumer_own_deps: FAILED: total %lld, want %lld\n",
                static_cast<long long>(total), static_cast<long long>(want));
    return 1;
  }
  std::printf("consumer_own_deps: OK (procpool on the workspace's own Abseil and Cap'n Proto; "
              "%zu sums, total %lld)\n", sums->size(), static_cast<long long>(total));
  return 0;
}
