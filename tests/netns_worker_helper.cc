// The worker program of tests/netns_test.cc: procpool::serve<NetnsWorker>, started by the test
// inside a network namespace (`ip netns exec`), as a cluster engine starts one on another host.

#include "procpool/serve.h"
#include "tests/netns_worker.h"

int main(int argc, char** argv) { return procpool::serve<procpool::testing::NetnsWorker>(argc, argv); }
