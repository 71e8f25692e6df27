// main() of the suites that run against both links: a process started as a remote worker (by a
// pool of this same binary, over loopback) serves; any other runs the doctest cases.

#define DOCTEST_CONFIG_IMPLEMENT
#include "doctest/doctest.h"
#include "procpool/serve.h"

int main(int argc, char** argv) {
  if (procpool::launched_as_worker(argc, argv)) return procpool::serve(argc, argv);
  doctest::Context context(argc, argv);
  return context.run();
}
