// Remote workers (issue 9): a pool whose workers are programs that dial it over TCP
// (procpool::serve), started here as local processes on 127.0.0.1. Every fault is real: workers
// and their hosts are SIGKILLed and SIGSTOPped, tokens and types are wrong, peers send garbage.
// Tests bind and dial loopback addresses only.

#include "procpool/process_pool.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "openssl/evp.h"
#include "openssl/hmac.h"
#include "lib/common/socket.h"
#include "lib/link/handshake.h"
#include "lib/link/remote_frames.h"
#include "lib/link/tcp_link.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/tls_channel.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/pool.h"
#include "tests/fault_support.h"
#include "tests/remote_worker.h"
#include "tests/test_support.h"

extern char** environ;

namespace procpool {
namespace {

using testing::LogCapture;
using testing::message_has;
using testing::OutcomePool;
using testing::RemoteWorker;
using testing::TempDir;
using testing::map_within;
using testing::wait_until;
using testing::worker_program;

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;

// A binary next to this one, through the runfiles tree (or bazel-bin when run by hand).
PoolOptions remote_pool(int workers, RemoteOptions remote, PoolOptions options = {}) {
  options.workers = workers;
  if (std::getenv("PROCPOOL_TEST_LOG") == nullptr) options.log_sink = nullptr;
  options.remote = std::move(remote);
  return options;
}

// Workers the pool launches itself: this test's worker program, dialling {address}.
RemoteOptions launched(absl::Duration heartbeat = absl::Seconds(10)) {
  return RemoteOptions{.launch = {worker_program(), "--procpool-connect={address}"},
                       .connect_timeout = absl::Seconds(20),
                       .heartbeat_timeout = heartbeat};
}

// A worker program started by the test, as a cluster engine would: its pid and a pipe on its
// stderr.
struct StartedWorker {
  pid_t pid = -1;
  int status = -1;  // once reaped
  bool reap(absl::Duration timeout) {
    return wait_until([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, timeout);
  }
};

StartedWorker start_worker(const std::string& address, const std::string& token,
                           std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {worker_program()};
  for (std::string& arg : extra) args.push_back(std::move(arg));
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  std::vector<std::string> env = {absl::StrCat("PROCPOOL_CONNECT=", address),
                                  absl::StrCat("PROCPOOL_TOKEN=", token)};
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, "PROCPOOL_")) envp.push_back(*e);
  }
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  StartedWorker worker;
  REQUIRE(::posix_spawn(&worker.pid, argv[0], nullptr, nullptr, argv.data(), envp.data()) == 0);
  return worker;
}

using testing::all_serving;

using ::procpool::testing::parent_of;

// =============================================================================================
// The same pool, the same calls.

TEST_CASE("a pool of launched remote workers maps like a forked one; every exit() runs; nothing "
          "is left") {
  TempDir dir;
  ::setenv("REMOTE_EVENTS", dir.file("events").c_str(), 1);
  std::set<pid_t> worker_pids;
  {
    ProcessPool<RemoteWorker> pool(remote_pool(2, launched()));
    CHECK(absl::StartsWith(pool.remote_address(), "127.0.0.1:"));
    std::vector<int64_t> jobs;
    for (int64_t i = 0; i < 1000; ++i) jobs.push_back(i);
    auto squares = map_within(pool, jobs, {}, absl::Seconds(30));
    REQUIRE_MESSAGE(squares.ok(), squares.status());
    for (int64_t i = 0; i < 1000; ++i) CHECK((*squares)[i] == i * i);
    auto one = pool.apply(12);
    CHECK(one.value_or(-1) == 144);
    int64_t count = 0;
    for (absl::StatusOr<int64_t> r : pool.imap(std::vector<int64_t>{1, 2, 3})) count += r.value_or(0);
    CHECK(count == 14);
    // Both launched workers serve before the pool closes (one still dialling at close would be
    // ended unstarted, with no enter() to pair: remote_drain_test covers that).
    REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(30)));
    for (const WorkerStats& worker : pool.stats().workers) worker_pids.insert(worker.pid);
    REQUIRE(pool.close().ok());
    const absl::Status joined = pool.join();
    CHECK_MESSAGE(joined.ok(), joined);
  }
  ::unsetenv("REMOTE_EVENTS");
  std::map<pid_t, int> enters, exits;
  for (const std::string& line : testing::read_lines(dir.file("events"))) {
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    pid_t pid = 0;
    REQUIRE(absl::SimpleAtoi(parts[1], &pid));
    if (parts[0] == "enter") ++enters[pid];
    if (parts[0] == "exit") ++exits[pid];
  }
  CHECK(enters.size() == 2);
  CHECK(enters == exits);  // one exit() after one enter(), in every worker
  for (pid_t pid : worker_pids) {
    CAPTURE(pid);
    CHECK(wait_until([&] { return !testing::process_alive(pid); }, absl::Seconds(5)));
  }
  // The launched worker programs were reaped by the pool.
  CHECK(testing::child_pids(::getpid()).empty());
}

TEST_CASE("workers started by someone else dial in; a late joiner is used") {
  const std::string token = "s3cret-token-of-the-test";
  ProcessPool<RemoteWorker> pool(remote_pool(
      2, RemoteOptions{.listen = "127.0.0.1:0", .token = token, .connect_timeout = absl::Seconds(20)}));
  StartedWorker first = start_worker(pool.remote_address(), token);
  std::vector<int64_t> jobs = {1, 2, 3, 4};
  auto early = map_within(pool, jobs, {}, absl::Seconds(20));
  REQUIRE_MESSAGE(early.ok(), early.status());
  CHECK(*early == std::vector<int64_t>{1, 4, 9, 16});
  StartedWorker second = start_worker(pool.remote_address(), token);
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(20)));
  std::set<int64_t> pids;
  std::vector<int64_t> who(40, testing::kRemotePid);
  for (int round = 0; round < 20 && pids.size() < 2; ++round) {
    auto served = map_within(pool, who, {.chunksize = 1}, absl::Seconds(20));
    REQUIRE(served.ok());
    pids.insert(served->begin(), served->end());
  }
  CHECK(pids.size() == 2);
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(first.reap(absl::Seconds(10)));
  CHECK(second.reap(absl::Seconds(10)));
  CHECK(WIFEXITED(first.status));
  CHECK(WEXITSTATUS(first.status) == 0);
}

// =============================================================================================
// Faults.

TEST_CASE("a remote worker SIGKILLed mid-task fails that task alone; its host forks a new one on "
          "the same connection") {
  OutcomePool<RemoteWorker> pool(remote_pool(2, launched()), [] { return std::make_unique<RemoteWorker>(); });
  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 20; ++i) jobs.push_back(i == 7 ? testing::kRemoteKillSelf : i);
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(30)));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    if (i == 7) {
      CHECK((*call)->outcome(i).status().code() == absl::StatusCode::kAborted);
      CHECK(message_has((*call)->outcome(i).status(), "signal 9"));
      MESSAGE((*call)->outcome(i).status());
    } else {
      CHECK((*call)->outcome(i).value_or(-1) == int64_t(i) * int64_t(i));
    }
  }
  CHECK(pool.stats().workers_restarted == 1);
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(10)));
}

TEST_CASE("a remote worker's host SIGKILLed mid-task: the task fails kAborted, unstarted ones run "
          "elsewhere, a new host is launched") {
  OutcomePool<RemoteWorker> pool(remote_pool(2, launched()), [] { return std::make_unique<RemoteWorker>(); });
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(20)));
  std::vector<int64_t> jobs = {testing::kRemoteHang, 1, 2, 3, 4, 5};
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  pid_t hung = 0;
  REQUIRE(wait_until([&] {
    for (const WorkerStats& worker : pool.stats().workers) {
      if (worker.current_task == 0u) hung = worker.pid;
    }
    return hung != 0;
  }, absl::Seconds(20)));
  const pid_t host = parent_of(hung);
  REQUIRE(host > 1);
  REQUIRE(::kill(host, SIGKILL) == 0);
  REQUIRE((*call)->wait(absl::Seconds(30)));
  CHECK((*call)->outcome(0).status().code() == absl::StatusCode::kAborted);
  CHECK(message_has((*call)->outcome(0).status(), "was lost"));
  MESSAGE((*call)->outcome(0).status());
  for (size_t i = 1; i < jobs.size(); ++i) CHECK((*call)->outcome(i).value_or(-1) == jobs[i] * jobs[i]);
  // A host was launched in its place.
  CHECK(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(20)));
  CHECK(wait_until([&] { return !testing::process_alive(hung); }, absl::Seconds(5)));
}

TEST_CASE("a SIGSTOPped worker host is gone after heartbeat_timeout; map returns") {
  const absl::Duration heartbeat = absl::Milliseconds(600);
  OutcomePool<RemoteWorker> pool(remote_pool(2, launched(heartbeat)),
                                 [] { return std::make_unique<RemoteWorker>(); });
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(20)));
  std::vector<int64_t> jobs = {testing::kRemoteSleep300, 1, 2, 3};
  const pid_t victim = pool.stats().workers[0].pid;
  const pid_t host = parent_of(victim);
  // The whole host stops answering, as a partitioned or frozen machine does: its relay and its
  // worker (whose data connection goes straight to the pool).
  REQUIRE(::kill(host, SIGSTOP) == 0);
  REQUIRE(::kill(victim, SIGSTOP) == 0);
  const absl::Time start = absl::Now();
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(30)));
  MESSAGE("every outcome after ", absl::FormatDuration(absl::Now() - start));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    const auto& outcome = (*call)->outcome(i);
    CHECK((outcome.ok() || outcome.status().code() == absl::StatusCode::kAborted));
  }
  CHECK(absl::Now() - start >= heartbeat / 2);  // it was silent since a little before `start`
  ::kill(victim, SIGCONT);
  ::kill(host, SIGCONT);
  // Woken, the host finds its connection closed and leaves with its worker.
  CHECK(wait_until([&] { return !testing::process_alive(victim); }, absl::Seconds(10)));
}

TEST_CASE("a remote task past its timeout fails kDeadlineExceeded; the pool carries on") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, launched(), {.task_timeout = absl::Milliseconds(300)}));
  std::vector<int64_t> jobs = {1, testing::kRemoteHang, 3};
  const absl::Time start = absl::Now();
  auto result = map_within(pool, jobs, {.chunksize = 1}, absl::Seconds(20));
  MESSAGE(absl::FormatDuration(absl::Now() - start), ": ", result.status());
  CHECK(result.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(message_has(result.status(), "job 1: "));
  auto next = map_within(pool, std::vector<int64_t>{5}, {}, absl::Seconds(20));
  CHECK(next.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{25});
}

TEST_CASE("a remote task that writes garbage on its channel fails alone with kDataLoss") {
  OutcomePool<RemoteWorker> pool(remote_pool(1, launched()), [] { return std::make_unique<RemoteWorker>(); });
  std::vector<int64_t> jobs = {1, testing::kRemoteGarbage, 3};
  auto call = pool.submit(jobs, {.chunksize = 1});
  REQUIRE(call.ok());
  REQUIRE((*call)->wait(absl::Seconds(30)));
  CHECK((*call)->outcome(0).value_or(-1) == 1);
  CHECK((*call)->outcome(1).status().code() == absl::StatusCode::kDataLoss);
  MESSAGE((*call)->outcome(1).status());
  CHECK((*call)->outcome(2).value_or(-1) == 9);
}

// =============================================================================================
// Who may serve.

TEST_CASE("a worker with the wrong token is refused; calls fail with kUnavailable saying why") {
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, RemoteOptions{.token = "right-token-0123456789", .connect_timeout = absl::Milliseconds(1500)}));
  StartedWorker worker = start_worker(pool.remote_address(), "wrong-token-0123456789");
  CHECK(worker.reap(absl::Seconds(10)));
  CHECK(WIFEXITED(worker.status));
  CHECK(WEXITSTATUS(worker.status) == 2);
  auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(10));
  MESSAGE(result.status());
  CHECK(result.status().code() == absl::StatusCode::kUnavailable);
  CHECK(message_has(result.status(), "wrong token"));
}

TEST_CASE("a worker program serving another type is refused, on both sides") {
  ProcessPool<RemoteWorker> pool(
      remote_pool(1, RemoteOptions{.connect_timeout = absl::Milliseconds(1500)}));
  StartedWorker worker = start_worker(pool.remote_address(), pool.remote_token(), {"--type=other"});
  CHECK(worker.reap(absl::Seconds(10)));
  CHECK(WEXITSTATUS(worker.status) == 2);
  auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(10));
  MESSAGE(result.status());
  CHECK(result.status().code() == absl::StatusCode::kUnavailable);
  CHECK(message_has(result.status(), "OtherRemoteWorker"));
}

// Workers the pool launches with `command`, waiting long for each: a call that fails sooner than
// connect_timeout did not wait for it.
RemoteOptions launching(std::vector<std::string> command, std::string token = "") {
  return RemoteOptions{.token = std::move(token),
                       .launch = std::move(command),
                       .connect_timeout = absl::Seconds(300)};
}

TEST_CASE("a launched worker the pool refuses fails calls at once with kUnavailable naming the "
          "refusal, not after connect_timeout") {
  RemoteOptions remote;
  std::string why;
  SUBCASE("another worker type") {
    remote = launching({worker_program(), "--type=other", "--procpool-connect={address}"});
    why = "OtherRemoteWorker";
  }
  SUBCASE("a wrong token (the worker refuses the pool)") {
    remote = launching({"/usr/bin/env", "PROCPOOL_TOKEN=wrong-token-0123456789", worker_program(),
                        "--procpool-connect={address}"},
                       "right-token-0123456789");
    why = "wrong token";
  }
  SUBCASE("another protocol version") {
    remote = launching({worker_program(), absl::StrCat("--hello-version=", internal::kProtocolVersion + 7)});
    why = "protocol version";
  }
  ProcessPool<RemoteWorker> pool(remote_pool(2, remote));
  const absl::Time start = absl::Now();
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(90));
  MESSAGE(absl::FormatDuration(absl::Now() - start), ": ", result.status());
  CHECK(result.status().code() == absl::StatusCode::kUnavailable);
  CHECK(message_has(result.status(), "refused"));
  CHECK(message_has(result.status(), why));
  CHECK(absl::Now() - start < absl::Seconds(60));  // connect_timeout is 300 s
  // New calls fail at once too, while every launch is refused.
  CHECK(pool.apply(2).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("when some launched workers are refused, calls run on the others and the refused "
          "slots launch again at once, not after connect_timeout") {
  TempDir dir;
  // The first launch starts a worker of another type; every later one serves.
  const std::string program = worker_program();
  ProcessPool<RemoteWorker> pool(remote_pool(
      2, launching({"/bin/sh", "-c",
                    absl::StrCat("if mkdir '", dir.file("first"), "' 2>/dev/null; then exec '",
                                 program, "' --type=other --procpool-connect={address}; else exec '",
                                 program, "' --procpool-connect={address}; fi")})));
  auto squares = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(60));
  REQUIRE_MESSAGE(squares.ok(), squares.status());
  CHECK(*squares == std::vector<int64_t>{1, 4, 9});
  CHECK(testing::file_exists(dir.file("first")));
  // The refused slot's start failed at once and it launched again: both serve, long before the
  // refused launch's connect_timeout (300 s).
  CHECK(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(60)));
}

TEST_CASE("a launch command that fails before its worker connects fails calls at once with "
          "kUnavailable saying how it ended") {
  RemoteOptions remote;
  std::vector<std::string> says;
  SUBCASE("it fails on its own (a cluster engine that rejects the job)") {
    remote = launching({"/bin/sh", "-c", "echo 'no such partition' >&2; exit 3"});
    says = {"exited with status 3", "before it connected"};
  }
  SUBCASE("its worker is refused and names no launch (its environment was not passed on)") {
    remote = launching({"/usr/bin/env", "-u", "PROCPOOL_LAUNCH_ID", worker_program(), "--type=other",
                        "--procpool-connect={address}"});
    says = {"exited with status 2", "refused", "OtherRemoteWorker"};
  }
  ProcessPool<RemoteWorker> pool(remote_pool(1, remote));
  const absl::Time start = absl::Now();
  auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(90));
  MESSAGE(absl::FormatDuration(absl::Now() - start), ": ", result.status());
  CHECK(result.status().code() == absl::StatusCode::kUnavailable);
  for (const std::string& text : says) CHECK(message_has(result.status(), text));
  CHECK(absl::Now() - start < absl::Seconds(60));  // connect_timeout is 300 s
}

TEST_CASE("a launch command that hands its worker on and exits 0 (as sbatch does) is waited for") {
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, launching({"/bin/sh", "-c",
                    absl::StrCat("('", worker_program(),
                                 "' --procpool-connect={address} </dev/null &); sleep 0.5; exit 0")})));
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(60));
  REQUIRE_MESSAGE(result.ok(), result.status());
  CHECK(*result == std::vector<int64_t>{1, 4, 9});
}

TEST_CASE("a launch command that cannot run fails calls at once with kInvalidArgument naming "
          "RemoteOptions::launch") {
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, launching({"/nonexistent/procpool-worker", "--procpool-connect={address}"})));
  const absl::Time start = absl::Now();
  auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(90));
  MESSAGE(absl::FormatDuration(absl::Now() - start), ": ", result.status());
  CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(message_has(result.status(), "RemoteOptions::launch"));
  CHECK(message_has(result.status(), "/nonexistent/procpool-worker"));
  CHECK(absl::Now() - start < absl::Seconds(60));
}

// A fake peer for the protocol tests: a TCP connection speaking frames by hand, inside TLS keyed
// by the token it was given (as serve() does), or in plaintext without one.
struct Peer {
  std::unique_ptr<internal::TlsChannel> channel;
  bool tls_failed = false;  // it tried TLS with its token, and the pool refused it
  internal::FrameReader reader{1 << 20};
  int fd() const { return channel->fd(); }
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> read(absl::Duration timeout = absl::Seconds(10)) {
    return internal::read_frame_within(*channel, reader, absl::Now() + timeout);
  }
  void write(capnp::MessageBuilder& message) { REQUIRE(internal::write_frame(*channel, message).ok()); }
  // Bytes outside any frame: inside TLS (as a record), or on the socket itself (`raw`).
  void write_bytes(const void* bytes, size_t size, bool raw = false) {
    if (raw) {
      REQUIRE(::write(fd(), bytes, size) == static_cast<ssize_t>(size));
      return;
    }
    const iovec piece{const_cast<void*>(bytes), size};
    REQUIRE(channel->write(&piece, 1).value_or(0) == size);
  }
};

// Connects to a pool; with `token`, does the TLS handshake keyed by it (tls_failed if refused).
Peer dial_with(const std::string& address, const std::string& token, bool tls = true) {
  absl::StatusOr<internal::HostPort> parsed = internal::parse_host_port(address);
  REQUIRE(parsed.ok());
  absl::StatusOr<internal::UniqueFd> fd = internal::connect_tcp(*parsed, absl::Seconds(5));
  REQUIRE(fd.ok());
  std::shared_ptr<internal::TlsContext> context;
  if (tls && !token.empty()) {
    context = *internal::TlsContext::with_token(token, internal::TlsContext::Role::kClient);
  }
  Peer peer;
  peer.channel = *internal::TlsChannel::open(context, *std::move(fd));
  if (context != nullptr) {
    peer.tls_failed = !peer.channel->handshake_within(absl::Now() + absl::Seconds(10)).ok();
  }
  return peer;
}

// A peer with no token: TCP only (the pool waits for its TLS handshake).
Peer dial(const std::string& address) { return dial_with(address, ""); }

void send_hello(Peer& peer, uint32_t version, const std::string& nonce,
                const std::string& launch_id = "") {
  capnp::MallocMessageBuilder message;
  auto hello = message.initRoot<wire::FromWorker>().initHello();
  hello.setVersion(version);
  hello.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(nonce.data()), nonce.size()));
  hello.setLaunchId(launch_id);
  peer.write(message);
}

// HMAC-SHA256(token, role, first, second) as handshake.h specifies it, computed here on its own
// (OpenSSL directly, each part's length as 4 big-endian bytes), so that a pool whose MAC input
// depended on its host's byte order would not accept it.
std::string reference_proof(const std::string& token, const std::string& role,
                            const std::string& first, const std::string& second) {
  std::string input;
  for (const std::string* part : {&role, &first, &second}) {
    const uint32_t n = static_cast<uint32_t>(part->size());
    const unsigned char length[4] = {static_cast<unsigned char>(n >> 24), static_cast<unsigned char>(n >> 16),
                                     static_cast<unsigned char>(n >> 8), static_cast<unsigned char>(n)};
    input.append(reinterpret_cast<const char*>(length), 4);
    input += *part;
  }
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_length = 0;
  HMAC(EVP_sha256(), token.data(), static_cast<int>(token.size()),
       reinterpret_cast<const unsigned char*>(input.data()), input.size(), mac, &mac_length);
  return std::string(reinterpret_cast<const char*>(mac), mac_length);
}

std::string as_string(capnp::Data::Reader data) {
  return std::string(reinterpret_cast<const char*>(data.begin()), data.size());
}

// Does a worker's side of the handshake, proving `token` ("": no proof) and naming `type` and
// `host`; returns whether it was welcomed with the pool's proof of the same token. With
// `session`, sets it to the key its data connections prove (handshake.h).
bool handshake_as_worker(Peer& peer, const std::string& token,
                         const std::string& type = internal::worker_type_name<RemoteWorker>(),
                         const std::string& host = "fake", std::string* session = nullptr) {
  if (peer.tls_failed) return false;  // the pool refused its TLS handshake: no frame gets through
  const std::string nonce = internal::make_nonce();
  send_hello(peer, internal::kProtocolVersion, nonce);
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
  const std::string mac = token.empty() ? "" : reference_proof(token, "worker", pool_nonce, nonce);
  credentials.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(mac.data()), mac.size()));
  credentials.setWorkerType(type);
  credentials.setHost(host);
  peer.write(proof);
  auto welcome = peer.read();
  if (!welcome.ok()) return false;
  if (session != nullptr) {
    *session = internal::session_secret(token, nonce, pool_nonce,
                                        peer.channel->exporter(internal::kSessionExporterLabel));
  }
  capnp::FlatArrayMessageReader message(*welcome);
  auto root = message.getRoot<wire::ToWorker>();
  return root.isWelcome() &&
         as_string(root.getWelcome().getProof()) == reference_proof(token, "pool", nonce, pool_nonce);
}

// No pool without a secret (issue 18): every pool has a token, and proves it only to a peer that
// proved it first.

TEST_CASE("a pool given no token makes one: a peer without it is refused, a worker given "
          "remote_token() serves") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(20)}));
  const std::string token = pool.remote_token();
  CHECK(token.size() == 64);
  ProcessPool<RemoteWorker> other(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(20)}));
  CHECK(other.remote_token() != token);
  CHECK(make_token() != make_token());
  {
    Peer peer = dial(pool.remote_address());
    CHECK_FALSE(handshake_as_worker(peer, ""));
  }
  {
    Peer peer = dial_with(pool.remote_address(), other.remote_token());
    CHECK(peer.tls_failed);
    CHECK_FALSE(handshake_as_worker(peer, other.remote_token()));
  }
  StartedWorker worker = start_worker(pool.remote_address(), token);
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(20));
  CHECK_MESSAGE(result.ok(), result.status());
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

TEST_CASE("another user on the host (uid 65534) cannot become a worker of a pool given no token") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: needs root to setuid(65534)");
    return;
  }
  // Forked before the pool exists (no thread crosses the fork); told the address on a pipe.
  int address_pipe[2];
  REQUIRE(::pipe2(address_pipe, O_CLOEXEC) == 0);
  std::fflush(nullptr);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(address_pipe[1]);
    if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(10);
    if (::getuid() != 65534) ::_exit(11);
    char buffer[256] = {};
    size_t got = 0;
    while (got < sizeof(buffer) - 1) {
      const ssize_t n = ::read(address_pipe[0], buffer + got, sizeof(buffer) - 1 - got);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    // What it can do: dial, and try the handshake without the token, then with a guess.
    absl::StatusOr<internal::HostPort> address = internal::parse_host_port(buffer);
    if (!address.ok()) ::_exit(12);
    int welcomed = 0;
    for (const std::string guess : {"", "hunter2-hunter2-hunter2"}) {
      Peer peer = dial_with(address->to_string(), guess);
      if (handshake_as_worker(peer, guess)) ++welcomed;
    }
    ::_exit(welcomed == 0 ? 0 : 1);
  }
  ::close(address_pipe[0]);
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(3)}));
  const std::string address = pool.remote_address();
  REQUIRE(::write(address_pipe[1], address.data(), address.size()) == static_cast<ssize_t>(address.size()));
  ::close(address_pipe[1]);
  int status = 0;
  REQUIRE(wait_until([&] { return ::waitpid(child, &status, WNOHANG) == child; }, absl::Seconds(30)));
  REQUIRE(WIFEXITED(status));
  REQUIRE_MESSAGE(WEXITSTATUS(status) != 10, "the child could not setuid(65534): a user namespace "
                                              "without that uid (Bazel's sandbox: run remote_uid_test)");
  CHECK_MESSAGE(WEXITSTATUS(status) == 0, "the uid 65534 peer ended with ", WEXITSTATUS(status),
                " (1: the pool welcomed it)");
  auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(20));
  MESSAGE(result.status());
  CHECK(result.status().code() == absl::StatusCode::kUnavailable);
  CHECK(message_has(result.status(), "TLS handshake failed"));
}

TEST_CASE("a peer that sends a hello and never proves gets no proof over the token from the pool") {
  const std::string token = "correct-horse-battery-staple";
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, RemoteOptions{.token = token, .connect_timeout = absl::Seconds(20)}));
  Peer peer = dial_with(pool.remote_address(), token);
  const std::string nonce = internal::make_nonce();
  send_hello(peer, internal::kProtocolVersion, nonce);
  auto challenge = peer.read();
  REQUIRE(challenge.ok());
  const std::string bytes(reinterpret_cast<const char*>(challenge->begin()),
                          challenge->size() * sizeof(capnp::word));
  capnp::FlatArrayMessageReader message(*challenge);
  auto root = message.getRoot<wire::ToWorker>();
  REQUIRE(root.isChallenge());
  const std::string pool_nonce = as_string(root.getChallenge().getNonce());
  CHECK(pool_nonce.size() == internal::kNonceBytes);
  // Nothing an offline guesser could test a token against: no MAC over the nonces (in either
  // order, either role), and nothing but the version and the nonce.
  for (const char* role : {"pool", "worker", "data"}) {
    for (const auto& [first, second] : {std::pair{nonce, pool_nonce}, std::pair{pool_nonce, nonce}}) {
      CHECK_FALSE(absl::StrContains(bytes, reference_proof(token, role, first, second)));
      CHECK_FALSE(absl::StrContains(bytes, internal::prove(token, role, first, second)));
    }
  }
  CHECK(root.getChallenge().getObsoleteProof().size() == 0);
  CHECK(root.getChallenge().getObsoleteWorkerType().size() == 0);
  CHECK_FALSE(absl::StrContains(bytes, "RemoteWorker"));
  // A wrong proof gets a refusal, still without the pool's proof.
  capnp::MallocMessageBuilder wrong;
  const std::string guess = reference_proof("hunter2-hunter2-hunter2", "worker", pool_nonce, nonce);
  auto credentials = wrong.initRoot<wire::FromWorker>().initCredentials();
  credentials.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(guess.data()), guess.size()));
  peer.write(wrong);
  auto answer = peer.read();
  REQUIRE(answer.ok());
  const std::string answer_bytes(reinterpret_cast<const char*>(answer->begin()),
                                 answer->size() * sizeof(capnp::word));
  capnp::FlatArrayMessageReader refusal(*answer);
  CHECK(refusal.getRoot<wire::ToWorker>().isRefused());
  CHECK_FALSE(absl::StrContains(answer_bytes, reference_proof(token, "pool", nonce, pool_nonce)));
}

TEST_CASE("the pool's proof is over a byte-order-free input: a worker computing it big-endian is "
          "welcomed") {
  const std::string token = "correct-horse-battery-staple";
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, RemoteOptions{.token = token, .connect_timeout = absl::Seconds(20)}));
  Peer peer = dial_with(pool.remote_address(), token);
  // handshake_as_worker computes both proofs with reference_proof(): lengths big-endian.
  CHECK(handshake_as_worker(peer, token));
}

TEST_CASE("serve() reads its token from PROCPOOL_TOKEN_FILE; a file it cannot read is a clear "
          "error") {
  TempDir dir;
  const std::string token = "token-in-a-file-0123456789";
  SUBCASE("a readable file (with a trailing newline) serves") {
    {
      std::ofstream file(dir.file("token"));
      file << token << "\n";
    }
    ProcessPool<RemoteWorker> pool(remote_pool(
        1, launching({"/usr/bin/env", "-u", "PROCPOOL_TOKEN", absl::StrCat("PROCPOOL_TOKEN_FILE=", dir.file("token")),
                      worker_program(), "--procpool-connect={address}"},
                     token)));
    auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(60));
    CHECK_MESSAGE(result.ok(), result.status());
    CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  }
  SUBCASE("a file that cannot be read") {
    ProcessPool<RemoteWorker> pool(remote_pool(
        1, launching({"/bin/sh", "-c",
                      absl::StrCat("exec /usr/bin/env -u PROCPOOL_TOKEN PROCPOOL_TOKEN_FILE='",
                                   dir.file("missing"), "' '", worker_program(),
                                   "' --procpool-connect={address} 2>'", dir.file("stderr"), "'")},
                     token)));
    auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(60));
    MESSAGE(result.status());
    CHECK(result.status().code() == absl::StatusCode::kUnavailable);
    CHECK(message_has(result.status(), "exited with status 2"));
    const std::string said = testing::read_file(dir.file("stderr"));
    MESSAGE(said);
    CHECK(absl::StrContains(said, "PROCPOOL_TOKEN_FILE"));
    CHECK(absl::StrContains(said, "cannot be read"));
  }
}

TEST_CASE("a launched worker's tasks cannot read the token from their environment") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, launched()));
  const std::string token = pool.remote_token();
  REQUIRE(token.size() == 64);
  auto seen = map_within(pool, std::vector<int64_t>{testing::kRemoteTokenVisible, testing::kRemotePid},
                         {}, absl::Seconds(30));
  REQUIRE_MESSAGE(seen.ok(), seen.status());
  CHECK((*seen)[0] == 0);  // getenv, and the task's own /proc/self/environ: nothing
  // And from outside (we are root, or the same user): neither the worker's nor its host's
  // environment holds the token's bytes.
  const pid_t worker = static_cast<pid_t>((*seen)[1]);
  for (const pid_t pid : {worker, parent_of(worker)}) {
    CAPTURE(pid);
    const std::string environment = testing::read_file(absl::StrCat("/proc/", pid, "/environ"));
    CHECK(absl::StrContains(environment, "PROCPOOL_CONNECT="));  // it read the right file
    CHECK_FALSE(absl::StrContains(environment, token));
    CHECK_FALSE(absl::StrContains(environment, "PROCPOOL_TOKEN"));
  }
}

TEST_CASE("a protocol version mismatch is refused with a clear error, on both sides") {
  SUBCASE("the pool refuses a worker of another version") {
    ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(1)}));
    Peer peer = dial_with(pool.remote_address(), pool.remote_token());
    send_hello(peer, internal::kProtocolVersion + 7, internal::make_nonce());
    auto answer = peer.read();
    REQUIRE(answer.ok());
    capnp::FlatArrayMessageReader message(*answer);
    auto root = message.getRoot<wire::ToWorker>();
    REQUIRE(root.isRefused());
    MESSAGE(std::string(root.getRefused().cStr()));
    CHECK(absl::StrContains(root.getRefused().cStr(), "protocol version"));
    auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(10));
    CHECK(message_has(result.status(), "protocol version"));
  }
  SUBCASE("a worker refuses a pool of another version") {
    absl::StatusOr<internal::UniqueFd> listener =
        internal::listen_tcp(internal::HostPort{"127.0.0.1", 0});
    REQUIRE(listener.ok());
    const std::string address = internal::local_address(listener->get())->to_string();
    StartedWorker worker = start_worker(address, "any-token-0123456789");
    pollfd ready{listener->get(), POLLIN, 0};
    REQUIRE(::poll(&ready, 1, 10'000) == 1);
    absl::StatusOr<internal::UniqueFd> accepted = internal::accept_tcp(listener->get());
    REQUIRE((accepted.ok() && accepted->valid()));
    // The pool's side of TLS, keyed by the worker's token.
    Peer pool;
    pool.channel = *internal::TlsChannel::open(
        *internal::TlsContext::with_token("any-token-0123456789", internal::TlsContext::Role::kServer),
        *std::move(accepted));
    REQUIRE(pool.channel->handshake_within(absl::Now() + absl::Seconds(10)).ok());
    REQUIRE(pool.read().ok());  // its hello
    capnp::MallocMessageBuilder challenge;
    auto c = challenge.initRoot<wire::ToWorker>().initChallenge();
    c.setVersion(internal::kProtocolVersion + 7);
    const std::string nonce = internal::make_nonce();
    c.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(nonce.data()), nonce.size()));
    pool.write(challenge);
    auto answer = pool.read();
    REQUIRE(answer.ok());
    capnp::FlatArrayMessageReader message(*answer);
    auto root = message.getRoot<wire::FromWorker>();
    REQUIRE(root.isRefused());
    CHECK(absl::StrContains(root.getRefused().cStr(), "protocol version"));
    CHECK(worker.reap(absl::Seconds(10)));
    CHECK(WEXITSTATUS(worker.status) == 2);
  }
}

TEST_CASE("what unauthenticated peers make the pool remember is bounded: refusals in its errors") {
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Milliseconds(500)}));
  // Each peer refuses the pool with a reason of its own, 10 KB long: the pool says why in its
  // errors; it must not keep (nor repeat) all of them.
  for (int i = 0; i < 100; ++i) {
    Peer peer = dial_with(pool.remote_address(), pool.remote_token());
    send_hello(peer, internal::kProtocolVersion, internal::make_nonce());
    auto answer = peer.read();
    REQUIRE(answer.ok());
    capnp::FlatArrayMessageReader message(*answer);
    CHECK(message.getRoot<wire::ToWorker>().isChallenge());
    capnp::MallocMessageBuilder refused;
    refused.initRoot<wire::FromWorker>().setRefused(absl::StrCat(i, std::string(10'000, 'x')));
    peer.write(refused);
  }
  absl::StatusOr<int64_t> result = absl::InternalError("not run");
  REQUIRE(wait_until([&] {
    result = pool.apply(1);
    return message_has(result.status(), "refused");
  }, absl::Seconds(10)));
  MESSAGE(result.status().message().size(), " bytes: ", result.status().message().substr(0, 300));
  CHECK(result.status().code() == absl::StatusCode::kUnavailable);
  CHECK(result.status().message().size() < 4096);
}

TEST_CASE("what a peer says reaches errors and logs escaped, without control characters") {
  LogCapture log;
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Milliseconds(500)},
                                             {.log_sink = log.sink()}));
  // Terminal escapes, a bell, and a line break that would forge a log line.
  const std::string hostile = "Evil\x1b]0;owned\x07\r\n[procpool] forged line";
  Peer peer = dial_with(pool.remote_address(), pool.remote_token());
  SUBCASE("the worker type a token holder names") {
    CHECK_FALSE(handshake_as_worker(peer, pool.remote_token(), hostile, hostile));
  }
  SUBCASE("how a welcomed host says its worker ended") {
    REQUIRE(handshake_as_worker(peer, pool.remote_token()));
    bool spawned = false;
    for (int i = 0; i < 20 && !spawned; ++i) {
      auto frame = peer.read();
      REQUIRE(frame.ok());
      capnp::FlatArrayMessageReader message(*frame);
      spawned = message.getRoot<wire::ToWorker>().isSpawn();
    }
    REQUIRE(spawned);
    capnp::MallocMessageBuilder ended;
    auto e = ended.initRoot<wire::FromWorker>().initEnded();
    e.setHow(hostile);
    e.setClean(false);
    peer.write(ended);
  }
  SUBCASE("why it refuses the pool, after a hello whose every field is hostile") {
    capnp::MallocMessageBuilder message;
    auto hello = message.initRoot<wire::FromWorker>().initHello();
    hello.setVersion(internal::kProtocolVersion);
    const std::string nonce = internal::make_nonce();
    hello.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(nonce.data()), nonce.size()));
    hello.setLaunchId(hostile);
    hello.setObsoleteWorkerType(hostile);
    hello.setObsoleteHost(hostile);
    peer.write(message);
    REQUIRE(peer.read().ok());  // the challenge
    capnp::MallocMessageBuilder refused;
    refused.initRoot<wire::FromWorker>().setRefused(hostile);
    peer.write(refused);
  }
  absl::StatusOr<int64_t> result = absl::InternalError("not run");
  REQUIRE(wait_until([&] {
    result = pool.apply(1);
    return message_has(result.status(), "Evil");
  }, absl::Seconds(10)));
  MESSAGE(result.status());
  CHECK_FALSE(result.ok());  // kUnavailable (refused), or kAborted (its worker never was ready)
  const std::string logged = log.all();
  auto check_printable = [](absl::string_view text, bool lines) {
    for (char c : text) {
      if (lines && c == '\n') continue;  // log.all() joins its lines with these
      CAPTURE(static_cast<int>(c));
      CHECK(static_cast<unsigned char>(c) >= 0x20);
      CHECK(c != '\x7f');
    }
  };
  check_printable(result.status().message(), false);
  check_printable(logged, true);
  CHECK(message_has(result.status(), "\\x1b"));
  CHECK_FALSE(absl::StrContains(logged, "\n[procpool] forged line"));
}

// The next frame of `peer` that `wanted` picks (pings and the like are skipped).
template <typename Wanted>
std::string next_frame_where(Peer& peer, Wanted wanted) {
  for (int i = 0; i < 50; ++i) {
    auto frame = peer.read();
    REQUIRE(frame.ok());
    capnp::FlatArrayMessageReader message(*frame);
    if (wanted(message.getRoot<wire::ToWorker>())) {
      return std::string(reinterpret_cast<const char*>(frame->begin()), frame->size() * sizeof(capnp::word));
    }
  }
  FAIL("no such frame came");
  return "";
}

// A worker host speaking the protocol by hand, named `host`: its control connection, then its
// worker's data connection, the worker spawned (pid 4242) and, if `ready`, ready.
struct FakeHost {
  Peer control;
  Peer data;
};

FakeHost fake_host(const std::string& address, const std::string& token, const std::string& host,
                   bool ready = true) {
  FakeHost fake{dial_with(address, token), {}};
  std::string session;
  REQUIRE(handshake_as_worker(fake.control, token, internal::worker_type_name<RemoteWorker>(), host,
                              &session));
  std::string data_id;
  {
    const std::string spawn =
        next_frame_where(fake.control, [](wire::ToWorker::Reader r) { return r.isSpawn(); });
    capnp::FlatArrayMessageReader message(kj::arrayPtr(reinterpret_cast<const capnp::word*>(spawn.data()),
                                                       spawn.size() / sizeof(capnp::word)));
    data_id = as_string(message.getRoot<wire::ToWorker>().getSpawn().getDataId());
  }
  fake.data = dial_with(address, token);
  capnp::MallocMessageBuilder attach;
  auto a = attach.initRoot<wire::FromWorker>().initAttach();
  a.setDataId(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(data_id.data()), data_id.size()));
  const std::string proof = internal::prove(session, "data", data_id,
                                            fake.data.channel->exporter(internal::kDataExporterLabel));
  a.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(proof.data()), proof.size()));
  fake.data.write(attach);
  capnp::MallocMessageBuilder spawned;
  spawned.initRoot<wire::FromWorker>().setSpawned(4242);
  fake.control.write(spawned);
  if (ready) {
    capnp::MallocMessageBuilder message;
    message.initRoot<wire::FromWorker>().setReady();
    fake.data.write(message);
  }
  return fake;
}

TEST_CASE("a host's word alone takes no task back: a revoke answer the pool did not ask for, a "
          "second drain, duplicate or lose nothing; a drained host is closed") {
  OutcomePool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(20)}),
                                 [] { return std::make_unique<RemoteWorker>(); });
  FakeHost fake = fake_host(pool.core().remote_address(), pool.core().remote_token(), "fake");
  Peer& control = fake.control;
  Peer& data = fake.data;
  const std::vector<int64_t> jobs = {1, 2, 3};
  auto call = pool.submit(jobs, {.chunksize = 3});
  REQUIRE(call.ok());
  const std::string tasks = next_frame_where(data, [](wire::ToWorker::Reader r) { return r.isTasks(); });
  capnp::FlatArrayMessageReader batch_message(kj::arrayPtr(
      reinterpret_cast<const capnp::word*>(tasks.data()), tasks.size() / sizeof(capnp::word)));
  const auto batch = batch_message.getRoot<wire::ToWorker>().getTasks();
  REQUIRE(batch.getJobs().size() == 3);
  // Unasked, the host says none of the batch was claimed (and answers for a batch it never got):
  // the pool must not give those tasks to anyone else while this host runs them.
  for (uint16_t tag : {batch.getClaimTag(), static_cast<uint16_t>(batch.getClaimTag() + 7)}) {
    capnp::MallocMessageBuilder revoked;
    auto r = revoked.initRoot<wire::FromWorker>().initRevoked();
    r.setSlot(batch.getClaimSlot());
    r.setTag(tag);
    r.setClaimed(0);
    control.write(revoked);
  }
  // This host reports no progress: past the stall rule's 100 ms the pool asks for the unstarted
  // tasks back itself (after it read the answers above, sent long before). Answered honestly:
  // all three were claimed.
  (void)next_frame_where(control, [](wire::ToWorker::Reader r) { return r.isRevoke(); });
  {
    capnp::MallocMessageBuilder revoked;
    auto r = revoked.initRoot<wire::FromWorker>().initRevoked();
    r.setSlot(batch.getClaimSlot());
    r.setTag(batch.getClaimTag());
    r.setClaimed(3);
    control.write(revoked);
  }
  {
    capnp::MallocMessageBuilder results;
    auto r = results.initRoot<wire::FromWorker>().initResults();
    r.setSeq(batch.getSeq());
    r.setStart(0);
    r.setCount(3);
    auto outcomes = r.initOutcomes(3);
    for (unsigned i = 0; i < 3; ++i) outcomes[i].initOk().setInt(jobs[i] + 1000);
    data.write(results);
  }
  REQUIRE((*call)->wait(absl::Seconds(20)));
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*call)->outcome_count(i) == 1);
    CHECK((*call)->outcome(i).value_or(-1) == jobs[i] + 1000);
  }
  // It drains, twice: its worker is shut down once, and the pool closes the host when it ended.
  for (int i = 0; i < 2; ++i) {
    capnp::MallocMessageBuilder draining;
    draining.initRoot<wire::FromWorker>().setDraining();
    control.write(draining);
  }
  (void)next_frame_where(data, [](wire::ToWorker::Reader r) { return r.isShutdown(); });
  {
    capnp::MallocMessageBuilder exited;
    exited.initRoot<wire::FromWorker>().initExited();
    data.write(exited);
    data.channel.reset();
    capnp::MallocMessageBuilder ended;
    auto e = ended.initRoot<wire::FromWorker>().initEnded();
    e.setHow("exited with status 0");
    e.setClean(true);
    control.write(ended);
  }
  bool closed = false;
  for (int i = 0; i < 50 && !closed; ++i) closed = !control.read(absl::Seconds(10)).ok();
  CHECK(closed);
  CHECK(pool.stats().tasks_failed == 0);
}

TEST_CASE("counts a host reports of its worker, however absurd, show in stats within range: no "
          "negative count, no overflowing sum") {
  // A real worker of this host, and a token holder naming the same host whose worker claims
  // INT64_MAX tasks and busy nanoseconds, and 2^64 - 6 resident bytes (reported only with
  // max_worker_rss_bytes or metrics_listen).
  ProcessPool<RemoteWorker> pool(remote_pool(
      2, RemoteOptions{.connect_timeout = absl::Seconds(20), .heartbeat_timeout = absl::Seconds(1)},
      {.max_worker_rss_bytes = size_t{1} << 40}));
  StartedWorker real = start_worker(pool.remote_address(), pool.remote_token());
  REQUIRE(map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(20)).ok());
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  FakeHost fake = fake_host(pool.remote_address(), pool.remote_token(), name);
  capnp::MallocMessageBuilder message;
  auto pong = message.initRoot<wire::FromWorker>().initPong();
  pong.setTasksDone(INT64_MAX);
  pong.setBusyNs(INT64_MAX);
  pong.setResidentBytes(UINT64_MAX - 5);
  fake.control.write(message);
  // Both reports in (the real worker's comes with its next heartbeat, every 250 ms).
  PoolStats stats;
  REQUIRE(wait_until([&] {
    stats = pool.stats();
    return stats.workers.size() == 2 && stats.workers[0].tasks_done != 0 &&
           stats.workers[1].tasks_done != 0;
  }, absl::Seconds(10)));
  for (const WorkerStats& worker : stats.workers) {
    CAPTURE(worker.tasks_done);
    CAPTURE(worker.resident_bytes);
    CHECK(worker.tasks_done > 0);
    CHECK(worker.resident_bytes >= 0);
    CHECK(worker.time_busy >= absl::ZeroDuration());
  }
  REQUIRE(stats.hosts.size() == 1);
  CHECK(stats.hosts[0].tasks_done >= 3);
  CHECK(stats.hosts[0].resident_bytes > 0);
  ::kill(real.pid, SIGKILL);
  CHECK(real.reap(absl::Seconds(10)));
}

TEST_CASE("a worker that reports results before it is ready is stopped; the pool serves on") {
  // Nothing was given to it: the results answer no batch of a worker the pool has not attached.
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(20)}));
  FakeHost fake = fake_host(pool.remote_address(), pool.remote_token(), "early", /*ready=*/false);
  capnp::MallocMessageBuilder message;
  auto results = message.initRoot<wire::FromWorker>().initResults();
  results.setSeq(1);
  results.setCount(1);
  results.initOutcomes(1)[0].initOk().setInt(5);
  fake.data.write(message);
  // Its worker is stopped (the pool asks its host to kill it), and the slot goes to a real one.
  (void)next_frame_where(fake.control, [](wire::ToWorker::Reader r) { return r.isStop(); });
  fake.control.channel.reset();
  StartedWorker real = start_worker(pool.remote_address(), pool.remote_token());
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(20)));
  const absl::StatusOr<int64_t> squared = pool.apply(3);
  CHECK_MESSAGE(squared.value_or(-1) == 9, squared.status());
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(real.reap(absl::Seconds(10)));
}

TEST_CASE("a ready worker that then says its enter() failed is not taken for a failed start") {
  // Calls failed at once with the forged failure while the worker served: no worker was "ready".
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(20)}));
  FakeHost fake = fake_host(pool.remote_address(), pool.remote_token(), "late");
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(20)));
  {
    capnp::MallocMessageBuilder message;
    auto failed = message.initRoot<wire::FromWorker>().initEnterFailed();
    failed.setCode(static_cast<int>(absl::StatusCode::kInternal));
    failed.setMessage("forged");
    fake.data.write(message);
  }
  absl::SleepFor(absl::Milliseconds(200));  // read by the pool before the call comes
  AsyncResult<int64_t> call = pool.apply_async(4);
  const std::string tasks = next_frame_where(fake.data, [](wire::ToWorker::Reader r) { return r.isTasks(); });
  capnp::FlatArrayMessageReader batch(kj::arrayPtr(reinterpret_cast<const capnp::word*>(tasks.data()),
                                                   tasks.size() / sizeof(capnp::word)));
  capnp::MallocMessageBuilder message;
  auto results = message.initRoot<wire::FromWorker>().initResults();
  results.setSeq(batch.getRoot<wire::ToWorker>().getTasks().getSeq());
  results.setCount(1);
  results.initOutcomes(1)[0].initOk().setInt(16);
  fake.data.write(message);
  CHECK_MESSAGE(call.get().value_or(-1) == 16, call.get().status());
  pool.terminate();
}

TEST_CASE("a flood of connections that never finish their handshake delays a real worker, and "
          "does not turn it away") {
  // Each idle connection holds a handshake place until the handshake timeout (connect_timeout
  // here); the real worker dialling behind them must get in once they are gone.
  ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(2)}));
  std::vector<Peer> idle;
  for (int i = 0; i < 300; ++i) idle.push_back(dial(pool.remote_address()));
  StartedWorker worker = start_worker(pool.remote_address(), pool.remote_token());
  CHECK(wait_until([&] {
    const PoolStats stats = pool.stats();
    return stats.workers[0].state == WorkerState::kIdle;
  }, absl::Seconds(20)));
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(20));
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  REQUIRE(pool.close().ok());
  CHECK(pool.join().ok());
  CHECK(worker.reap(absl::Seconds(10)));
}

TEST_CASE("garbage and half frames over a worker's TCP connection drop that connection only") {
  std::string what;
  SUBCASE("garbage") { what = "garbage"; }
  SUBCASE("garbage outside TLS") { what = "raw garbage"; }
  SUBCASE("half a frame") { what = "partial"; }
  SUBCASE("half a TLS record") { what = "partial record"; }
  // A heartbeat far longer than the wait below: only frame_timeout can close the connection of a
  // peer that sends half a frame and then nothing (on a host's control connection, as on a data
  // connection).
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, launched(absl::Seconds(60)), {.frame_timeout = absl::Milliseconds(300)}));
  REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(20)));
  Peer peer = dial_with(pool.remote_address(), pool.remote_token());
  REQUIRE(handshake_as_worker(peer, pool.remote_token()));
  const char garbage[] = "\xde\xad\xbe\xef not a frame at all \xff\xff\xff\xff";
  if (what == "garbage" || what == "raw garbage") {
    peer.write_bytes(garbage, sizeof(garbage), /*raw=*/what == "raw garbage");
  } else if (what == "partial") {
    const uint32_t table[2] = {0, 1000};
    peer.write_bytes(table, sizeof(table));
  } else {
    // An application-data record of 16 KiB announced, 5 bytes of it sent.
    const unsigned char record[] = {0x17, 0x03, 0x03, 0x40, 0x00, 1, 2, 3, 4, 5};
    peer.write_bytes(record, sizeof(record), /*raw=*/true);
  }
  // The pool closes the connection (end of file here), and serves on with its real worker. Half
  // a frame is frame_timeout's to end (300 ms), not heartbeat_timeout's (60 s).
  char byte;
  CHECK(wait_until([&] {
    pollfd ready{peer.fd(), POLLIN, 0};
    return ::poll(&ready, 1, 0) == 1 && ::read(peer.fd(), &byte, 1) <= 0;
  }, absl::Seconds(5)));
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(20));
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
}

TEST_CASE("no worker within connect_timeout: calls fail kUnavailable saying none connected") {
  ProcessPool<RemoteWorker> pool(remote_pool(2, RemoteOptions{.connect_timeout = absl::Milliseconds(300)}));
  const absl::Time start = absl::Now();
  auto result = map_within(pool, std::vector<int64_t>{1}, {}, absl::Seconds(10));
  MESSAGE(absl::FormatDuration(absl::Now() - start), ": ", result.status());
  CHECK(absl::Now() - start < absl::Seconds(3));
  CHECK(result.status().code() == absl::StatusCode::kUnavailable);
  CHECK(message_has(result.status(), "no remote worker has connected"));
}

TEST_CASE("terminate() and join_timeout end a slot still waiting for a worker host at once, not "
          "at connect_timeout") {
  SUBCASE("terminate") {
    ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(30)}));
    absl::SleepFor(absl::Milliseconds(100));
    const absl::Time start = absl::Now();
    pool.terminate();
    MESSAGE("terminate() returned after ", absl::FormatDuration(absl::Now() - start));
    CHECK(absl::Now() - start < absl::Seconds(5));
    CHECK(pool.join().ok());
  }
  SUBCASE("join_timeout") {
    ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(30)},
                                               {.join_timeout = absl::Milliseconds(500)}));
    // Work the slot waits for: join waits for it, until join_timeout.
    auto waiting = pool.apply_async(int64_t{3});
    REQUIRE(pool.close().ok());
    const absl::Time start = absl::Now();
    const absl::Status joined = pool.join();
    MESSAGE("join() returned after ", absl::FormatDuration(absl::Now() - start), ": ", joined);
    CHECK(absl::Now() - start < absl::Seconds(5));
    CHECK(joined.code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(message_has(joined, "waited for a worker host"));
    CHECK(waiting.get().status().code() == absl::StatusCode::kDeadlineExceeded);
  }
  SUBCASE("join with nothing to do") {
    // No work: the waiting slot ends at join, which returns OK at once (not at join_timeout).
    ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(30)},
                                               {.join_timeout = absl::Seconds(20)}));
    REQUIRE(pool.close().ok());
    const absl::Time start = absl::Now();
    const absl::Status joined = pool.join();
    MESSAGE("join() returned after ", absl::FormatDuration(absl::Now() - start), ": ", joined);
    CHECK(absl::Now() - start < absl::Seconds(10));
    CHECK(joined.ok());
  }
}

TEST_CASE("a remote worker's enter_timeout counts from its start on a host: calls wait "
          "connect_timeout for the host") {
  // The host comes after enter_timeout has passed since the pool asked for it, well within
  // connect_timeout: the call waits for it and succeeds.
  ProcessPool<RemoteWorker> pool(remote_pool(
      1,
      RemoteOptions{.launch = {"/bin/sh", "-c",
                               absl::StrCat("sleep 1.5; exec ", worker_program(),
                                            " --procpool-connect={address}")},
                    .connect_timeout = absl::Seconds(20)},
      {.enter_timeout = absl::Milliseconds(500)}));
  auto result = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(20));
  CHECK_MESSAGE(result.ok(), result.status());
  CHECK(result.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
}

TEST_CASE("remote options are checked") {
  SUBCASE("a token shorter than 16 bytes") {
    ProcessPool<RemoteWorker> pool(remote_pool(1, RemoteOptions{.token = "hunter2-hunter2"}));
    auto result = pool.apply(1);
    CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(message_has(result.status(), "RemoteOptions::token"));
    CHECK(pool.remote_token().empty());
  }
  SUBCASE("procpool::Pool cannot have remote workers") {
    PoolOptions options = remote_pool(1, RemoteOptions{});
    Pool pool(options);
    auto result = pool.apply(+[](const int64_t& x) { return x; }, 1);
    CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(message_has(result.status(), "function"));
  }
  SUBCASE("workers must be given") {
    ProcessPool<RemoteWorker> pool(remote_pool(0, RemoteOptions{}));
    CHECK(pool.apply(1).status().code() == absl::StatusCode::kInvalidArgument);
  }
}

// =============================================================================================
// The pool's death.

class SubreaperScope {
 public:
  SubreaperScope() { REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0); }
  ~SubreaperScope() { ::prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0); }
};

TEST_CASE("when the pool's process is SIGKILLed, its remote workers and their hosts are gone") {
  SubreaperScope subreaper;
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  std::fflush(nullptr);
  const pid_t parent = ::fork();
  REQUIRE(parent >= 0);
  if (parent == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    const std::string helper = testing::helper_program("parent_death_helper");
    const std::string program = worker_program();
    ::execl(helper.c_str(), helper.c_str(), "remote", program.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  std::string line;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  char c;
  while (absl::Now() < deadline) {
    pollfd ready{out[0], POLLIN, 0};
    if (::poll(&ready, 1, 100) <= 0) continue;
    if (::read(out[0], &c, 1) <= 0 || c == '\n') break;
    line.push_back(c);
  }
  ::close(out[0]);
  std::vector<pid_t> pids;
  for (absl::string_view part : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
    pid_t pid = 0;
    if (absl::SimpleAtoi(part, &pid)) pids.push_back(pid);
  }
  REQUIRE_MESSAGE(pids.size() == 4, "helper said: '", line, "'");  // 2 workers, 2 hosts
  REQUIRE(::kill(parent, SIGKILL) == 0);
  ::waitpid(parent, nullptr, 0);
  const absl::Time killed = absl::Now();
  for (pid_t pid : pids) {
    CAPTURE(pid);
    CHECK(wait_until([&] {
      ::waitpid(pid, nullptr, WNOHANG);  // we are their subreaper now
      return !testing::process_alive(pid);
    }, absl::Seconds(5)));
  }
  MESSAGE("every remote worker and host gone ", absl::FormatDuration(absl::Now() - killed),
          " after the pool's SIGKILL");
}


// Lent memory over TCP (the word path sends a map's jobs from the caller's array in place): a
// TcpLink keeps such frames in its writer until the socket takes them, and release_borrowed must
// copy what is still unsent, since the caller frees the array when map returns. Driven on the link
// itself: a pool queues at most one batch per remote worker, which loopback's buffers swallow.
class IgnoredEvents final : public internal::LinkEvents {
 public:
  void on_frame(kj::ArrayPtr<const capnp::word>) override {}
  void on_broken_stream(absl::Status) override {}
  void on_revoked(uint32_t, uint16_t, uint32_t) override {}
  void on_ended(internal::WorkerEnd) override {}
};

TEST_CASE("a TCP link copies the unsent part of frames over lent memory when it is released") {
  bool tls = false;
  SUBCASE("plaintext") {}
  // A TLS record refused by the socket must be offered again with the same bytes, from the copy.
  SUBCASE("TLS") { tls = true; }
  constexpr size_t kWords = size_t{1} << 19;  // 4 MiB: far more than the socket buffers below
  absl::StatusOr<internal::SocketPair> pair = internal::make_socket_pair(/*send_buffer_bytes=*/4096);
  REQUIRE(pair.ok());
  int small = 4096;
  REQUIRE(::setsockopt(pair->child_end.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) == 0);
  using internal::TlsContext;
  const std::string token = "a-token-for-this-test-0123";
  const int child_fd = pair->child_end.get();
  std::unique_ptr<internal::TlsChannel> pool_end = *internal::TlsChannel::open(
      tls ? *TlsContext::with_token(token, TlsContext::Role::kServer) : nullptr,
      std::move(pair->parent_end));
  std::unique_ptr<internal::TlsChannel> worker_end = *internal::TlsChannel::open(
      tls ? *TlsContext::with_token(token, TlsContext::Role::kClient) : nullptr,
      std::move(pair->child_end));
  for (int step = 0; step < 100 && !(pool_end->established() && worker_end->established()); ++step) {
    REQUIRE(worker_end->handshake().ok());
    REQUIRE(pool_end->handshake().ok());
  }
  REQUIRE(pool_end->established());
  REQUIRE(worker_end->established());
  internal::TcpLink link("worker 0", 0, INT64_MAX,
                         internal::RelayLimits{.max_frame_bytes = size_t{64} << 20});
  IgnoredEvents events;
  link.attach(std::move(pool_end), internal::FrameReader(size_t{64} << 20), events);
  REQUIRE(link.can_borrow());

  auto lent = std::make_unique<std::vector<uint64_t>>(kWords);
  for (size_t i = 0; i < kWords; ++i) (*lent)[i] = i * 2654435761u;
  auto message = std::make_unique<internal::BorrowingMessageBuilder>(64, lent.get(), nullptr);
  auto tasks = message->initRoot<wire::ToWorker>().initTasks();
  tasks.adoptWordJobs(message->getOrphanage().referenceExternalData(capnp::Data::Reader(
      reinterpret_cast<const kj::byte*>(lent->data()), kWords * sizeof(uint64_t))));
  link.send(std::move(message));
  link.flush();
  REQUIRE(link.has_unsent());  // the rest waits for the peer, which reads nothing yet

  // What map does before it returns, then what its caller may do next.
  link.release_borrowed(lent.get());
  std::fill(lent->begin(), lent->end(), ~uint64_t{0});
  lent.reset();

  internal::FrameReader reader(size_t{64} << 20);
  kj::ArrayPtr<const capnp::word> words;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (words.size() == 0 && absl::Now() < deadline) {
    link.flush();
    pollfd readable{child_fd, POLLIN, 0};
    if (!worker_end->buffered() && ::poll(&readable, 1, 10) <= 0) continue;
    absl::StatusOr<internal::FrameReader::Fill> filled = reader.fill(*worker_end);
    REQUIRE(filled.ok());
    REQUIRE(*filled != internal::FrameReader::Fill::kEndOfFile);
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader.next();
    REQUIRE(frame.ok());
    words = *frame;
  }
  REQUIRE(words.size() > 0);
  capnp::FlatArrayMessageReader received(words, reader.options());
  capnp::Data::Reader jobs = received.getRoot<wire::ToWorker>().getTasks().getWordJobs();
  REQUIRE(jobs.size() == kWords * sizeof(uint64_t));
  const auto* got = reinterpret_cast<const uint64_t*>(jobs.begin());
  size_t wrong = 0;
  for (size_t i = 0; i < kWords; ++i) wrong += got[i] != i * 2654435761u ? 1 : 0;
  CHECK(wrong == 0);
}

}  // namespace
}  // namespace procpool
