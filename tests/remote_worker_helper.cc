// A remote worker program for the remote tests: procpool::serve<RemoteWorker>, or, with
// --type=other, a program serving another type (which the pool must refuse).

#include <cstring>

#include "procpool/serve.h"
#include "tests/remote_worker.h"

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--type=other") == 0) {
      return procpool::serve<procpool::testing::OtherRemoteWorker>(argc, argv);
    }
  }
  return procpool::serve<procpool::testing::RemoteWorker>(argc, argv);
}
