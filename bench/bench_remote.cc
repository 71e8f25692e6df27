// Remote workers over loopback TCP beside forked workers on socketpairs, and beside the floor of a
// raw TCP ping-pong, in the same run (issue 9's targets), each over TLS (the default) and in
// plaintext (RemoteOptions::encrypt = false, loopback only), for issue 18's:
//   bench_remote calls=5000 items=1000000 reps=3 start_workers=64 [parts=apply,map,start]
// Each repetition measures, in turn: a 16-byte raw TCP ping-pong between two processes over
// 127.0.0.1; `calls` applies on a remote pool of one worker, in plaintext then over TLS; a map of
// `items` x*x on a pool of forked workers (workers = cores), then on as many remote ones in
// plaintext, then over TLS, with the CPU time the timed map cost the pool's process and the
// workers' (and their relays'); the CPU time of the TLS handshakes a start of `start_workers`
// remote workers makes (a control and a data connection each, both ends timed in this process);
// and the time until `start_workers` launched remote workers all serve, in plaintext then over
// TLS, with the CPU time of each pool's whole life (every process's: less noisy than the time on
// a loaded machine). `parts` picks some of these (to profile one alone). This program is its own
// remote worker (procpool::serve with the types its pools use).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
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

// ms of CPU used by this process (RUSAGE_SELF) or its reaped descendants (RUSAGE_CHILDREN).
double cpu_ms(int who) {
  rusage usage{};
  ::getrusage(who, &usage);
  return (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1e3 +
         (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e3;
}

struct Start {
  double ms;           // from making the pool until all its workers serve
  double pool_cpu_ms;  // this process's CPU over the pool's whole life (start, close, join)
  double cpu_ms;       // the same, with the relays' and their workers' (reaped by then)
};

// A pool of `workers` launched remote workers: the time until all of them serve, and the CPU.
Start start(const std::string& self, int workers, bool encrypt) {
  const double self_before = cpu_ms(RUSAGE_SELF);
  const double children_before = cpu_ms(RUSAGE_CHILDREN);
  const int64_t start = now_ns();
  double ms = 0;
  {
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
    ms = (now_ns() - start) / 1e6;
  }  // the relays are reaped: their CPU, and their workers', is counted
  const double pool_cpu = cpu_ms(RUSAGE_SELF) - self_before;
  return {ms, pool_cpu, pool_cpu + cpu_ms(RUSAGE_CHILDREN) - children_before};
}

// ns that the threads of process `pid` have run on a CPU (/proc/PID/task/*/schedstat); 0 if gone.
int64_t cpu_ns_of(int pid) {
  int64_t total = 0;
  std::error_code error;
  for (const auto& task :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", error)) {
    std::ifstream schedstat(task.path() / "schedstat");
    int64_t ns = 0;
    if (schedstat >> ns) total += ns;
  }
  return total;
}

// The parent of process `pid` (a remote worker's relay), 0 if gone.
int parent_of(int pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const size_t end_of_name = line.rfind(')');
  if (end_of_name == std::string::npos) return 0;
  char state = 0;
  int parent = 0;
  std::istringstream(line.substr(end_of_name + 1)) >> state >> parent;
  return parent;
}

struct MapRun {
  double items_per_s;
  double pool_cpu_ms;     // this process (the pool's thread, and the caller's blocked one)
  double workers_cpu_ms;  // the workers' processes, and for remote ones their relays'
};

template <typename Pool>
MapRun map_run(Pool& pool, const std::vector<int64_t>& jobs) {
  if (!pool.map(jobs).ok()) die("warm-up map");
  std::vector<int> others;
  for (const procpool::WorkerStats& worker : pool.stats().workers) {
    others.push_back(worker.pid);
    if (const int relay = parent_of(worker.pid); relay != 0 && relay != ::getpid()) others.push_back(relay);
  }
  auto others_ns = [&others] {
    int64_t total = 0;
    for (int pid : others) total += cpu_ns_of(pid);
    return total;
  };
  const int64_t pool_before = cpu_ns_of(::getpid());
  const int64_t others_before = others_ns();
  const int64_t start = now_ns();
  absl::StatusOr<std::vector<int64_t>> squares = pool.map(jobs);
  const double seconds = seconds_since(start);
  const int64_t pool_ns = cpu_ns_of(::getpid()) - pool_before;
  const int64_t others_ns_used = others_ns() - others_before;
  if (!squares.ok() || (*squares)[jobs.size() - 1] != jobs.back() * jobs.back()) die("map");
  return {static_cast<double>(jobs.size()) / seconds, pool_ns / 1e6, others_ns_used / 1e6};
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
  // Which measurements to make (all by default): a profile of one needs the others out of it.
  const std::string parts = args.get("parts", "apply,map,start");
  auto wanted = [&parts](const std::string& part) { return parts.find(part) != std::string::npos; };
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  std::vector<int64_t> jobs(static_cast<size_t>(items));
  for (int64_t i = 0; i < items; ++i) jobs[static_cast<size_t>(i)] = i;

  for (int rep = 0; rep < reps; ++rep) {
    if (wanted("apply")) {
      const double raw_us = raw_tcp_pingpong_us(calls);
      const double plaintext_us = apply_us(self, calls, /*encrypt=*/false);
      const double tls_us = apply_us(self, calls, /*encrypt=*/true);
      emit("remote_apply", "us_per_call", tls_us, "us",
           {{"raw_tcp_us", raw_us}, {"ratio_to_raw", tls_us / raw_us},
            {"plaintext_us", plaintext_us}, {"ratio_to_plaintext", tls_us / plaintext_us}});
    }
    if (wanted("map")) {
      double forked = 0;
      {
        procpool::ProcessPool<Squarer> pool({.workers = workers});
        forked = map_run(pool, jobs).items_per_s;
      }
      MapRun plaintext{};
      {
        procpool::ProcessPool<Squarer> pool(remote_options(workers, self, /*encrypt=*/false));
        plaintext = map_run(pool, jobs);
      }
      procpool::ProcessPool<Squarer> pool(remote_options(workers, self));
      const MapRun tls = map_run(pool, jobs);
      const double remote = tls.items_per_s;
      emit("remote_map", "items_per_s", remote, "items/s",
           {{"socketpair_items_per_s", forked}, {"ratio_to_socketpair", forked / remote},
            {"plaintext_items_per_s", plaintext.items_per_s},
            {"throughput_to_plaintext", remote / plaintext.items_per_s},
            {"pool_cpu_ms", tls.pool_cpu_ms}, {"workers_cpu_ms", tls.workers_cpu_ms},
            {"plaintext_pool_cpu_ms", plaintext.pool_cpu_ms},
            {"plaintext_workers_cpu_ms", plaintext.workers_cpu_ms},
            {"workers", workers}});
    }
    if (wanted("start")) {
      emit("remote_tls_handshakes", "ms", tls_handshakes_ms(2 * start_workers), "ms",
           {{"workers", start_workers}, {"connections", 2 * start_workers}});
      const Start plaintext = start(self, start_workers, /*encrypt=*/false);
      const Start tls = start(self, start_workers, /*encrypt=*/true);
      emit("remote_start", "ms", tls.ms, "ms",
           {{"plaintext_ms", plaintext.ms}, {"tls_minus_plaintext_ms", tls.ms - plaintext.ms},
            {"cpu_ms", tls.cpu_ms}, {"plaintext_cpu_ms", plaintext.cpu_ms},
            {"tls_minus_plaintext_cpu_ms", tls.cpu_ms - plaintext.cpu_ms},
            {"pool_cpu_ms", tls.pool_cpu_ms}, {"plaintext_pool_cpu_ms", plaintext.pool_cpu_ms},
            {"workers", start_workers}});
    }
  }
  return 0;
}
