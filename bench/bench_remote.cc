// Remote workers over loopback TCP beside forked workers on socketpairs, and beside the floor of a
// raw TCP ping-pong, in the same run (issue 9's targets), each over TLS (the default) and in
// plaintext (RemoteOptions::encrypt = false, loopback only), for issue 18's:
//   bench_remote calls=5000 items=1000000 reps=3 start_workers=64
// Each repetition measures, in turn: a 16-byte raw TCP ping-pong between two processes over
// 127.0.0.1; `calls` applies on a remote pool of one worker, in plaintext then over TLS; a map of
// `items` x*x on a pool of forked workers (workers = cores), then on as many remote ones in
// plaintext, then over TLS; the CPU time of the TLS handshakes a start of `start_workers` remote
// workers makes (a control and a data connection each, both ends timed in this process); and the
// time until `start_workers` launched remote workers all serve, in plaintext then over TLS. This
// program is its own remote worker (procpool::serve with the types its pools use).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "lib/common/unique_fd.h"
#include "lib/wire/tls_channel.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

namespace {

struct Increment {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t x) { return x + 1; }
};

void nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

bool exchange(int fd, char* buffer, size_t size, bool send_first) {
  for (int step = 0; step < 2; ++step) {
    const bool sending = (step == 0) == send_first;
    size_t done = 0;
    while (done < size) {
      const ssize_t n = sending ? ::write(fd, buffer + done, size - done)
                                : ::read(fd, buffer + done, size - done);
      if (n <= 0) return false;
      done += static_cast<size_t>(n);
    }
  }
  return true;
}

// µs per round trip of 16 bytes over loopback TCP between this process and a child.
double raw_tcp_pingpong_us(int64_t rounds) {
  const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::listen(listener, 1) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    die("raw tcp listen");
  }
  const pid_t child = ::fork();
  if (child == 0) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) ::_exit(1);
    nodelay(fd);
    char buffer[16];
    while (exchange(fd, buffer, sizeof(buffer), /*send_first=*/false)) {
    }
    ::_exit(0);
  }
  const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  nodelay(fd);
  char buffer[16] = {};
  for (int64_t i = 0; i < rounds / 10; ++i) exchange(fd, buffer, sizeof(buffer), true);
  const int64_t start = now_ns();
  for (int64_t i = 0; i < rounds; ++i) exchange(fd, buffer, sizeof(buffer), true);
  const double us = (now_ns() - start) / 1e3 / static_cast<double>(rounds);
  ::close(fd);
  ::close(listener);
  ::waitpid(child, nullptr, 0);
  return us;
}

procpool::PoolOptions remote_options(int workers, const std::string& self, bool encrypt = true) {
  procpool::PoolOptions options;
  options.workers = workers;
  options.remote = procpool::RemoteOptions{.launch = {self, "--procpool-connect={address}"},
                                           .encrypt = encrypt};
  return options;
}

double apply_us(const std::string& self, int64_t calls, bool encrypt) {
  procpool::ProcessPool<Increment> pool(remote_options(1, self, encrypt));
  for (int64_t i = 0; i < calls / 10; ++i) {
    if (!pool.apply(i).ok()) die("warm-up apply");
  }
  const int64_t start = now_ns();
  for (int64_t i = 0; i < calls; ++i) {
    absl::StatusOr<int64_t> result = pool.apply(i);
    if (!result.ok() || *result != i + 1) die("remote apply");
  }
  return (now_ns() - start) / 1e3 / static_cast<double>(calls);
}

// ms of CPU for `connections` TLS handshakes keyed by a token, both ends in this thread (a pool
// makes one per control and one per data connection; relays do theirs in their own processes).
double tls_handshakes_ms(int connections) {
  using procpool::internal::TlsChannel;
  using procpool::internal::TlsContext;
  const std::string token = procpool::make_token();
  auto server = *TlsContext::with_token(token, TlsContext::Role::kServer);
  auto client = *TlsContext::with_token(token, TlsContext::Role::kClient);
  const int64_t start = now_ns();
  for (int i = 0; i < connections; ++i) {
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) die("socketpair");
    auto pool_end = *TlsChannel::open(server, procpool::internal::UniqueFd(pair[0]));
    auto worker_end = *TlsChannel::open(client, procpool::internal::UniqueFd(pair[1]));
    while (!(pool_end->established() && worker_end->established())) {
      if (!worker_end->handshake().ok() || !pool_end->handshake().ok()) die("tls handshake");
    }
  }
  return (now_ns() - start) / 1e6;
}

// ms from making a pool of `workers` launched remote workers until all of them serve.
double start_ms(const std::string& self, int workers, bool encrypt) {
  const int64_t start = now_ns();
  procpool::ProcessPool<Increment> pool(remote_options(workers, self, encrypt));
  while (true) {
    const procpool::PoolStats stats = pool.stats();
    int serving = 0;
    for (const procpool::WorkerStats& worker : stats.workers) {
      serving += worker.state == procpool::WorkerState::kIdle ? 1 : 0;
    }
    if (serving == workers) break;
    if (now_ns() - start > 120'000'000'000) die("remote start");
    ::usleep(1000);
  }
  return (now_ns() - start) / 1e6;
}

template <typename Pool>
double map_items_per_s(Pool& pool, const std::vector<int64_t>& jobs) {
  if (!pool.map(jobs).ok()) die("warm-up map");
  const int64_t start = now_ns();
  absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
  const double seconds = seconds_since(start);
  if (!squares.ok() || (*squares)[jobs.size() - 1] != jobs.back() * jobs.back()) die("map");
  return static_cast<double>(jobs.size()) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  if (procpool::launched_as_worker(argc, argv)) return procpool::serve(argc, argv);
  Args args(argc, argv);
  const int reps = static_cast<int>(args.get_int("reps", 3));
  const int64_t calls = args.get_int("calls", 5000);
  const int64_t items = args.get_int("items", 1000000);
  const int workers = static_cast<int>(args.get_int("workers", cpu_count()));
  const int start_workers = static_cast<int>(args.get_int("start_workers", 64));
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  std::vector<int64_t> jobs(static_cast<size_t>(items));
  for (int64_t i = 0; i < items; ++i) jobs[static_cast<size_t>(i)] = i;

  for (int rep = 0; rep < reps; ++rep) {
    const double raw_us = raw_tcp_pingpong_us(calls);
    {
      const double plaintext_us = apply_us(self, calls, /*encrypt=*/false);
      const double tls_us = apply_us(self, calls, /*encrypt=*/true);
      emit("remote_apply", "us_per_call", tls_us, "us",
           {{"raw_tcp_us", raw_us}, {"ratio_to_raw", tls_us / raw_us},
            {"plaintext_us", plaintext_us}, {"ratio_to_plaintext", tls_us / plaintext_us}});
    }
    double forked = 0;
    {
      procpool::ProcessPool<Squarer> pool({.workers = workers});
      forked = map_items_per_s(pool, jobs);
    }
    double plaintext = 0;
    {
      procpool::ProcessPool<Squarer> pool(remote_options(workers, self, /*encrypt=*/false));
      plaintext = map_items_per_s(pool, jobs);
    }
    {
      procpool::ProcessPool<Squarer> pool(remote_options(workers, self));
      const double remote = map_items_per_s(pool, jobs);
      emit("remote_map", "items_per_s", remote, "items/s",
           {{"socketpair_items_per_s", forked}, {"ratio_to_socketpair", forked / remote},
            {"plaintext_items_per_s", plaintext}, {"throughput_to_plaintext", remote / plaintext},
            {"workers", workers}});
    }
    emit("remote_tls_handshakes", "ms", tls_handshakes_ms(2 * start_workers), "ms",
         {{"workers", start_workers}, {"connections", 2 * start_workers}});
    {
      const double plaintext_ms = start_ms(self, start_workers, /*encrypt=*/false);
      const double tls_ms = start_ms(self, start_workers, /*encrypt=*/true);
      emit("remote_start", "ms", tls_ms, "ms",
           {{"plaintext_ms", plaintext_ms}, {"tls_minus_plaintext_ms", tls_ms - plaintext_ms},
            {"workers", start_workers}});
    }
  }
  return 0;
}
