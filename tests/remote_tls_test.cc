// TLS on remote workers' connections (issue 18, item 1), attacked from the network: real pools and
// real worker programs on 127.0.0.1, with a proxy between them that records or changes bytes
// (either way), a worker with a certificate from another CA, and a token holder that tries to take
// another host's worker slot. Tests bind and dial loopback addresses only.

#include "procpool/process_pool.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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

using internal::TlsChannel;
using internal::TlsContext;
using testing::map_within;
using testing::message_has;
using testing::RemoteWorker;
using testing::TempDir;
using testing::wait_until;
using testing::worker_program;

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;

PoolOptions remote_pool(int workers, RemoteOptions remote) {
  PoolOptions options;
  options.workers = workers;
  if (std::getenv("PROCPOOL_TEST_LOG") == nullptr) options.log_sink = nullptr;
  options.remote = std::move(remote);
  return options;
}

// Jobs whose bytes cannot appear by chance in a capture: 8-byte words with a marker (small enough
// that their squares fit in 63 bits).
constexpr int64_t kMarker = 0x5EC2E700;
std::vector<int64_t> marked_jobs(int n) {
  std::vector<int64_t> jobs;
  for (int i = 0; i < n; ++i) jobs.push_back(kMarker + i);
  return jobs;
}
std::string bytes_of(int64_t value) { return std::string(reinterpret_cast<const char*>(&value), 8); }

// A TCP proxy between workers and a pool (the workers dial it: RemoteOptions::advertise). It
// records every byte it passes, and may flip one byte going from a worker to the pool: in the next
// bytes that pass on the `connection`-th connection it accepted (0: a relay's control
// connection, 1: its first worker's data connection), the 1001st, or the last if fewer came
// (inside a TLS record: past its 5-byte header; in plaintext, inside a frame's data).
class Proxy {
 public:
  explicit Proxy(std::string target) : target_(std::move(target)) {
    listener_ = *internal::listen_tcp(internal::HostPort{"127.0.0.1", 0});
    address_ = internal::local_address(listener_.get())->to_string();
    REQUIRE(::pipe2(stop_, O_CLOEXEC) == 0);
    thread_ = std::thread([this] { run(); });
  }
  ~Proxy() {
    (void)!::write(stop_[1], "x", 1);
    thread_.join();
    ::close(stop_[0]);
    ::close(stop_[1]);
  }
  const std::string& address() const { return address_; }
  // `toward_worker`: the bytes the pool sends (jobs, its orders), not the worker's.
  void tamper(int connection, bool toward_worker = false) {
    tamper_side_ = toward_worker ? 1 : 0;
    tamper_connection_ = connection;
  }
  // Instead of changing a byte: appends a record the session never sealed to the next bytes that
  // pass from the worker on the connection accepted last (a worker's data connection), sent with
  // them (an attacker on the path who adds bytes rather than changes them).
  void inject_newest() {
    inject_ = true;
    tamper(accepted_ - 1);
  }
  bool tampered() const { return tampered_; }
  // Ready to tamper again (on the connections accepted from now on, by their index).
  void reset_tamper() { tampered_ = false; }
  std::string seen() {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_;
  }

 private:
  struct Pair {
    internal::UniqueFd worker, pool;
    int index;
  };
  void run() {
    std::vector<std::unique_ptr<Pair>> pairs;
    int accepted = 0;
    while (true) {
      std::vector<pollfd> fds = {{stop_[0], POLLIN, 0}, {listener_.get(), POLLIN, 0}};
      for (auto& pair : pairs) {
        fds.push_back({pair->worker.get(), POLLIN, 0});
        fds.push_back({pair->pool.get(), POLLIN, 0});
      }
      if (::poll(fds.data(), fds.size(), 1000) < 0) continue;
      if (fds[0].revents != 0) return;
      if (fds[1].revents != 0) {
        absl::StatusOr<internal::UniqueFd> worker = internal::accept_tcp(listener_.get());
        if (worker.ok() && worker->valid()) {
          absl::StatusOr<internal::UniqueFd> pool =
              internal::connect_tcp(*internal::parse_host_port(target_), absl::Seconds(5));
          if (pool.ok()) {
            (void)internal::set_nonblocking(worker->get(), false);
            auto pair = std::make_unique<Pair>();
            pair->worker = *std::move(worker);
            pair->pool = *std::move(pool);
            pair->index = accepted++;
            accepted_ = accepted;
            pairs.push_back(std::move(pair));
          }
        }
      }
      for (size_t i = 0; i < pairs.size() && 2 + 2 * i + 1 < fds.size(); ++i) {
        Pair& pair = *pairs[i];
        bool closed = false;
        for (int side = 0; side < 2; ++side) {
          if (fds[2 + 2 * i + side].revents == 0) continue;
          const int from = side == 0 ? pair.worker.get() : pair.pool.get();
          const int to = side == 0 ? pair.pool.get() : pair.worker.get();
          char buffer[65536 + 64];
          const ssize_t n = ::read(from, buffer, 65536);
          if (n <= 0) {
            closed = true;
            break;
          }
          ssize_t forward = n;
          if (side == tamper_side_ && pair.index == tamper_connection_ && !tampered_) {
            if (inject_) {
              // An application-data record of 32 bytes: its header, then what fails its check.
              const char forged[] = "\x17\x03\x03\x00\x20" "0123456789abcdef0123456789abcdef";
              const ssize_t size = sizeof(forged) - 1;
              if (n + size <= static_cast<ssize_t>(sizeof(buffer))) {
                std::memcpy(buffer + n, forged, static_cast<size_t>(size));
                forward = n + size;
                tampered_ = true;
              }
            } else {
              buffer[std::min<ssize_t>(1000, n - 1)] ^= 0x20;
              tampered_ = true;
            }
          }
          {
            std::lock_guard<std::mutex> lock(mu_);
            seen_.append(buffer, static_cast<size_t>(forward));
          }
          for (ssize_t put = 0; put < forward;) {
            const ssize_t m =
                ::send(to, buffer + put, static_cast<size_t>(forward - put), MSG_NOSIGNAL);
            if (m <= 0) {
              closed = true;
              break;
            }
            put += m;
          }
        }
        if (closed) {
          pair.worker.reset();
          pair.pool.reset();
        }
      }
      std::erase_if(pairs, [](const auto& pair) { return !pair->worker.valid(); });
    }
  }

  const std::string target_;
  internal::UniqueFd listener_;
  std::string address_;
  int stop_[2] = {-1, -1};
  std::atomic<int> tamper_connection_{-1};
  std::atomic<int> tamper_side_{0};
  std::atomic<bool> tampered_{false};
  std::atomic<bool> inject_{false};
  std::atomic<int> accepted_{0};
  std::mutex mu_;
  std::string seen_;
  std::thread thread_;
};

// A pool whose launched workers dial it through `proxy` (made once the pool listens).
struct ProxiedPool {
  explicit ProxiedPool(int workers, bool encrypt = true) {
    // The pool must listen before the proxy knows where to forward: a first pool gives a port.
    RemoteOptions remote{.listen = "127.0.0.1:0",
                         .launch = {worker_program(), "--procpool-connect={address}"},
                         .connect_timeout = absl::Seconds(30),
                         .encrypt = encrypt};
    internal::UniqueFd probe = *internal::listen_tcp(internal::HostPort{"127.0.0.1", 0});
    const std::string listen = internal::local_address(probe.get())->to_string();
    probe.reset();
    proxy = std::make_unique<Proxy>(listen);
    remote.listen = listen;
    remote.advertise = proxy->address();
    pool = std::make_unique<ProcessPool<RemoteWorker>>(remote_pool(workers, remote));
  }
  std::unique_ptr<Proxy> proxy;
  std::unique_ptr<ProcessPool<RemoteWorker>> pool;
};

TEST_CASE("by default a remote pool's traffic is encrypted: a proxy on the path sees no job or "
          "result") {
  const std::vector<int64_t> jobs = marked_jobs(200);
  for (const bool encrypt : {true, false}) {
    CAPTURE(encrypt);
    ProxiedPool proxied(1, encrypt);
    auto squares = map_within(*proxied.pool, jobs, {}, absl::Seconds(60));
    REQUIRE_MESSAGE(squares.ok(), squares.status());
    REQUIRE(squares->size() == jobs.size());
    CHECK((*squares)[7] == jobs[7] * jobs[7]);
    const std::string seen = proxied.proxy->seen();
    int visible = 0;
    for (size_t i = 0; i < jobs.size(); ++i) {
      visible += absl::StrContains(seen, bytes_of(jobs[i])) ? 1 : 0;
      visible += absl::StrContains(seen, bytes_of((*squares)[i])) ? 1 : 0;
    }
    MESSAGE(seen.size(), " bytes seen, ", visible, " jobs and results among them in clear");
    // Plaintext (loopback only, asked for) shows them: the proxy does see the traffic.
    if (encrypt) {
      CHECK(visible == 0);
    } else {
      CHECK(visible > 0);
    }
  }
}

TEST_CASE("a byte changed on the way between worker and pool breaks that connection: its tasks "
          "fail kDataLoss naming TLS record authentication, no forged value reaches the caller") {
  // Tasks of 8-byte jobs and results: a changed byte in a result frame would be a wrong square.
  const std::vector<int64_t> jobs = marked_jobs(20000);
  for (const int connection : {1, 0}) {  // a worker's data connection, its host's control one
    CAPTURE(connection);
    ProxiedPool proxied(1);
    REQUIRE(wait_until([&] { return proxied.pool->stats().workers[0].state == WorkerState::kIdle; },
                       absl::Seconds(30)));
    // Past the handshakes and the first frames: in results, or in the host's reports.
    proxied.proxy->tamper(connection);
    int forged = 0;
    int failed = 0;
    for (int call = 0; call < 20 && !proxied.proxy->tampered(); ++call) {
      auto squares = map_within(*proxied.pool, jobs, {}, absl::Seconds(60));
      if (!squares.ok()) {
        MESSAGE(squares.status());
        // Not the worker's doing, nor a plain loss of the connection: someone changed a byte.
        CHECK(squares.status().code() == absl::StatusCode::kDataLoss);
        CHECK(message_has(squares.status(), "TLS record authentication failed"));
        ++failed;
        continue;
      }
      for (size_t i = 0; i < jobs.size(); ++i) forged += (*squares)[i] != jobs[i] * jobs[i] ? 1 : 0;
    }
    CHECK(proxied.proxy->tampered());
    CHECK(forged == 0);
    // A worker's results travel only on its data connection: a changed byte there costs a call.
    if (connection == 1) CHECK(failed == 1);
    // After the break, the pool serves on with a fresh worker (and connection).
    auto after = map_within(*proxied.pool, marked_jobs(10), {}, absl::Seconds(60));
    CHECK_MESSAGE(after.ok(), after.status());
    MESSAGE("calls failed: ", failed);
  }
}

// The pool reads the worker's sound results and the forged record in one read: it frees the worker
// and, in the same turn of its loop, writes the next batch to the session the record broke.
TEST_CASE("a record added on the way after a worker's results breaks that connection alone: the "
          "pool does not abort writing the next batch to it, and serves on") {
  ProxiedPool proxied(1);
  REQUIRE(wait_until([&] { return proxied.pool->stats().workers[0].state == WorkerState::kIdle; },
                     absl::Seconds(30)));
  int failed = 0;
  int injected = 0;
  for (int round = 0; round < 20; ++round) {
    // Many single-task calls queued: whenever a result comes, the next batch is ready to go.
    std::vector<AsyncResult<int64_t>> calls;
    for (int64_t i = 0; i < 200; ++i) calls.push_back(proxied.pool->apply_async(kMarker + i));
    if (round % 2 == 0) proxied.proxy->inject_newest();  // the worker's data connection
    for (int64_t i = 0; i < 200; ++i) {
      absl::StatusOr<int64_t> got = calls[static_cast<size_t>(i)].get();
      if (got.ok()) {
        CHECK(*got == (kMarker + i) * (kMarker + i));
      } else {
        ++failed;
        CHECK_MESSAGE(got.status().code() == absl::StatusCode::kDataLoss, got.status());
      }
    }
    injected += proxied.proxy->tampered() ? 1 : 0;
    proxied.proxy->reset_tamper();
  }
  MESSAGE("tasks failed: ", failed, "; records added: ", injected);
  CHECK(injected >= 5);
  // Each broke its connection: the worker was replaced.
  CHECK(proxied.pool->stats().workers[0].restarts >= 5);
  auto after = map_within(*proxied.pool, marked_jobs(10), {}, absl::Seconds(60));
  CHECK_MESSAGE(after.ok(), after.status());
}

TEST_CASE("a byte changed on the way from pool to worker: the worker runs no forged job, the "
          "call fails or runs the tasks again, never with a wrong value, and the pool serves on") {
  const std::vector<int64_t> jobs = marked_jobs(20000);
  for (const int connection : {1, 0}) {  // jobs on the data connection; orders on the control one
    for (const bool retried : {false, true}) {
      CAPTURE(connection);
      CAPTURE(retried);
      ProxiedPool proxied(1);
      REQUIRE(wait_until([&] { return proxied.pool->stats().workers[0].state == WorkerState::kIdle; },
                         absl::Seconds(30)));
      proxied.proxy->tamper(connection, /*toward_worker=*/true);
      const CallOptions options{.retries = retried ? 3 : 0};
      int forged = 0;
      // The pool sends its host little besides heartbeats (a few a heartbeat_timeout): calls go
      // on until the changed byte has passed.
      const absl::Time give_up = absl::Now() + absl::Seconds(60);
      while (absl::Now() < give_up && !proxied.proxy->tampered()) {
        auto squares = map_within(*proxied.pool, jobs, options, absl::Seconds(60));
        if (!squares.ok()) {
          MESSAGE(squares.status());
          CHECK_FALSE(retried);
          // The worker's end found the change and dropped the connection: the pool cannot tell
          // that from a lost link, and says so (never kOk with a value, never the task's fault).
          CHECK((squares.status().code() == absl::StatusCode::kDataLoss ||
                 squares.status().code() == absl::StatusCode::kAborted ||
                 squares.status().code() == absl::StatusCode::kUnavailable));
          continue;
        }
        REQUIRE(squares->size() == jobs.size());
        for (size_t i = 0; i < jobs.size(); ++i) forged += (*squares)[i] != jobs[i] * jobs[i] ? 1 : 0;
      }
      CHECK(proxied.proxy->tampered());
      CHECK(forged == 0);
      // The worker's end refused the record: that connection, and so that worker, is gone.
      CHECK(wait_until([&] { return proxied.pool->stats().workers_restarted >= 1; },
                       absl::Seconds(30)));
      auto after = map_within(*proxied.pool, marked_jobs(10), {}, absl::Seconds(60));
      CHECK_MESSAGE(after.ok(), after.status());
    }
  }
}

TEST_CASE("tasks a tampered connection cost run again when retry_on lists kDataLoss, or under "
          "retries alone, and the call returns the right values") {
  const std::vector<int64_t> jobs = marked_jobs(20000);
  for (const bool listed : {true, false}) {
    for (const int connection : {1, 0}) {
      CAPTURE(listed);
      CAPTURE(connection);
      ProxiedPool proxied(1);
      REQUIRE(wait_until([&] { return proxied.pool->stats().workers[0].state == WorkerState::kIdle; },
                         absl::Seconds(30)));
      proxied.proxy->tamper(connection);
      CallOptions retried{.retries = 3};
      if (listed) retried.retry_on = {absl::StatusCode::kDataLoss};
      int calls = 0;
      for (; calls < 20 && !proxied.proxy->tampered(); ++calls) {
        auto squares = map_within(*proxied.pool, jobs, retried, absl::Seconds(60));
        REQUIRE_MESSAGE(squares.ok(), squares.status());
        REQUIRE(squares->size() == jobs.size());
        int wrong = 0;
        for (size_t i = 0; i < jobs.size(); ++i) wrong += (*squares)[i] != jobs[i] * jobs[i] ? 1 : 0;
        CHECK(wrong == 0);
      }
      CHECK(proxied.proxy->tampered());
      // The tamper cost the worker it was meant for: the call above ran its tasks again elsewhere.
      CHECK(wait_until([&] { return proxied.pool->stats().workers_restarted >= 1; }, absl::Seconds(30)));
      MESSAGE(calls, " calls");
    }
  }
}

TEST_CASE("encrypt = false is refused (kInvalidArgument) unless the pool listens on loopback") {
  ProcessPool<RemoteWorker> pool(remote_pool(
      1, RemoteOptions{.listen = "0.0.0.0:0", .connect_timeout = absl::Seconds(1), .encrypt = false}));
  absl::StatusOr<int64_t> result = pool.apply(3);
  MESSAGE(result.status());
  CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(message_has(result.status(), "encrypt"));
}

// Runs `command` (a shell line) and requires it to succeed.
void run(const std::string& command) {
  INFO(command);
  REQUIRE(std::system(command.c_str()) == 0);
}

// A CA, and certificates it signed, made with the openssl command.
struct Certificates {
  explicit Certificates(const TempDir& dir, const std::string& name) : dir(dir), name(name) {
    run(absl::StrCat("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 "
                     "-subj /CN=", name, "-ca -keyout ", file("ca.key"), " -out ", file("ca.pem"),
                     " 2>/dev/null"));
  }
  // A certificate for `who`, signed by this CA: returns {cert, key}.
  std::pair<std::string, std::string> issue(const std::string& who) const {
    run(absl::StrCat("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=", who,
                     " -keyout ", file(who + ".key"), " -out ", file(who + ".csr"), " 2>/dev/null"));
    run(absl::StrCat("openssl x509 -req -days 2 -in ", file(who + ".csr"), " -CA ", file("ca.pem"),
                     " -CAkey ", file("ca.key"), " -CAcreateserial -out ", file(who + ".pem"),
                     " 2>/dev/null"));
    return {file(who + ".pem"), file(who + ".key")};
  }
  std::string file(const std::string& part) const { return dir.file(absl::StrCat(name, "-", part)); }
  const TempDir& dir;
  std::string name;
};

pid_t start_worker(const std::string& address, const std::string& token,
                   const std::vector<std::string>& extra_env) {
  std::vector<std::string> args = {worker_program()};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  std::vector<std::string> env = {absl::StrCat("PROCPOOL_CONNECT=", address),
                                  absl::StrCat("PROCPOOL_TOKEN=", token)};
  env.insert(env.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, "PROCPOOL_")) envp.push_back(*e);
  }
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = -1;
  REQUIRE(::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), envp.data()) == 0);
  return pid;
}

TEST_CASE("with RemoteOptions::tls, workers and pool present certificates: one from another CA "
          "is refused") {
  TempDir dir;
  Certificates cluster(dir, "cluster");
  const auto [pool_cert, pool_key] = cluster.issue("pool");
  const auto [worker_cert, worker_key] = cluster.issue("worker");
  Certificates stranger(dir, "stranger");
  const auto [other_cert, other_key] = stranger.issue("intruder");
  const RemoteTls tls{.ca_file = cluster.file("ca.pem"), .cert_file = pool_cert, .key_file = pool_key};

  SUBCASE("launched workers (given the pool's files) serve") {
    ProcessPool<RemoteWorker> pool(remote_pool(
        2, RemoteOptions{.launch = {worker_program(), "--procpool-connect={address}"},
                         .connect_timeout = absl::Seconds(30),
                         .tls = tls}));
    auto squares = map_within(pool, std::vector<int64_t>{1, 2, 3}, {}, absl::Seconds(60));
    CHECK_MESSAGE(squares.ok(), squares.status());
    CHECK(squares.value_or(std::vector<int64_t>{}) == std::vector<int64_t>{1, 4, 9});
  }
  SUBCASE("a worker with its own certificate serves; one the CA did not sign is refused") {
    ProcessPool<RemoteWorker> pool(
        remote_pool(1, RemoteOptions{.connect_timeout = absl::Seconds(3), .tls = tls}));
    const pid_t intruder =
        start_worker(pool.remote_address(), pool.remote_token(),
                     {absl::StrCat("PROCPOOL_TLS_CA=", cluster.file("ca.pem")),
                      absl::StrCat("PROCPOOL_TLS_CERT=", other_cert),
                      absl::StrCat("PROCPOOL_TLS_KEY=", other_key)});
    int status = 0;
    REQUIRE(wait_until([&] { return ::waitpid(intruder, &status, WNOHANG) == intruder; },
                       absl::Seconds(30)));
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 2);  // refused
    absl::StatusOr<int64_t> refused = pool.apply(2);
    MESSAGE(refused.status());
    CHECK(refused.status().code() == absl::StatusCode::kUnavailable);
    CHECK(message_has(refused.status(), "TLS handshake failed"));

    const pid_t worker = start_worker(pool.remote_address(), pool.remote_token(),
                                      {absl::StrCat("PROCPOOL_TLS_CA=", cluster.file("ca.pem")),
                                       absl::StrCat("PROCPOOL_TLS_CERT=", worker_cert),
                                       absl::StrCat("PROCPOOL_TLS_KEY=", worker_key)});
    absl::StatusOr<int64_t> served = absl::InternalError("not run");
    CHECK(wait_until([&] {
      served = pool.apply(5);
      return served.ok();
    }, absl::Seconds(30)));
    CHECK(served.value_or(0) == 25);
    REQUIRE(pool.close().ok());
    CHECK(pool.join().ok());
    CHECK(wait_until([&] { return ::waitpid(worker, &status, WNOHANG) == worker; }, absl::Seconds(10)));
  }
  SUBCASE("a file that cannot be used is kInvalidArgument naming RemoteOptions::tls") {
    ProcessPool<RemoteWorker> pool(remote_pool(
        1, RemoteOptions{.connect_timeout = absl::Seconds(3),
                         .tls = RemoteTls{.ca_file = cluster.file("ca.pem"),
                                          .cert_file = dir.file("missing.pem"),
                                          .key_file = pool_key}}));
    absl::StatusOr<int64_t> result = pool.apply(2);
    MESSAGE(result.status());
    CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(message_has(result.status(), "RemoteOptions::tls"));
  }
}

// A worker host played by hand inside TLS: its control session, and what it knows of it.
struct FakeHost {
  std::unique_ptr<TlsChannel> channel;
  internal::FrameReader reader{1 << 20};
  std::string session_secret;

  static std::unique_ptr<TlsChannel> connect(const std::string& address, const std::string& token) {
    internal::UniqueFd fd = *internal::connect_tcp(*internal::parse_host_port(address), absl::Seconds(5));
    std::unique_ptr<TlsChannel> channel =
        *TlsChannel::open(*TlsContext::with_token(token, TlsContext::Role::kClient), std::move(fd));
    REQUIRE(channel->handshake_within(absl::Now() + absl::Seconds(10)).ok());
    return channel;
  }
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> read(absl::Duration timeout = absl::Seconds(10)) {
    return internal::read_frame_within(*channel, reader, absl::Now() + timeout);
  }
  // The worker's side of the handshake (handshake.h), then waits for a spawn: returns its id.
  std::string join(const std::string& address, const std::string& token) {
    channel = connect(address, token);
    const std::string nonce = internal::make_nonce();
    capnp::MallocMessageBuilder hello;
    auto h = hello.initRoot<wire::FromWorker>().initHello();
    h.setVersion(internal::kProtocolVersion);
    h.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(nonce.data()), nonce.size()));
    REQUIRE(internal::write_frame(*channel, hello).ok());
    std::string pool_nonce;
    {
      auto frame = read();
      REQUIRE(frame.ok());
      capnp::FlatArrayMessageReader message(*frame);
      REQUIRE(message.getRoot<wire::ToWorker>().isChallenge());
      pool_nonce = internal::as_string(message.getRoot<wire::ToWorker>().getChallenge().getNonce());
    }
    capnp::MallocMessageBuilder credentials;
    auto c = credentials.initRoot<wire::FromWorker>().initCredentials();
    const std::string proof = internal::prove(token, "worker", pool_nonce, nonce);
    c.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(proof.data()), proof.size()));
    c.setWorkerType(internal::worker_type_name<RemoteWorker>());
    c.setHost("fake");
    REQUIRE(internal::write_frame(*channel, credentials).ok());
    session_secret = internal::session_secret(token, nonce, pool_nonce,
                                              channel->exporter(internal::kSessionExporterLabel));
    for (int i = 0; i < 50; ++i) {
      auto frame = read();
      REQUIRE(frame.ok());
      capnp::FlatArrayMessageReader message(*frame);
      auto root = message.getRoot<wire::ToWorker>();
      if (root.isSpawn()) return internal::as_string(root.getSpawn().getDataId());
    }
    FAIL("no spawn came");
    return "";
  }
};

// Opens a data connection presenting `id` with a proof made with `key`; returns whether the pool
// refused it (a `refused` frame, or the connection closed) rather than keeping it.
bool attach_refused(const std::string& address, const std::string& token, const std::string& id,
                    const std::string& key, bool bound = true) {
  FakeHost data;
  data.channel = FakeHost::connect(address, token);
  capnp::MallocMessageBuilder attach;
  auto a = attach.initRoot<wire::FromWorker>().initAttach();
  a.setDataId(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(id.data()), id.size()));
  const std::string proof = internal::prove(
      key, "data", id, bound ? data.channel->exporter(internal::kDataExporterLabel) : "");
  a.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(proof.data()), proof.size()));
  REQUIRE(internal::write_frame(*data.channel, attach).ok());
  auto answer = data.read(absl::Seconds(2));
  if (answer.status().code() == absl::StatusCode::kDeadlineExceeded) return false;  // kept
  if (!answer.ok()) return true;  // closed
  capnp::FlatArrayMessageReader message(*answer);
  return message.getRoot<wire::ToWorker>().isRefused();
}

TEST_CASE("a worker's data connection must prove the control session its spawn was asked of: "
          "another session's proof, or the token alone, is refused") {
  ProcessPool<RemoteWorker> pool(remote_pool(2, RemoteOptions{.connect_timeout = absl::Seconds(30)}));
  const std::string token = pool.remote_token();
  const std::string address = pool.remote_address();
  // Two hosts, each asked for a worker. Calls make the pool want its workers.
  std::thread caller([&] { (void)pool.apply(1); });
  FakeHost a;
  FakeHost b;
  const std::string id_a = a.join(address, token);
  const std::string id_b = b.join(address, token);
  CHECK(id_a != id_b);
  // B, a token holder with a session of its own, tries to take A's slot.
  CHECK(attach_refused(address, token, id_a, b.session_secret));
  // The proof of the token alone (no session), as before sessions were bound.
  CHECK(attach_refused(address, token, id_b, token, /*bound=*/false));
  CHECK(attach_refused(address, token, id_b, token));
  // A proof of the right session, made for another TLS connection's exporter.
  CHECK(attach_refused(address, token, id_b, b.session_secret, /*bound=*/false));
  // A's own proof, over its own data connection: kept.
  CHECK_FALSE(attach_refused(address, token, id_a, a.session_secret));
  pool.terminate();
  caller.join();
}

}  // namespace
}  // namespace procpool
