// The pool at many workers against the same pool at few (issue 19 item 5): forked workers, or
// remote workers over loopback TCP (TLS, the default; one worker host per worker, each this
// program run by RemoteOptions::launch), at `low` and at `high` workers in the same run:
//   bench_scale mode=fork low=4 high=256 trivial=1000000 slow=10000 slow_us=1000 idle_ms=5000
// For each size:
// - start-up: from making the pool until stats() shows every worker idle;
// - the pool process's own CPU time per task (getrusage RUSAGE_SELF: the pool thread and the
//   calling thread, not the workers' nor the hosts'), for a map of `trivial` x*x tasks with
//   automatic chunks (4 batches a worker, Python's rule; after an untimed warm-up map), the same
//   map cut into as many batches as at `low` workers (the cost of more workers apart from that of
//   more batches), and a map of `slow` tasks that each sleep `slow_us` µs, chunksize 1 (a
//   sleeping task leaves the 2 cores to the pool: spinning ones would measure 256 workers'
//   competition for them, not the pool);
// - the pool's CPU per round trip through its thread with every other worker idle: `roundtrips`
//   apply_async(x).get() one after the other (each wakes the pool thread about twice: what a
//   wake costs beyond the one worker it serves, at `high` workers against `low`);
// - the descriptors this process holds (/proc/self/fd): the most at any sample (start-up
//   included) and the most once every worker had started, against 2 x workers + 64; and the CPU
//   time of one poll() over all of them (what each wake of the pool's loop cost the kernel while
//   it polled every descriptor; it waits on an epoll set now);
// - remote only: the traffic on the hosts' control connections (heartbeats, progress reports,
//   the hosts' reports), from TCP_INFO of each host's socket (tcpi_bytes_acked + received, data
//   segments both ways; TLS records as sent): per host and second over `idle_ms` with nothing to
//   do, and per task during the maps.
// One JSON line per run (bench_util.h), read by bench/run.py.

#include <dirent.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bench/bench_util.h"
#include "procpool/procpool.h"

using namespace procpool_bench;

namespace {

// A task of `us` microseconds that leaves the CPU to others meanwhile.
struct Pause {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t us) {
    const timespec pause{static_cast<time_t>(us / 1'000'000), static_cast<long>(us % 1'000'000) * 1000};
    ::clock_nanosleep(CLOCK_MONOTONIC, 0, &pause, nullptr);
    return us;
  }
};

int64_t process_cpu_ns() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return (int64_t{usage.ru_utime.tv_sec} + usage.ru_stime.tv_sec) * 1'000'000'000 +
         (int64_t{usage.ru_utime.tv_usec} + usage.ru_stime.tv_usec) * 1000;
}

int64_t thread_cpu_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

int open_descriptors() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int count = 0;
  while (const dirent* entry = ::readdir(dir)) count += entry->d_name[0] != '.' ? 1 : 0;
  ::closedir(dir);
  return count - 1;  // the directory's own descriptor
}

// CPU µs of one poll() with a zero timeout over every descriptor this process holds (what the
// pool thread's loop asks the kernel at each wake, bar the wait-queue setup of a sleeping poll).
double poll_all_us() {
  std::vector<pollfd> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') fds.push_back({std::atoi(entry->d_name), POLLIN, 0});
  }
  ::closedir(dir);
  constexpr int kPolls = 200;
  const int64_t cpu = thread_cpu_ns();
  for (int i = 0; i < kPolls; ++i) ::poll(fds.data(), fds.size(), 0);
  return static_cast<double>(thread_cpu_ns() - cpu) / 1e3 / kPolls;
}

// This process's children (the worker hosts it launched), from /proc/*/stat.
std::vector<int> children() {
  std::vector<int> found;
  const int self = ::getpid();
  DIR* dir = ::opendir("/proc");
  if (dir == nullptr) return found;
  while (const dirent* entry = ::readdir(dir)) {
    const int pid = std::atoi(entry->d_name);
    if (pid <= 0) continue;
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const size_t paren = text.rfind(')');
    if (paren == std::string::npos) continue;
    std::istringstream rest(text.substr(paren + 2));
    char state;
    int ppid = 0;
    rest >> state >> ppid;
    if (ppid == self) found.push_back(pid);
  }
  ::closedir(dir);
  return found;
}

// Traffic on the control connections of `hosts` (the worker hosts' relays, each holding its
// control connection and no other socket once its worker is forked): TCP_INFO of each relay's
// sockets, taken through pidfd_getfd (our children: we may), both directions. Payload bytes as
// TCP carried them (TLS records and their overhead included) and segments that carried data.
struct Io {
  int64_t bytes = 0, segments = 0;
  Io operator-(const Io& o) const { return {bytes - o.bytes, segments - o.segments}; }
};

Io io_of(const std::vector<int>& hosts) {
  Io total;
  for (int pid : hosts) {
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd < 0) continue;
    const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
    DIR* fds = ::opendir(dir.c_str());
    while (fds != nullptr) {
      const dirent* entry = ::readdir(fds);
      if (entry == nullptr) break;
      if (entry->d_name[0] == '.') continue;
      char target[64] = {};
      if (::readlink((dir + "/" + entry->d_name).c_str(), target, sizeof(target) - 1) <= 0 ||
          std::strncmp(target, "socket:", 7) != 0) {
        continue;
      }
      const int fd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, std::atoi(entry->d_name), 0));
      if (fd < 0) continue;
      tcp_info info{};
      socklen_t length = sizeof(info);
      if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) == 0) {
        total.bytes += static_cast<int64_t>(info.tcpi_bytes_acked + info.tcpi_bytes_received);
        total.segments += int64_t{info.tcpi_data_segs_out} + info.tcpi_data_segs_in;
      }
      ::close(fd);
    }
    if (fds != nullptr) ::closedir(fds);
    ::close(pidfd);
  }
  return total;
}

struct Measure {
  double start_ms = 0;
  double trivial_cpu_ns_per_task = 0, trivial_s = 0;
  // The same map cut into as many batches as at `low` workers (chunksize trivial / (4 x low)).
  double low_batches_cpu_ns_per_task = 0, low_batches_s = 0;
  double slow_cpu_us_per_task = 0, slow_s = 0;
  int peak_fds = 0;    // at any sample, the workers' start included
  int running_fds = 0;  // once every worker had started: between and after the maps
  double poll_us = 0;    // poll_all_us() with every worker started
  double roundtrip_cpu_us = 0;  // per apply_async(x).get(), the other workers idle
  int hosts = 0;
  Io idle, trivial_io, slow_io;
  double idle_s = 0;
};

procpool::PoolOptions options_for(const std::string& mode, int workers, const std::string& self) {
  procpool::PoolOptions options;
  options.workers = workers;
  if (mode == "remote") {
    options.remote = procpool::RemoteOptions{.launch = {self, "--procpool-connect={address}"}};
  }
  return options;
}

template <typename W>
double wait_all_idle(procpool::ProcessPool<W>& pool, int workers, int64_t start, int& peak_fds) {
  while (true) {
    peak_fds = std::max(peak_fds, open_descriptors());
    const procpool::PoolStats stats = pool.stats();
    int idle = 0;
    for (const procpool::WorkerStats& worker : stats.workers) {
      idle += worker.state == procpool::WorkerState::kIdle ? 1 : 0;
    }
    if (idle == workers) return (now_ns() - start) / 1e6;
    if (now_ns() - start > 300'000'000'000) die("the workers did not all start within 300 s");
    ::usleep(5000);
  }
}

// A map of `jobs` on `pool`, timed: wall seconds, this process's CPU ns per task, and the traffic
// on `hosts`' control connections meanwhile.
template <typename W>
void timed_map(procpool::ProcessPool<W>& pool, const std::vector<int64_t>& jobs,
               procpool::CallOptions call, const std::vector<int>& hosts, double& seconds,
               double& cpu_ns_per_task, Io& control) {
  const Io before = io_of(hosts);
  const int64_t cpu = process_cpu_ns();
  const int64_t start = now_ns();
  absl::StatusOr<std::vector<int64_t>> out = pool.map(jobs, call);
  seconds = seconds_since(start);
  cpu_ns_per_task = static_cast<double>(process_cpu_ns() - cpu) / static_cast<double>(jobs.size());
  control = io_of(hosts) - before;
  if (!out.ok()) die(std::string(out.status().message()));
  if (out->size() != jobs.size()) die("a map lost results");
}

Measure measure(const std::string& mode, int workers, int low, const std::string& self,
                int64_t trivial, int64_t slow, int64_t slow_us, double idle_s,
                int64_t roundtrips) {
  Measure m;
  std::vector<int64_t> squares_in(static_cast<size_t>(trivial));
  for (int64_t i = 0; i < trivial; ++i) squares_in[static_cast<size_t>(i)] = i;
  const std::vector<int64_t> pauses(static_cast<size_t>(slow), slow_us);
  m.peak_fds = open_descriptors();
  // One pool after the other: the trivial map's (whose start is timed), then the slow map's.
  {
    const int64_t start = now_ns();
    procpool::ProcessPool<Squarer> pool(options_for(mode, workers, self));
    m.start_ms = wait_all_idle(pool, workers, start, m.peak_fds);
    const std::vector<int> hosts = mode == "remote" ? children() : std::vector<int>();
    m.hosts = static_cast<int>(hosts.size());
    // Warmed up untimed, as the other benchmarks are: the first map's buffers fault their pages
    // in.
    if (!pool.map(squares_in).ok()) die("warm-up map");
    timed_map(pool, squares_in, {}, hosts, m.trivial_s, m.trivial_cpu_ns_per_task, m.trivial_io);
    Io ignored;
    const auto low_chunks = static_cast<size_t>((trivial + 4 * low - 1) / (4 * low));
    timed_map(pool, squares_in, {.chunksize = low_chunks}, hosts, m.low_batches_s,
              m.low_batches_cpu_ns_per_task, ignored);
    {
      const int64_t cpu = process_cpu_ns();
      for (int64_t i = 0; i < roundtrips; ++i) {
        absl::StatusOr<int64_t> square = pool.apply_async(i).get();
        if (!square.ok() || *square != i * i) die("a round trip failed");
      }
      m.roundtrip_cpu_us = static_cast<double>(process_cpu_ns() - cpu) / 1e3 /
                           static_cast<double>(roundtrips);
    }
    m.running_fds = open_descriptors();
    m.poll_us = poll_all_us();
    m.peak_fds = std::max(m.peak_fds, m.running_fds);
    if (!hosts.empty() && idle_s > 0) {
      const Io before = io_of(hosts);
      const int64_t idle_start = now_ns();
      ::usleep(static_cast<useconds_t>(idle_s * 1e6));
      m.idle_s = seconds_since(idle_start);
      m.idle = io_of(hosts) - before;
    }
  }
  {
    const int64_t start = now_ns();
    procpool::ProcessPool<Pause> pool(options_for(mode, workers, self));
    int fds = 0;
    wait_all_idle(pool, workers, start, fds);
    m.peak_fds = std::max(m.peak_fds, fds);
    const std::vector<int> hosts = mode == "remote" ? children() : std::vector<int>();
    double ns_per_task = 0;
    timed_map(pool, pauses, {.chunksize = 1}, hosts, m.slow_s, ns_per_task, m.slow_io);
    m.slow_cpu_us_per_task = ns_per_task / 1e3;
    m.running_fds = std::max(m.running_fds, open_descriptors());
    m.peak_fds = std::max(m.peak_fds, m.running_fds);
  }
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  if (procpool::launched_as_worker(argc, argv)) return procpool::serve(argc, argv);
  Args args(argc, argv);
  const std::string mode = args.get("mode", "fork");
  const int low = static_cast<int>(args.get_int("low", 4));
  const int high = static_cast<int>(args.get_int("high", 256));
  const int64_t trivial = args.get_int("trivial", 1000000);
  const int64_t slow = args.get_int("slow", 10000);
  const int64_t slow_us = args.get_int("slow_us", 1000);
  const double idle_s = static_cast<double>(args.get_int("idle_ms", 5000)) / 1e3;
  const int64_t roundtrips = std::max<int64_t>(1, args.get_int("roundtrips", 2000));
  if (mode != "fork" && mode != "remote") die("mode is fork or remote");
  if (trivial < 1 || slow < 1) die("trivial and slow are at least 1");
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  // Room for the descriptors of `high` workers (a remote pool raises the limit itself).
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &limit);
  }

  const Measure a = measure(mode, low, low, self, trivial, slow, slow_us, idle_s, roundtrips);
  const Measure b = measure(mode, high, low, self, trivial, slow, slow_us, idle_s, roundtrips);
  std::vector<std::pair<std::string, double>> extras;
  for (const auto& [tag, m, workers] : {std::tuple{"low", &a, low}, std::tuple{"high", &b, high}}) {
    const std::string t = tag;
    auto add = [&](const std::string& key, double value) { extras.push_back({t + "_" + key, value}); };
    add("workers", workers);
    add("start_ms", m->start_ms);
    add("trivial_cpu_ns_per_task", m->trivial_cpu_ns_per_task);
    add("trivial_s", m->trivial_s);
    add("low_batches_cpu_ns_per_task", m->low_batches_cpu_ns_per_task);
    add("low_batches_s", m->low_batches_s);
    add("slow_cpu_us_per_task", m->slow_cpu_us_per_task);
    add("slow_s", m->slow_s);
    add("peak_fds", m->peak_fds);
    add("running_fds", m->running_fds);
    add("poll_us", m->poll_us);
    add("roundtrip_cpu_us", m->roundtrip_cpu_us);
    add("fd_limit", 2.0 * workers + 64);
    if (mode != "remote" || m->hosts == 0) continue;
    add("hosts", m->hosts);
    // Heartbeats alone (nothing else to say): both directions, per host and second.
    const double idle = m->idle_s * m->hosts;
    add("idle_bytes_per_host_s", idle > 0 ? static_cast<double>(m->idle.bytes) / idle : 0);
    add("idle_segments_per_host_s", idle > 0 ? static_cast<double>(m->idle.segments) / idle : 0);
    // While the maps ran: per task, and per host and second.
    add("trivial_control_bytes_per_task", static_cast<double>(m->trivial_io.bytes) / trivial);
    add("trivial_control_bytes_per_host_s",
        static_cast<double>(m->trivial_io.bytes) / m->hosts / m->trivial_s);
    add("slow_control_bytes_per_task", static_cast<double>(m->slow_io.bytes) / slow);
    add("slow_control_segments_per_task", static_cast<double>(m->slow_io.segments) / slow);
    add("slow_control_bytes_per_host_s", static_cast<double>(m->slow_io.bytes) / m->hosts / m->slow_s);
  }
  extras.push_back({"trivial_tasks", static_cast<double>(trivial)});
  extras.push_back({"slow_tasks", static_cast<double>(slow)});
  extras.push_back({"slow_us", static_cast<double>(slow_us)});
  extras.push_back({"slow_ratio", b.slow_cpu_us_per_task / a.slow_cpu_us_per_task});
  extras.push_back({"roundtrip_ratio", b.roundtrip_cpu_us / a.roundtrip_cpu_us});
  emit(std::string("scale_") + mode, "trivial_cpu_ratio",
       b.trivial_cpu_ns_per_task / a.trivial_cpu_ns_per_task, "x", extras);
  return 0;
}
