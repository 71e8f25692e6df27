// A remote worker program for the remote tests: procpool::serve<RemoteWorker>, or, with
// --type=other, a program serving another type (which the pool must refuse), or, with
// --hello-version=N, a worker of protocol version N: it sends its hello (with the launch id the
// pool gave it, as every version does) and prints what the pool answered.

#include <grp.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "lib/common/socket.h"
#include "lib/link/handshake.h"
#include "lib/link/remote_frames.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/tls_channel.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/serve.h"
#include "tests/remote_worker.h"

namespace {

// Returns 2 when the pool refused the hello (as serve() does), 1 otherwise.
int hello_of_version(uint32_t version) {
  using namespace procpool::internal;
  const char* connect = std::getenv("PROCPOOL_CONNECT");
  absl::StatusOr<HostPort> address = parse_host_port(connect != nullptr ? connect : "");
  if (!address.ok()) return 1;
  absl::StatusOr<UniqueFd> socket = connect_tcp(*address, absl::Seconds(10));
  if (!socket.ok()) return 1;
  // TLS keyed by the token, as serve() speaks it.
  const char* token = std::getenv("PROCPOOL_TOKEN");
  absl::StatusOr<std::shared_ptr<TlsContext>> tls =
      TlsContext::with_token(token != nullptr ? token : "", TlsContext::Role::kClient);
  if (!tls.ok()) return 1;
  absl::StatusOr<std::unique_ptr<TlsChannel>> channel = TlsChannel::open(*tls, *std::move(socket));
  if (!channel.ok() || !(*channel)->handshake_within(absl::Now() + absl::Seconds(10)).ok()) return 1;
  capnp::MallocMessageBuilder message;
  auto hello = message.initRoot<procpool::wire::FromWorker>().initHello();
  hello.setVersion(version);
  const std::string nonce = make_nonce();
  hello.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(nonce.data()), nonce.size()));
  if (const char* id = std::getenv("PROCPOOL_LAUNCH_ID")) hello.setLaunchId(id);
  if (!write_frame(**channel, message).ok()) return 1;
  FrameReader reader(kHandshakeFrameBytes);
  auto answer = read_frame_within(**channel, reader, absl::Now() + absl::Seconds(20));
  if (!answer.ok()) return 1;
  capnp::FlatArrayMessageReader reply(*answer);
  auto root = reply.getRoot<procpool::wire::ToWorker>();
  if (!root.isRefused()) return 1;
  const std::string line = absl::StrCat("refused: ", root.getRefused().cStr(), "\n");
  (void)!::write(STDERR_FILENO, line.data(), line.size());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (std::getenv("REMOTE_RUN_AS_NOBODY") != nullptr) {
    // Started as root by the test: runs on as an ordinary user would, dumpable as any program
    // (a change of uid leaves a process undumpable).
    if (::setgroups(0, nullptr) != 0 || ::setresgid(procpool::testing::kNobody, procpool::testing::kNobody,
                                                   procpool::testing::kNobody) != 0 ||
        ::setresuid(procpool::testing::kNobody, procpool::testing::kNobody, procpool::testing::kNobody) != 0) {
      return 3;
    }
    ::prctl(PR_SET_DUMPABLE, 1);
  }
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--type=other") == 0) {
      return procpool::serve<procpool::testing::OtherRemoteWorker>(argc, argv);
    }
    uint32_t version = 0;
    if (std::strncmp(argv[i], "--hello-version=", 16) == 0 && absl::SimpleAtoi(argv[i] + 16, &version)) {
      return hello_of_version(version);
    }
  }
  return procpool::serve<procpool::testing::RemoteWorker>(argc, argv);
}
