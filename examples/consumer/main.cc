// Consumer: procpool used from a separate Bazel workspace, with a job type from the user's own
// Cap'n Proto schema (consumer.capnp, compiled here with @procpool//bazel:capnp.bzl).
//
// CapnpStruct<consumer::Point> is an owning handle to one Point; procpool carries it to the
// worker processes and back. The worker multiplies x by y.
//
//   cd examples/consumer && bazel run //:main

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_join.h"
#include "consumer.capnp.h"
#include "procpool/procpool.h"

using Point = procpool::CapnpStruct<consumer::Point>;

struct Area {
  using Job = Point;
  using Result = int64_t;
  int64_t run(const Point& point) {
    consumer::Point::Reader p = point.reader();
    return p.getX() * p.getY();
  }
};

int main() {
  struct Case {
    int64_t x, y;
  };
  const std::vector<Case> cases = {{3, 4}, {-5, 6}, {0, 7}, {1'000'000, 3'000'000}, {-8, -9}};
  std::vector<Point> points;
  std::vector<int64_t> expected;
  for (const Case& c : cases) {
    points.push_back(Point::build([&](consumer::Point::Builder b) {
      b.setX(c.x);
      b.setY(c.y);
    }));
    expected.push_back(c.x * c.y);
  }

  procpool::ProcessPool<Area> pool({.workers = 2});
  absl::StatusOr<std::vector<int64_t>> areas = pool.map(points, {.chunksize = 1});
  if (!areas.ok()) {
    std::printf("consumer: FAILED: %s\n", areas.status().ToString().c_str());
    return 1;
  }
  if (*areas != expected) {
    std::printf("consumer: FAILED: got [%s], want [%s]\n", absl::StrJoin(*areas, ", ").c_str(),
                absl::StrJoin(expected, ", ").c_str());
    return 1;
  }
  std::printf("consumer: OK (%zu points over %d workers: x*y = [%s])\n", points.size(),
              pool.workers(), absl::StrJoin(*areas, ", ").c_str());
  return 0;
}
