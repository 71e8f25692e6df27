// libFuzzer target: whatever a peer that dials a remote pool sends, the pool's side of the
// connection (RemoteHost: the handshake, then the frames of a bound worker link) ends in a refusal
// or a closed connection, never a crash, a hang or undefined behaviour. Built and run by
// tools/fuzz.sh with clang's -fsanitize=fuzzer,address,undefined.
//
// The first input byte picks what is fuzzed: with bit 2 set, the rest goes to a pool whose
// connections are TLS (keyed by its token), as raw bytes: TLS records, which no one without the
// token can make valid, so this fuzzes the TLS handshake's and records' parsing and our handling
// of their failures. Otherwise the connection is plaintext (RemoteOptions::encrypt = false): an
// even byte feeds the rest to a fresh connection (the handshake); an odd one first completes a
// valid handshake and binds a link, then feeds the rest (everything a connected worker host may
// send). The frames of the handshake are the same inside TLS.

#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "capnp/message.h"
#include "capnp/serialize.h"
#include "absl/time/clock.h"
#include "lib/common/clock.h"
#include "lib/link/handshake.h"
#include "lib/link/remote_frames.h"
#include "lib/link/remote_host.h"
#include "lib/link/tcp_link.h"
#include "procpool/internal/protocol.capnp.h"

namespace {

using procpool::internal::LinkEvents;
using procpool::internal::RemoteHost;
using procpool::internal::RemoteHostConfig;
using procpool::internal::TcpLink;
using procpool::internal::UniqueFd;
using procpool::internal::WorkerEnd;
using procpool::internal::WorkerLink;

// Parses what the pool hands on, as supervision would.
class Events final : public LinkEvents {
 public:
  void on_frame(kj::ArrayPtr<const capnp::word> frame) override {
    try {
      capnp::FlatArrayMessageReader message(frame);
      (void)message.getRoot<procpool::wire::FromWorker>().which();
    } catch (const kj::Exception&) {
    }
  }
  void on_broken_stream(absl::Status) override {}
  void on_revoked(uint32_t, uint16_t, uint32_t) override {}
  void on_ended(WorkerEnd) override {}
};

void write_frame(int fd, capnp::MessageBuilder& message) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  (void)!::write(fd, words.begin(), words.size() * sizeof(capnp::word));
}

void pump(RemoteHost& host, Events& events) {
  const auto events_of = [&events](WorkerLink&) -> LinkEvents& { return events; };
  for (int round = 0; round < 8 && host.state() != RemoteHost::State::kClosed; ++round) {
    host.service(POLLIN | POLLOUT, events_of);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, pair) != 0) return 0;
  UniqueFd peer(pair[1]);
  RemoteHostConfig config;
  config.token = "fuzz-token-0123456789";
  config.worker_type = "fuzz";
  config.limits.max_frame_bytes = 1 << 20;
  if (data[0] & 4) {
    static const std::shared_ptr<procpool::internal::TlsContext> tls =
        *procpool::internal::TlsContext::with_token(config.token,
                                                    procpool::internal::TlsContext::Role::kServer);
    config.tls = tls;
    auto host = std::make_unique<RemoteHost>(UniqueFd(pair[0]), "fuzzer", config,
                                           procpool::internal::monotonic_now_ns());
    Events events;
    (void)!::write(peer.get(), data + 1, size - 1);
    peer.reset();
    pump(*host, events);
    const auto events_of = [&events](WorkerLink&) -> LinkEvents& { return events; };
    host->close("fuzz input ended", events_of);
    return 0;
  }
  auto host = std::make_unique<RemoteHost>(UniqueFd(pair[0]), "fuzzer", config,
                                           procpool::internal::monotonic_now_ns());
  Events events;
  std::unique_ptr<TcpLink> link;
  if (data[0] & 1) {
    // A valid handshake first: the worker proves the token against the pool's challenge.
    const std::string nonce = procpool::internal::make_nonce();
    capnp::MallocMessageBuilder hello;
    auto h = hello.initRoot<procpool::wire::FromWorker>().initHello();
    h.setVersion(procpool::internal::kProtocolVersion);
    h.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(nonce.data()), nonce.size()));
    write_frame(peer.get(), hello);
    pump(*host, events);
    procpool::internal::FrameReader reader(procpool::internal::kHandshakeFrameBytes);
    auto challenge = procpool::internal::read_frame_within(peer.get(), reader, absl::Now() + absl::Seconds(1));
    std::string pool_nonce;
    if (challenge.ok()) {
      capnp::FlatArrayMessageReader message(*challenge);
      auto root = message.getRoot<procpool::wire::ToWorker>();
      if (root.isChallenge()) pool_nonce = procpool::internal::as_string(root.getChallenge().getNonce());
    }
    const std::string mac = procpool::internal::prove(config.token, "worker", pool_nonce, nonce);
    capnp::MallocMessageBuilder proof;
    auto credentials = proof.initRoot<procpool::wire::FromWorker>().initCredentials();
    credentials.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(mac.data()), mac.size()));
    credentials.setWorkerType("fuzz");
    write_frame(peer.get(), proof);
    pump(*host, events);
    if (host->state() == RemoteHost::State::kIdle) {
      link = std::make_unique<TcpLink>("worker 0", 0, 0, config.limits);
      link->bind(host.get());
    }
    char drain[4096];
    while (::read(peer.get(), drain, sizeof(drain)) > 0) {
    }
  }
  if ((data[0] & 3) == 2) {
    // A worker's data connection: it presents a spawn's id, then the input is its frames.
    capnp::MallocMessageBuilder attach;
    attach.initRoot<procpool::wire::FromWorker>().initAttach().setDataId(
        capnp::Data::Reader(reinterpret_cast<const capnp::byte*>("id"), 2));
    write_frame(peer.get(), attach);
    pump(*host, events);
    if (host->state() == RemoteHost::State::kData) {
      link = std::make_unique<TcpLink>("worker 0", 0, 0, config.limits);
      link->attach(host->take_channel(), host->take_reader(), events);
      link->on_spawned(4242, events);  // its frames are read once its pid is known
      (void)!::write(peer.get(), data + 1, size - 1);
      peer.reset();
      for (int round = 0; round < 8; ++round) link->pump(POLLIN, events);
      (void)link->check(INT64_MAX / 2, events);
    }
  }
  (void)!::write(peer.get(), data + 1, size - 1);
  pump(*host, events);
  const auto events_of = [&events](WorkerLink&) -> LinkEvents& { return events; };
  host->close("fuzz input ended", events_of);
  link.reset();
  host.reset();
  return 0;
}
