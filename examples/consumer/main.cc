// PLACEHOLDER: checks that a separate workspace can build and link against @procpool//:procpool.
// To be replaced by a real example using include/procpool/*.h.
#include <capnp/message.h>

#include <cstdio>

#include "consumer.capnp.h"
#include "procpool_smoke.h"  // placeholder header from @procpool//bazel/smoke

int main() {
  capnp::MallocMessageBuilder builder;
  auto p = builder.initRoot<consumer::Point>();
  p.setX(3);
  p.setY(4);
  auto r = procpool_smoke::RoundTrip(p.getX() * p.getY());
  if (!r.ok() || *r != 12) {
    std::printf("consumer: FAILED\n");
    return 1;
  }
  std::printf("consumer: OK (%s)\n", procpool_smoke::Describe(*r).c_str());
  return 0;
}
