// Admission control and budgets of a remote pool (issue 18, items 3 and 4), each shown by an
// attack on a real pool over 127.0.0.1: a flood of idle connections from a worker's own address,
// a relay whose first connection is cut, a process out of descriptors, token holders that begin
// huge frames, and a worker that looks for the token in its own memory.

#include "procpool/process_pool.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "lib/common/socket.h"
#include "lib/link/handshake.h"
#include "lib/link/remote_frames.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/tls_channel.h"
#include "procpool/internal/protocol.capnp.h"
#include "tests/fault_support.h"
#include "tests/remote_worker.h"
#include "tests/test_support.h"

extern char** environ;

namespace procpool {
namespace {

using testing::map_within;
using testing::message_has;
using testing::RemoteWorker;
using testing::wait_until;
using testing::worker_program;

// The flood below holds hundreds of descriptors in this process.
struct Setup {
  Setup() {
    testing::disable_core_dumps();
    rlimit limit{};
    if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
      limit.rlim_cur = limit.rlim_max;
      ::setrlimit(RLIMIT_NOFILE, &limit);
    }
  }
};
const Setup setup;

PoolOptions remote_pool(int workers, RemoteOptions remote, PoolOptions options = {}) {
  options.workers = workers;
  if (std::getenv("PROCPOOL_TEST_LOG") == nullptr) options.log_sink = nullptr;
  options.remote = std::move(remote);
  return options;
}

// Options for a pool that the tests' hand-made peers speak to frame by frame: they speak no more
// than the plain protocol (on loopback only).
RemoteOptions plain_frames(RemoteOptions remote) {
  remote.encrypt = false;
  return remote;
}

// A worker program started as a cluster engine would, with `env` added to its environment (and
// PROCPOOL_TOKEN=`token`, unless `token` is empty).
struct StartedWorker {
  pid_t pid = -1;
  int status = -1;
  bool reap(absl::Duration timeout) {
    return wait_until([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, timeout);
  }
};

StartedWorker start_worker(const std::string& address, const std::string& token,
                           std::vector<std::string> env = {}) {
  std::string program = worker_program();
  char* argv[] = {program.data(), nullptr};
  env.push_back(absl::StrCat("PROCPOOL_CONNECT=", address));
  if (!token.empty()) env.push_back(absl::StrCat("PROCPOOL_TOKEN=", token));
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, "PROCPOOL_")) envp.push_back(*e);
  }
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  StartedWorker worker;
  REQUIRE(::posix_spawn(&worker.pid, argv[0], nullptr, nullptr, argv, envp.data()) == 0);
  return worker;
}

internal::HostPort address_of(const std::string& text) {
  absl::StatusOr<internal::HostPort> parsed = internal::parse_host_port(text);
  REQUIRE(parsed.ok());
  return *parsed;
}

// A connection opened and left: connect() without waiting (the kernel completes it from the
// pool's backlog), nothing sent.
int idle_connection(const internal::HostPort& address) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(address.port);
  REQUIRE(::inet_pton(AF_INET, address.host.c_str(), &to.sin_addr) == 1);
  const int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof(to));
  REQUIRE((rc == 0 || errno == EINPROGRESS));
  return fd;
}

// A hand-made peer: a blocking TCP connection speaking frames, whose writes give up after 10 s.
struct Peer {
  internal::UniqueFd fd;
  internal::FrameReader reader{1 << 20};
  std::string session_secret;  // a control connection's, once welcomed: what its data connections prove
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> read(absl::Duration timeout = absl::Seconds(10)) {
    return internal::read_frame_within(fd.get(), reader, absl::Now() + timeout);
  }
  void write(capnp::MessageBuilder& message) { REQUIRE(internal::write_frame(fd.get(), message).ok()); }
  // Sends a frame header announcing `announced` bytes, then up to `sent` bytes of it; returns
  // false once the pool has dropped the connection.
  bool begin_huge_frame(size_t announced, size_t sent) {
    const uint32_t table[2] = {0, static_cast<uint32_t>(announced / sizeof(capnp::word))};
    if (::send(fd.get(), table, sizeof(table), MSG_NOSIGNAL) != sizeof(table)) return false;
    static const std::vector<char> zeros(size_t{1} << 20, 0);
    for (size_t at = 0; at < sent;) {
      const ssize_t n = ::send(fd.get(), zeros.data(), std::min(zeros.size(), sent - at), MSG_NOSIGNAL);
      if (n <= 0) return false;
      at += static_cast<size_t>(n);
    }
    return true;
  }
  // The pool closed (or reset) its end.
  bool dropped(absl::Duration timeout) {
    return wait_until([&] {
      pollfd ready{fd.get(), POLLIN, 0};
      if (::poll(&ready, 1, 0) != 1) return false;
      char byte;
      return ::recv(fd.get(), &byte, 1, MSG_DONTWAIT) <= 0;
    }, timeout);
  }
};

Peer dial(const std::string& address) {
  absl::StatusOr<internal::UniqueFd> fd = internal::connect_tcp(address_of(address), absl::Seconds(5));
  REQUIRE(fd.ok());
  const timeval give_up{10, 0};
  ::setsockopt(fd->get(), SOL_SOCKET, SO_SNDTIMEO, &give_up, sizeof(give_up));
  Peer peer;
  peer.fd = *std::move(fd);
  return peer;
}

capnp::Data::Reader as_data(const std::string& bytes) {
  return capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(bytes.data()), bytes.size());
}

std::string as_string(capnp::Data::Reader bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

// A worker host's side of the handshake, with the pool's token: true once welcomed.
bool handshake_as_worker(Peer& peer, const std::string& token) {
  const std::string nonce = internal::make_nonce();
  {
    capnp::MallocMessageBuilder message;
    auto hello = message.initRoot<wire::FromWorker>().initHello();
    hello.setVersion(internal::kProtocolVersion);
    hello.setNonce(as_data(nonce));
    peer.write(message);
  }
  auto challenge = peer.read();
  if (!challenge.ok()) return false;
  std::string pool_nonce;
  {
    capnp::FlatArrayMessageReader message(*challenge);
    auto root = message.getRoot<wire::ToWorker>();
    if (!root.isChallenge()) return false;
    pool_nonce = as_string(root.getChallenge().getNonce());
  }
  capnp::MallocMessageBuilder proof;
  auto credentials = proof.initRoot<wire::FromWorker>().initCredentials();
  credentials.setProof(as_data(internal::prove(token, "worker", pool_nonce, nonce)));
  credentials.setWorkerType(internal::worker_type_name<RemoteWorker>());
  credentials.setHost("fake");
  peer.write(proof);
  auto welcome = peer.read();
  if (!welcome.ok()) return false;
  capnp::FlatArrayMessageReader message(*welcome);
  if (!message.getRoot<wire::ToWorker>().isWelcome()) return false;
  peer.session_secret = internal::session_secret(token, nonce, pool_nonce, "");  // plaintext: no exporter
  return true;
}

// What a relay does for a spawn: its worker's data connection (attach, proving the control session),
// and `spawned` over the control connection. Returns the data connection.
Peer attach_worker(Peer& control, const std::string& address) {
  std::string data_id;
  while (data_id.empty()) {
    auto frame = control.read();
    REQUIRE(frame.ok());
    capnp::FlatArrayMessageReader message(*frame);
    auto root = message.getRoot<wire::ToWorker>();
    if (root.isSpawn()) data_id = as_string(root.getSpawn().getDataId());
  }
  Peer connection = dial(address);
  capnp::MallocMessageBuilder attach;
  auto a = attach.initRoot<wire::FromWorker>().initAttach();
  a.setDataId(as_data(data_id));
  a.setProof(as_data(internal::prove(control.session_secret, "data", data_id, "")));
  connection.write(attach);
  capnp::MallocMessageBuilder spawned;
  spawned.initRoot<wire::FromWorker>().setSpawned(4242);
  control.write(spawned);
  return connection;
}

size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

// CPU time of every thread of this process but the calling one.
absl::Duration other_threads_cpu() {
  auto total = [](int who) {
    rusage usage{};
    ::getrusage(who, &usage);
    return absl::DurationFromTimeval(usage.ru_utime) + absl::DurationFromTimeval(usage.ru_stime);
  };
  return total(RUSAGE_SELF) - total(RUSAGE_THREAD);
}

// =============================================================================================
// Admission control (item 3).

TEST_CASE("800 idle connections from a worker's own address do not keep it out: it serves "
          "within 10 s") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(60)}));
  const internal::HostPort address = address_of(pool.remote_address());
  std::vector<internal::UniqueFd> flood;
  for (int i = 0; i < 800; ++i) flood.push_back(internal::own_fd(idle_connection(address)));
  const absl::Time start = absl::Now();
  StartedWorker worker = start_worker(pool.remote_address(), pool.remote_token());
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(30));
  const absl::Duration took = absl::Now() - start;
  MESSAGE("the worker served after ", absl::FormatDuration(took), ": ", result.status());
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  CHECK(took < absl::Seconds(10));
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

uint16_t port_of(const sockaddr_storage& address) {
  return address.ss_family == AF_INET ? ntohs(reinterpret_cast<const sockaddr_in&>(address).sin_port)
                                      : 0;
}

// The descriptor of this process (the pool's side) whose TCP peer has local port `port`, or -1.
int descriptor_of_peer(uint16_t port) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    int fd = -1;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &fd)) continue;
    sockaddr_storage peer{};
    socklen_t length = sizeof(peer);
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) == 0 && port_of(peer) == port) {
      return fd;
    }
  }
  return -1;
}

// The pool watches each connection in its epoll set from its accept until just before it closes
// it (lib/common/poll_set.h): a number closed and taken by the next accept must be the new
// connection's, served as any other.
TEST_CASE("a connection refused during its handshake gives its descriptor's number to the next "
          "one accepted, which is served") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(60)}));
  Peer stranger = dial(pool.remote_address());
  sockaddr_storage local{};
  socklen_t length = sizeof(local);
  REQUIRE(::getsockname(stranger.fd.get(), reinterpret_cast<sockaddr*>(&local), &length) == 0);
  int number = -1;
  REQUIRE(wait_until([&] { return (number = descriptor_of_peer(port_of(local))) >= 0; },
                     absl::Seconds(10)));
  // No TLS: refused, and closed.
  const std::string junk = "GET / HTTP/1.0\r\n\r\n";
  REQUIRE(::send(stranger.fd.get(), junk.data(), junk.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(junk.size()));
  REQUIRE(stranger.dropped(absl::Seconds(10)));
  REQUIRE(wait_until([&] { return ::fcntl(number, F_GETFD) == -1; }, absl::Seconds(10)));

  StartedWorker worker = start_worker(pool.remote_address(), pool.remote_token());
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(30));
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  // The worker host's control connection, accepted next, took the lowest free number: the one
  // the stranger's had.
  sockaddr_storage peer{};
  length = sizeof(peer);
  CHECK(::getpeername(number, reinterpret_cast<sockaddr*>(&peer), &length) == 0);
  MESSAGE("descriptor ", number, ": the stranger's (port ", port_of(local), "), then port ",
          port_of(peer));
  CHECK(port_of(peer) != port_of(local));
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

// Over a channel whose TLS handshake is done: a worker's hello gets the pool's challenge (the
// pool kept the connection and reads it).
void check_hello_is_challenged(internal::TlsChannel& channel) {
  capnp::MallocMessageBuilder message;
  auto hello = message.initRoot<wire::FromWorker>().initHello();
  hello.setVersion(internal::kProtocolVersion);
  hello.setNonce(as_data(internal::make_nonce()));
  (void)internal::write_frame(channel, message);
  internal::FrameReader reader(1 << 20);
  auto challenge = internal::read_frame_within(channel, reader, absl::Now() + absl::Seconds(20));
  REQUIRE_MESSAGE(challenge.ok(), challenge.status());
  capnp::FlatArrayMessageReader answer(*challenge);
  CHECK(answer.getRoot<wire::ToWorker>().isChallenge());
}

TEST_CASE("a peer in its TLS handshake is not taken for a silent one: a flood of idle "
          "connections from its address closes them, not it") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(60)}));
  const internal::HostPort address = address_of(pool.remote_address());
  absl::StatusOr<std::shared_ptr<internal::TlsContext>> tls =
      internal::TlsContext::with_token(pool.remote_token(), internal::TlsContext::Role::kClient);
  REQUIRE(tls.ok());
  absl::StatusOr<internal::UniqueFd> socket = internal::connect_tcp(address, absl::Seconds(5));
  REQUIRE(socket.ok());
  absl::StatusOr<std::unique_ptr<internal::TlsChannel>> channel =
      internal::TlsChannel::open(*tls, *std::move(socket));
  REQUIRE(channel.ok());
  // Its ClientHello goes; the pool reads it (TLS takes the bytes: nothing is left to peek at) and
  // answers, and waits for the rest, as it would for a real relay between two round trips.
  // (On a loaded machine the pool's answer may already be in when the client first reads: its
  // handshake is then done at once, and the pool waits for its first frame instead.)
  absl::StatusOr<internal::TlsChannel::Step> step = (*channel)->handshake();
  REQUIRE(step.ok());
  if (*step != internal::TlsChannel::Step::kDone) {
    REQUIRE(*step == internal::TlsChannel::Step::kWantRead);
    pollfd answered{(*channel)->fd(), POLLIN, 0};
    REQUIRE(::poll(&answered, 1, 20'000) == 1);
  }
  // More connections from its address than may handshake at once: the idle ones make room.
  std::vector<internal::UniqueFd> flood;
  for (int i = 0; i < 64; ++i) flood.push_back(internal::own_fd(idle_connection(address)));
  absl::SleepFor(absl::Seconds(1));  // the pool accepts them
  // Its handshake goes on (a client finishes TLS 1.3 even on a closed connection: the pool's
  // challenge to its hello is what shows it was kept).
  const absl::Status shook = (*channel)->handshake_within(absl::Now() + absl::Seconds(20));
  REQUIRE_MESSAGE(shook.ok(), shook);
  ::signal(SIGPIPE, SIG_IGN);  // a closed connection fails the write, rather than this process
  check_hello_is_challenged(**channel);
  pool.terminate();
}

TEST_CASE("a relay slow to send its first bytes is not taken for an idle connection: more "
          "connections from its address right after it wait, it is not closed") {
  // On a loaded host (64 relays starting on 2 cores) a relay may be descheduled between its
  // connect() and its ClientHello for tens of milliseconds. Connections from its address that come
  // meanwhile, beyond the per-address handshake cap, must not close it as an idle one: closed, a
  // relay dials again after a backoff, and a closed data connection fails its worker's start.
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(60)}));
  const internal::HostPort address = address_of(pool.remote_address());
  absl::StatusOr<std::shared_ptr<internal::TlsContext>> tls =
      internal::TlsContext::with_token(pool.remote_token(), internal::TlsContext::Role::kClient);
  REQUIRE(tls.ok());
  absl::StatusOr<internal::UniqueFd> socket = internal::connect_tcp(address, absl::Seconds(5));
  REQUIRE(socket.ok());
  // Nothing sent yet; 40 more connections from its address (the cap is 32) come at once.
  std::vector<internal::UniqueFd> others;
  for (int i = 0; i < 40; ++i) others.push_back(internal::own_fd(idle_connection(address)));
  absl::SleepFor(absl::Milliseconds(300));  // the pool accepts them
  absl::StatusOr<std::unique_ptr<internal::TlsChannel>> channel =
      internal::TlsChannel::open(*tls, *std::move(socket));
  REQUIRE(channel.ok());
  ::signal(SIGPIPE, SIG_IGN);  // a closed connection fails the write, rather than this process
  const absl::Status shook = (*channel)->handshake_within(absl::Now() + absl::Seconds(20));
  REQUIRE_MESSAGE(shook.ok(), shook);
  check_hello_is_challenged(**channel);
  pool.terminate();
}

TEST_CASE("64 workers dialling at once from one address all get in: connections beyond the "
          "per-address handshake cap wait their turn, none is closed") {
  // As 64 relays on one host (or behind one NAT) that start together: each has sent its
  // ClientHello, and none has finished its handshake yet, when the last one dials. The pool works
  // on at most 32 handshakes from an address at a time; the others, not silent, must wait rather
  // than be closed (a closed relay dials again after a backoff; a closed data connection fails its
  // worker's start).
  constexpr int kWorkers = 64;
  ProcessPool<RemoteWorker> pool(
      remote_pool(kWorkers, RemoteOptions{.connect_timeout = absl::Seconds(60)}));
  const internal::HostPort address = address_of(pool.remote_address());
  absl::StatusOr<std::shared_ptr<internal::TlsContext>> tls =
      internal::TlsContext::with_token(pool.remote_token(), internal::TlsContext::Role::kClient);
  REQUIRE(tls.ok());
  ::signal(SIGPIPE, SIG_IGN);  // a closed connection fails the write, rather than this process
  std::vector<std::unique_ptr<internal::TlsChannel>> relays;
  for (int i = 0; i < kWorkers; ++i) {
    absl::StatusOr<internal::UniqueFd> socket = internal::connect_tcp(address, absl::Seconds(5));
    REQUIRE(socket.ok());
    absl::StatusOr<std::unique_ptr<internal::TlsChannel>> channel =
        internal::TlsChannel::open(*tls, *std::move(socket));
    REQUIRE(channel.ok());
    // Its ClientHello (which fails if the pool has closed the connection already).
    (void)(*channel)->handshake();
    relays.push_back(*std::move(channel));
  }
  // The pool has accepted them all (and answered the first ones) before any finishes.
  absl::SleepFor(absl::Seconds(1));
  int welcomed = 0;
  std::string first_failure;
  for (auto& relay : relays) {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    auto fail = [&](const std::string& why) {
      if (first_failure.empty()) first_failure = why;
    };
    if (absl::Status shook = relay->handshake_within(deadline); !shook.ok()) {
      fail(std::string(shook.message()));
      continue;
    }
    const std::string nonce = internal::make_nonce();
    capnp::MallocMessageBuilder hello_message;
    auto hello = hello_message.initRoot<wire::FromWorker>().initHello();
    hello.setVersion(internal::kProtocolVersion);
    hello.setNonce(as_data(nonce));
    (void)internal::write_frame(*relay, hello_message);
    internal::FrameReader reader(1 << 20);
    auto challenge = internal::read_frame_within(*relay, reader, deadline);
    if (!challenge.ok()) {
      fail(absl::StrCat("no challenge: ", challenge.status().ToString()));
      continue;
    }
    std::string pool_nonce;
    {
      capnp::FlatArrayMessageReader message(*challenge);
      pool_nonce = as_string(message.getRoot<wire::ToWorker>().getChallenge().getNonce());
    }
    capnp::MallocMessageBuilder proof;
    auto credentials = proof.initRoot<wire::FromWorker>().initCredentials();
    credentials.setProof(as_data(internal::prove(pool.remote_token(), "worker", pool_nonce, nonce)));
    credentials.setWorkerType(internal::worker_type_name<RemoteWorker>());
    credentials.setHost("fake");
    (void)internal::write_frame(*relay, proof);
    auto welcome = internal::read_frame_within(*relay, reader, deadline);
    if (!welcome.ok()) {
      fail(absl::StrCat("no welcome: ", welcome.status().ToString()));
      continue;
    }
    capnp::FlatArrayMessageReader message(*welcome);
    welcomed += message.getRoot<wire::ToWorker>().isWelcome() ? 1 : 0;
  }
  MESSAGE(welcomed, " of ", kWorkers, " welcomed; first failure: ", first_failure);
  CHECK(welcomed == kWorkers);
  pool.terminate();
}

TEST_CASE("a relay whose connection is cut during its handshake dials again until its connect "
          "timeout, and joins the pool") {
  // Something else answers at the pool's address first and hangs up on the worker's hello; the
  // pool comes up on the same port a moment later.
  absl::StatusOr<internal::UniqueFd> impostor =
      internal::listen_tcp(internal::HostPort{"127.0.0.1", 0});
  REQUIRE(impostor.ok());
  const uint16_t port = internal::local_address(impostor->get())->port;
  const std::string address = absl::StrCat("127.0.0.1:", port);
  const std::string token = make_token();
  StartedWorker worker = start_worker(address, token, {"PROCPOOL_CONNECT_TIMEOUT=60"});
  int cut = 0;
  REQUIRE(wait_until([&] {
    absl::StatusOr<internal::UniqueFd> connection = internal::accept_tcp(impostor->get());
    if (!connection.ok() || !connection->valid()) return false;
    // Its hello, read and answered with a hang-up.
    pollfd ready{connection->get(), POLLIN, 0};
    ::poll(&ready, 1, 5000);
    ++cut;
    return true;
  }, absl::Seconds(20)));
  impostor->reset();
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, RemoteOptions{.listen = address, .token = token, .connect_timeout = absl::Seconds(30)}));
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(30));
  CHECK_MESSAGE(result.ok(), result.status());
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  CHECK(cut == 1);
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

// =============================================================================================
// Budgets (item 4).

TEST_CASE("a remote pool raises the soft RLIMIT_NOFILE to the hard one, and says so when its "
          "workers cannot fit") {
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  if (saved.rlim_max == RLIM_INFINITY || saved.rlim_max < 2048) {
    MESSAGE("skipped: the hard limit (", saved.rlim_max, ") leaves no room to test");
    return;
  }
  SUBCASE("raised") {
    rlimit low = saved;
    low.rlim_cur = 1024;
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
    {
      ProcessPool<RemoteWorker> pool(remote_pool(4, RemoteOptions{.connect_timeout = absl::Seconds(1)}));
      rlimit now{};
      REQUIRE(::getrlimit(RLIMIT_NOFILE, &now) == 0);
      CHECK(now.rlim_cur == saved.rlim_max);
    }
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
  }
  SUBCASE("too low") {
    // A hard limit cannot be raised again: in a child.
    std::fflush(nullptr);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      const rlimit tight{1024, 1024};
      if (::setrlimit(RLIMIT_NOFILE, &tight) != 0) ::_exit(10);
      ProcessPool<RemoteWorker> pool(remote_pool(1000, RemoteOptions{.connect_timeout = absl::Seconds(1)}));
      const absl::StatusOr<int64_t> result = pool.apply(1);
      std::fprintf(stderr, "%s\n", result.status().ToString().c_str());
      const bool said = result.status().code() == absl::StatusCode::kResourceExhausted &&
                        message_has(result.status(), "RLIMIT_NOFILE") &&
                        message_has(result.status(), "1000 remote workers");
      ::_exit(said ? 0 : 1);
    }
    int status = 0;
    REQUIRE(wait_until([&] { return ::waitpid(child, &status, WNOHANG) == child; }, absl::Seconds(60)));
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
}

TEST_CASE("out of descriptors, the pool's listener rests (its thread stays under 0.1 of a core) "
          "and takes workers again once there are some") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(120)}));
  const internal::HostPort address = address_of(pool.remote_address());
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  // A connection waits in the backlog, and no descriptor is left to accept it with.
  const int client = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  REQUIRE(client >= 0);
  int highest = client;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    highest = std::max(highest, std::atoi(entry.path().filename().c_str()));
  }
  rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(highest) + 64;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &tight) == 0);
  std::vector<int> filler;
  while (true) {
    const int fd = ::dup(client);
    if (fd < 0) break;
    filler.push_back(fd);
  }
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(address.port);
  ::inet_pton(AF_INET, address.host.c_str(), &to.sin_addr);
  const int rc = ::connect(client, reinterpret_cast<const sockaddr*>(&to), sizeof(to));
  const bool connecting = rc == 0 || errno == EINPROGRESS;
  const absl::Duration before = other_threads_cpu();
  absl::SleepFor(absl::Seconds(2));
  const absl::Duration used = other_threads_cpu() - before;
  for (int fd : filler) ::close(fd);
  ::close(client);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
  REQUIRE(connecting);
  MESSAGE("the pool's threads used ", absl::FormatDuration(used), " of CPU in 2 s without descriptors");
  CHECK(used < absl::Milliseconds(200));
  StartedWorker worker = start_worker(pool.remote_address(), pool.remote_token());
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(30));
  CHECK_MESSAGE(result.ok(), result.status());
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

TEST_CASE("token holders that begin huge frames cannot grow the pool's memory: control frames "
          "stop at 64 KiB, unfinished ones at 64 MiB in all; the pool serves on") {
  constexpr size_t kAnnounced = size_t{200} << 20;
  constexpr size_t kMiB = size_t{1} << 20;
  constexpr int kPeers = 10;
  ProcessPool<RemoteWorker> pool(remote_pool(
      kPeers, plain_frames(RemoteOptions{.connect_timeout = absl::Seconds(60)}),
      {.frame_timeout = absl::Seconds(60)}));
  const std::string token = pool.remote_token();
  std::vector<Peer> controls;
  for (int i = 0; i < kPeers; ++i) {
    controls.push_back(dial(pool.remote_address()));
    REQUIRE(handshake_as_worker(controls.back(), token));
  }
  const size_t baseline = resident_bytes();
  size_t peak = baseline;
  int dropped = 0;
  SUBCASE("over the hosts' control connections") {
    for (Peer& control : controls) {
      control.begin_huge_frame(kAnnounced, 16 * kMiB);
      peak = std::max(peak, resident_bytes());
    }
    for (Peer& control : controls) dropped += control.dropped(absl::Seconds(10));
    CHECK(dropped == kPeers);
    MESSAGE("resident memory grew by ", (peak - baseline) / kMiB, " MiB (",
            kPeers * 16, " MiB sent)");
    CHECK(peak - baseline < 40 * kMiB);
  }
  SUBCASE("over their workers' data connections") {
    std::vector<Peer> connections;
    for (Peer& control : controls) {
      connections.push_back(attach_worker(control, pool.remote_address()));
    }
    for (Peer& connection : connections) {
      const bool sent = connection.begin_huge_frame(kAnnounced, 24 * kMiB);
      absl::SleepFor(absl::Milliseconds(50));  // the pool reads what is in flight
      peak = std::max(peak, resident_bytes());
      dropped += !sent || connection.dropped(absl::Milliseconds(200));
    }
    MESSAGE("resident memory grew by ", (peak - baseline) / kMiB, " MiB (", kPeers * 24,
            " MiB sent); ", dropped, " connections dropped");
    // 64 MiB, beside the largest frame (24 MiB): a few survive, the rest are dropped.
    CHECK(dropped >= kPeers / 2);
#if defined(__SANITIZE_ADDRESS__)
    // ASan keeps freed memory in quarantine (up to 256 MiB): RSS says nothing here.
    MESSAGE("RSS bound not checked under AddressSanitizer");
#else
    CHECK(peak - baseline < 150 * kMiB);
#endif
  }
  // The pool serves on once they are gone: a real worker (plaintext, as the pool) takes a slot of theirs.
  StartedWorker worker = start_worker(pool.remote_address(), token, {"PROCPOOL_ENCRYPT=0"});
  controls.clear();
  CHECK(wait_until([&] {
    for (const WorkerStats& stats : pool.stats().workers) {
      if (stats.state == WorkerState::kIdle) return true;
    }
    return false;
  }, absl::Seconds(60)));
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(60));
  CHECK_MESSAGE(result.ok(), result.status());
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  pool.terminate();
  CHECK(worker.reap(absl::Seconds(20)));
}

// =============================================================================================
// The token (item 2): not in a forked worker's memory, nor readable in its relay's.

TEST_CASE("a task cannot read its relay's memory, where the token is, as the same user (uid 65534); its worker stays dumpable") {
  const std::string token = make_token();
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, RemoteOptions{.token = token, .connect_timeout = absl::Seconds(30)}));
  // The worker host runs as nobody (it switches as it starts; tests/remote_worker_helper.cc), as
  // its workers and their tasks then do.
  StartedWorker worker = start_worker(pool.remote_address(), token, {"REMOTE_RUN_AS_NOBODY=1"});
  auto readable = map_within(pool, std::vector<int64_t>{testing::kRemoteRelayMemoryReadable}, {},
                             absl::Seconds(30));
  REQUIRE_MESSAGE(readable.ok(), readable.status());
  CHECK((*readable)[0] == 0);  // not readable, and the worker is dumpable
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

TEST_CASE("a worker forked by its relay holds no copy of the token, nor of the TLS key derived "
          "from it, in its memory") {
  const std::string token = make_token();
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, RemoteOptions{.token = token, .connect_timeout = absl::Seconds(30)}));
  // The key both ends derive (tls_channel.h): with it, a task could pass the pool's TLS layer.
  auto context = internal::TlsContext::with_token(token, internal::TlsContext::Role::kClient);
  REQUIRE(context.ok());
  REQUIRE((*context)->psk().size() == 32);
  std::vector<std::string> env = {
      absl::StrCat("REMOTE_TOKEN_REVERSED=", std::string(token.rbegin(), token.rend())),
      absl::StrCat("REMOTE_SECRET_HEX=", absl::BytesToHexString((*context)->psk()))};
  testing::TempDir dir;
  std::string token_in_env = token;
  SUBCASE("read from PROCPOOL_TOKEN_FILE") {
    {
      std::ofstream file(dir.file("token"));
      file << token << "\n";
    }
    env.push_back(absl::StrCat("PROCPOOL_TOKEN_FILE=", dir.file("token")));
    token_in_env.clear();
  }
  SUBCASE("read from PROCPOOL_TOKEN") {
#if defined(__SANITIZE_ADDRESS__)
    // The sanitizer's runtime keeps its own copy of the environment the program started with.
    MESSAGE("not checked under AddressSanitizer");
    return;
#endif
  }
  StartedWorker worker = start_worker(pool.remote_address(), token_in_env, env);
  auto copies = map_within(
      pool, std::vector<int64_t>{testing::kRemoteTokenInMemory, testing::kRemoteSecretInMemory}, {},
      absl::Seconds(30));
  REQUIRE_MESSAGE(copies.ok(), copies.status());
  CHECK((*copies)[0] == 0);  // the token
  CHECK((*copies)[1] == 0);  // its TLS key
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

}  // namespace
}  // namespace procpool
