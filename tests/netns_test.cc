// Several worker hosts with a real network between them (issue 19, item 6): the test makes a
// private network of its own (a bridge in this network namespace, 10.213.X.1/24, and one network
// namespace per "host", joined to the bridge by a veth pair whose far end is 10.213.X.(10+i)),
// starts a worker program in each namespace (`ip netns exec`), and runs a pool on the bridge's
// address. Links cross a real network stack between namespaces on non-loopback addresses, so they
// use the token and TLS as between machines. A partition is a host's link set down mid-map.
//
// Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` (iproute2); each case says so and passes
// where they are missing. Names carry this process's pid ("ppnet<pid>..."), so runs in parallel
// do not collide, and what a crashed earlier run left (its pid gone) is removed first. Every
// namespace, veth pair and bridge a case makes is removed when it ends, a failed check included.

#include "procpool/process_pool.h"

#include <arpa/inet.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "tests/fault_support.h"
#include "tests/netns_worker.h"
#include "tests/test_support.h"

extern char** environ;

namespace procpool {
namespace {

using testing::NetnsWorker;
using testing::TempDir;
using testing::wait_until;

struct Setup {
  Setup() { testing::disable_core_dumps(); }
};
const Setup setup;

constexpr char kPrefix[] = "ppnet";  // of every namespace, link and bridge these tests make

// iproute2's `ip`, wherever this system keeps it (a test's PATH may lack the sbin directories).
std::string ip_program() {
  for (const char* path : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}) {
    if (::access(path, X_OK) == 0) return path;
  }
  return "";
}

struct Ran {
  bool ok = false;
  std::string output;  // stdout and stderr together
};

// Runs `ip` with `args` (names and addresses these tests made: nothing to quote).
Ran ip(const std::string& args) {
  Ran ran;
  FILE* pipe = ::popen(absl::StrCat(ip_program(), " ", args, " 2>&1").c_str(), "r");
  if (pipe == nullptr) return ran;
  char buffer[512];
  size_t got = 0;
  while ((got = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) ran.output.append(buffer, got);
  const int status = ::pclose(pipe);
  ran.ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  return ran;
}

// True if this process may make network namespaces and links: it is in the first user namespace
// (not in a sandbox's, whose root may not touch this network namespace's links), with
// CAP_SYS_ADMIN (21) and CAP_NET_ADMIN (12) in its effective set.
bool may_make_networks() {
  std::ifstream uid_map("/proc/self/uid_map");
  uint64_t inside = 1, outside = 1, count = 0;
  if (!(uid_map >> inside >> outside >> count) || inside != 0 || outside != 0 || count != 4294967295u) {
    return false;
  }
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (!absl::StartsWith(line, "CapEff:")) continue;
    const uint64_t caps = std::stoull(line.substr(7), nullptr, 16);
    return (caps >> 21 & 1) != 0 && (caps >> 12 & 1) != 0;
  }
  return false;
}

// The pid in a name "ppnet<pid>...", or 0.
pid_t owner_of(const std::string& name) {
  if (!absl::StartsWith(name, kPrefix)) return 0;
  size_t end = sizeof(kPrefix) - 1;
  while (end < name.size() && name[end] >= '0' && name[end] <= '9') ++end;
  pid_t pid = 0;
  if (!absl::SimpleAtoi(name.substr(sizeof(kPrefix) - 1, end - sizeof(kPrefix) + 1), &pid)) return 0;
  return pid;
}

// Removes the namespaces and links a run that is gone left behind (one that crashed or was
// killed before its guards ran). Those of live runs stay.
void remove_stale() {
  auto stale = [](const std::string& name) {
    const pid_t owner = owner_of(name);
    return owner > 0 && ::kill(owner, 0) != 0 && errno == ESRCH;
  };
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/run/netns", error)) {
    const std::string name = entry.path().filename().string();
    if (stale(name)) (void)ip(absl::StrCat("netns del ", name));
  }
  for (const auto& entry : std::filesystem::directory_iterator("/sys/class/net", error)) {
    const std::string name = entry.path().filename().string();
    if (stale(name)) (void)ip(absl::StrCat("link del ", name));
  }
}

// The inode of a network namespace: what /proc/PID/ns/net of a process in it names.
ino_t namespace_inode(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 ? info.st_ino : 0;
}

using ::procpool::testing::parent_of;

// A private network, removed with everything in it when destroyed: a bridge in this namespace
// with the pool's address, and `hosts` network namespaces joined to it by veth pairs (a
// namespace's end is "net0"). Worker programs started in a namespace are killed and reaped first.
class PrivateNetwork {
 public:
  // Null, with `why` set, when it could not be made (what was made is removed).
  static std::unique_ptr<PrivateNetwork> make(int hosts, std::string* why) {
    remove_stale();
    std::unique_ptr<PrivateNetwork> network(new PrivateNetwork());
    network->bridge_ = absl::StrCat(kPrefix, ::getpid());
    auto must = [why](const std::string& args) {
      const Ran ran = ip(args);
      if (!ran.ok) *why = absl::StrCat("ip ", args, ": ", ran.output);
      return ran.ok;
    };
    const std::string& bridge = network->bridge_;
    if (!must(absl::StrCat("link add ", bridge, " type bridge"))) return nullptr;
    network->links_.push_back(bridge);
    // A /24 in 10.213.0.0/16 that nothing here uses (neither an address nor a route), and that a
    // run beside this one did not take at the same moment: the bridge's is its only address.
    for (int i = 0; i < 250 && network->subnet_.empty(); ++i) {
      const std::string subnet = absl::StrCat("10.213.", (::getpid() + i) % 250 + 1, ".");
      if (absl::StrContains(ip("-4 -o addr show").output + ip("-4 route show").output, subnet)) continue;
      if (!must(absl::StrCat("addr add ", subnet, "1/24 dev ", bridge))) return nullptr;
      const std::string holders = ip(absl::StrCat("-4 -o addr show to ", subnet, "0/24")).output;
      if (std::count(holders.begin(), holders.end(), '\n') == 1) {
        network->subnet_ = subnet;
      } else {
        (void)ip(absl::StrCat("addr del ", subnet, "1/24 dev ", bridge));
      }
    }
    if (network->subnet_.empty()) {
      *why = "no free /24 in 10.213.0.0/16";
      return nullptr;
    }
    if (!must(absl::StrCat("link set ", bridge, " up"))) return nullptr;
    for (int i = 0; i < hosts; ++i) {
      const std::string name = absl::StrCat(bridge, "h", i);
      const std::string veth = absl::StrCat(bridge, "v", i);
      if (!must(absl::StrCat("netns add ", name))) return nullptr;
      network->namespaces_.push_back(name);
      if (!must(absl::StrCat("link add ", veth, " type veth peer name net0 netns ", name))) {
        return nullptr;
      }
      network->links_.push_back(veth);
      if (!must(absl::StrCat("link set ", veth, " master ", bridge)) ||
          !must(absl::StrCat("link set ", veth, " up")) ||
          !must(absl::StrCat("-n ", name, " addr add ", network->host_address(i), "/24 dev net0")) ||
          !must(absl::StrCat("-n ", name, " link set net0 up")) ||
          !must(absl::StrCat("-n ", name, " link set lo up"))) {
        return nullptr;
      }
    }
    return network;
  }

  ~PrivateNetwork() {
    for (pid_t pid : started_) ::kill(pid, SIGKILL);
    for (pid_t pid : started_) ::waitpid(pid, nullptr, 0);
    // A namespace takes its end of each veth pair with it, and so the whole pair.
    for (const std::string& name : namespaces_) (void)ip(absl::StrCat("netns del ", name));
    for (const std::string& link : links_) {
      if (std::filesystem::exists("/sys/class/net/" + link)) (void)ip(absl::StrCat("link del ", link));
    }
  }

  std::string pool_address() const { return subnet_ + "1"; }
  std::string host_address(int i) const { return absl::StrCat(subnet_, 10 + i); }
  const std::vector<std::string>& namespaces() const { return namespaces_; }
  const std::vector<std::string>& links() const { return links_; }
  ino_t inode_of(int i) const { return namespace_inode("/run/netns/" + namespaces_[i]); }

  // A partition: host i's end of its link goes down (its routes with it), or comes back.
  bool set_link(int i, bool up) {
    return ip(absl::StrCat("-n ", namespaces_[i], " link set net0 ", up ? "up" : "down")).ok;
  }

  // Starts the worker program in host i's namespace, dialling `pool` with `token`, as a cluster
  // engine starts one on another machine; `env` is added to its environment. Returns its pid
  // (`ip netns exec` becomes the program). Killed and reaped when the network goes, if still there.
  pid_t start_host(int i, const std::string& pool, const std::string& token,
                   std::vector<std::string> env) {
    std::vector<std::string> args = {ip_program(), "netns", "exec", namespaces_[i],
                                     testing::helper_program("netns_worker_helper")};
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    env.push_back(absl::StrCat("PROCPOOL_CONNECT=", pool));
    env.push_back(absl::StrCat("PROCPOOL_TOKEN=", token));
    env.push_back("PROCPOOL_CONNECT_TIMEOUT=30");
    std::vector<char*> envp;
    for (char** e = environ; *e != nullptr; ++e) {
      if (!absl::StartsWith(*e, "PROCPOOL_")) envp.push_back(*e);
    }
    for (std::string& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    pid_t pid = -1;
    REQUIRE(::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), envp.data()) == 0);
    started_.push_back(pid);
    return pid;
  }

  // Waits for a host started here to exit; its wait status, or nullopt if it did not in time.
  std::optional<int> reap(pid_t pid, absl::Duration timeout) {
    int status = 0;
    if (!wait_until([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, timeout)) return std::nullopt;
    std::erase(started_, pid);
    return status;
  }

 private:
  PrivateNetwork() = default;

  std::string bridge_;
  std::string subnet_;  // "10.213.X."
  std::vector<std::string> namespaces_;
  std::vector<std::string> links_;  // in this namespace: the bridge and the veth ends on it
  std::vector<pid_t> started_;
};

// The network for a case, or null when this machine cannot make one (the case then passes,
// saying why). Where it may, a failure to make it fails the case: CI runs as root and must run it.
std::unique_ptr<PrivateNetwork> network_or_skip(int hosts) {
  if (::geteuid() != 0 || !may_make_networks()) {
    MESSAGE("skipped: making network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) "
            "outside any user namespace (Bazel's sandbox has one: the target is tagged no-sandbox)");
    return nullptr;
  }
  if (ip_program().empty()) {
    MESSAGE("skipped: no `ip` program (iproute2)");
    return nullptr;
  }
  std::string why;
  std::unique_ptr<PrivateNetwork> network = PrivateNetwork::make(hosts, &why);
  REQUIRE_MESSAGE(network != nullptr, why);
  return network;
}

// Nothing of `network` is left once it is gone: no namespace, no link.
void check_removed(const std::vector<std::string>& namespaces, const std::vector<std::string>& links) {
  for (const std::string& name : namespaces) {
    CAPTURE(name);
    CHECK(!std::filesystem::exists("/run/netns/" + name));
  }
  for (const std::string& link : links) {
    CAPTURE(link);
    CHECK(!std::filesystem::exists("/sys/class/net/" + link));
  }
}

PoolOptions pool_options(int workers, RemoteOptions remote) {
  PoolOptions options;
  options.workers = workers;
  if (std::getenv("PROCPOOL_TEST_LOG") == nullptr) options.log_sink = nullptr;
  options.remote = std::move(remote);
  return options;
}

using testing::all_serving;

// The worker (its pid) that host `relay` runs for the pool now, or 0.
pid_t worker_of(const PoolStats& stats, pid_t relay) {
  for (const WorkerStats& worker : stats.workers) {
    if (worker.pid > 0 && (worker.state == WorkerState::kIdle || worker.state == WorkerState::kBusy) &&
        parent_of(worker.pid) == relay) {
      return worker.pid;
    }
  }
  return 0;
}

// Which pids ran each job, from the events file ("run <pid> <job>").
std::map<int64_t, std::vector<pid_t>> runs_of(const std::string& events) {
  std::map<int64_t, std::vector<pid_t>> runs;
  for (const std::string& line : testing::read_lines(events)) {
    std::vector<std::string> parts = absl::StrSplit(line, ' ');
    pid_t pid = 0;
    int64_t job = 0;
    if (parts.size() == 3 && parts[0] == "run" && absl::SimpleAtoi(parts[1], &pid) &&
        absl::SimpleAtoi(parts[2], &job)) {
      runs[job].push_back(pid);
    }
  }
  return runs;
}

// Established TCP connections of this network namespace from `local` (a.b.c.d:port) to
// `remote_host` (a.b.c.d, any port), from /proc/net/tcp.
int connections(const std::string& local, const std::string& remote_host) {
  auto hex = [](const std::string& dotted) {
    in_addr address{};
    ::inet_pton(AF_INET, dotted.c_str(), &address);
    char text[9];
    std::snprintf(text, sizeof(text), "%08X", address.s_addr);  // as the kernel prints it
    return std::string(text);
  };
  const std::vector<std::string> host_port = absl::StrSplit(local, ':');
  int port = 0;
  if (host_port.size() != 2 || !absl::SimpleAtoi(host_port[1], &port)) return -1;
  char port_text[5];
  std::snprintf(port_text, sizeof(port_text), "%04X", port);
  const std::string want_local = absl::StrCat(hex(host_port[0]), ":", port_text);
  const std::string want_remote = hex(remote_host) + ":";
  int count = 0;
  std::ifstream tcp("/proc/self/net/tcp");
  for (std::string line; std::getline(tcp, line);) {
    std::vector<std::string> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (fields.size() > 3 && fields[1] == want_local && absl::StartsWith(fields[2], want_remote) &&
        fields[3] == "01") {
      ++count;
    }
  }
  return count;
}

TEST_CASE("worker hosts in network namespaces of their own serve a pool over a real network, "
          "with TLS and the token; every namespace and link is removed afterwards") {
  constexpr int kHosts = 3;
  std::vector<std::string> namespaces, links;
  {
    std::unique_ptr<PrivateNetwork> network = network_or_skip(kHosts);
    if (network == nullptr) return;
    namespaces = network->namespaces();
    links = network->links();
    TempDir dir;
    const std::string events = dir.file("events");
    const std::string token = make_token();
    std::vector<pid_t> relays;
    {
      ProcessPool<NetnsWorker> pool(pool_options(
          kHosts, RemoteOptions{.listen = network->pool_address() + ":0",
                                .token = token,
                                .connect_timeout = absl::Seconds(30)}));
      const std::string address = pool.remote_address();
      REQUIRE(absl::StartsWith(address, network->pool_address() + ":"));
      for (int i = 0; i < kHosts; ++i) {
        relays.push_back(network->start_host(
            i, address, token, {"NETNS_EVENTS=" + events, "NETNS_TASK_MS=20"}));
      }
      REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(30)));

      // Each worker runs in its host's namespace, forked by the program started there.
      for (int i = 0; i < kHosts; ++i) {
        CAPTURE(i);
        const pid_t worker = worker_of(pool.stats(), relays[i]);
        REQUIRE(worker > 0);
        CHECK(namespace_inode(absl::StrCat("/proc/", worker, "/ns/net")) == network->inode_of(i));
      }
      // Each host's connections leave from its own address: its worker says so, and the pool has
      // them (a control and a data connection) from that address on the bridge's.
      std::vector<int64_t> ask(30, testing::kSourceAddress);
      absl::StatusOr<std::vector<int64_t>> sources =
          testing::map_within(pool, ask, {.chunksize = 1}, absl::Seconds(60));
      REQUIRE_MESSAGE(sources.ok(), sources.status());
      std::set<std::string> seen;
      for (int64_t source : *sources) {
        in_addr address{.s_addr = htonl(static_cast<uint32_t>(source))};
        char text[INET_ADDRSTRLEN] = {};
        ::inet_ntop(AF_INET, &address, text, sizeof(text));
        seen.insert(text);
      }
      std::set<std::string> hosts;
      for (int i = 0; i < kHosts; ++i) hosts.insert(network->host_address(i));
      CHECK(seen == hosts);
      for (int i = 0; i < kHosts; ++i) {
        CAPTURE(i);
        CHECK(connections(address, network->host_address(i)) >= 2);
      }

      std::vector<int64_t> jobs;
      for (int64_t i = 0; i < 120; ++i) jobs.push_back(i);
      absl::StatusOr<std::vector<int64_t>> results =
          testing::map_within(pool, jobs, {.chunksize = 2}, absl::Seconds(60));
      REQUIRE_MESSAGE(results.ok(), results.status());
      for (int64_t i = 0; i < 120; ++i) CHECK((*results)[i] == 3 * i + 1);
      const auto runs = runs_of(events);
      CHECK(runs.size() == 120);
      for (const auto& run : runs) {  // no structured binding: clang 14 cannot capture one
        CAPTURE(run.first);
        CHECK(run.second.size() == 1);
      }
      REQUIRE(pool.close().ok());
      const absl::Status joined = pool.join();
      CHECK_MESSAGE(joined.ok(), joined);
    }
    // The pool closed their connections: each host leaves, 0.
    for (pid_t relay : relays) {
      std::optional<int> status = network->reap(relay, absl::Seconds(20));
      REQUIRE(status.has_value());
      CHECK(WIFEXITED(*status));
      CHECK(WEXITSTATUS(*status) == 0);
    }
  }
  check_removed(namespaces, links);
}

TEST_CASE("a host cut off mid-map: its tasks fail kAborted or run again after heartbeat_timeout, "
          "nothing is lost, its worker stops by itself, and it serves again when its link comes "
          "back") {
  constexpr int kHosts = 3;
  constexpr int kCut = 1;  // the host whose link goes down
  const absl::Duration heartbeat = absl::Seconds(2);
  int retries = 0;
  SUBCASE("without retries") { retries = 0; }
  SUBCASE("with retries") { retries = 1; }
  CAPTURE(retries);
  std::vector<std::string> namespaces, links;
  {
    std::unique_ptr<PrivateNetwork> network = network_or_skip(kHosts);
    if (network == nullptr) return;
    namespaces = network->namespaces();
    links = network->links();
    TempDir dir;
    const std::string events = dir.file("events");
    const std::string token = make_token();
    ProcessPool<NetnsWorker> pool(pool_options(
        kHosts, RemoteOptions{.listen = network->pool_address() + ":0",
                              .token = token,
                              .connect_timeout = absl::Seconds(60),
                              .heartbeat_timeout = heartbeat}));
    std::vector<pid_t> relays;
    for (int i = 0; i < kHosts; ++i) {
      relays.push_back(network->start_host(i, pool.remote_address(), token,
                                           {"NETNS_EVENTS=" + events, "NETNS_TASK_MS=100"}));
    }
    REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(30)));
    const pid_t cut_worker = worker_of(pool.stats(), relays[kCut]);
    REQUIRE(cut_worker > 0);

    // 30 tasks of 100 ms over 3 hosts: about 1 s of work; the cut comes once the cut host runs one.
    constexpr int kJobs = 30;
    std::vector<int64_t> jobs;
    for (int64_t i = 0; i < kJobs; ++i) jobs.push_back(i);
    std::promise<std::vector<absl::StatusOr<int64_t>>> done;
    std::future<std::vector<absl::StatusOr<int64_t>>> outcomes_future = done.get_future();
    std::thread caller([&] {
      std::vector<absl::StatusOr<int64_t>> outcomes;
      for (absl::StatusOr<int64_t> outcome : pool.imap(jobs, {.chunksize = 1, .retries = retries})) {
        outcomes.push_back(std::move(outcome));
      }
      done.set_value(std::move(outcomes));
    });
    const bool cut_runs = wait_until(
        [&] {
          for (const auto& [job, pids] : runs_of(events)) {
            if (std::find(pids.begin(), pids.end(), cut_worker) != pids.end()) return true;
          }
          return false;
        },
        absl::Seconds(30));
    CHECK(cut_runs);
    REQUIRE(network->set_link(kCut, false));
    const absl::Time cut_at = absl::Now();
    if (outcomes_future.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
      pool.terminate();
    }
    caller.join();
    const std::vector<absl::StatusOr<int64_t>> outcomes = outcomes_future.get();
    const absl::Duration settled = absl::Now() - cut_at;
    MESSAGE("every outcome ", absl::FormatDuration(settled), " after the cut");
    // The cut host's task was settled when the pool had heard nothing for heartbeat_timeout (its
    // last heartbeat came a ping interval, a quarter of it, before the cut at most).
    CHECK(settled >= heartbeat / 2);

    // One outcome a job: right, or (without retries) kAborted for a task the cut host held.
    const auto runs = runs_of(events);
    REQUIRE(outcomes.size() == static_cast<size_t>(kJobs));
    int aborted = 0;
    for (int64_t i = 0; i < kJobs; ++i) {
      CAPTURE(i);
      const absl::StatusOr<int64_t>& outcome = outcomes[i];
      if (outcome.ok()) {
        CHECK(*outcome == 3 * i + 1);
        continue;
      }
      ++aborted;
      CHECK_MESSAGE(outcome.status().code() == absl::StatusCode::kAborted, outcome.status());
      CHECK(retries == 0);
      const auto ran = runs.find(i);
      REQUIRE(ran != runs.end());
      CHECK(std::find(ran->second.begin(), ran->second.end(), cut_worker) != ran->second.end());
    }
    if (retries == 0) CHECK(aborted >= 1);  // the cut host was running one
    // Nothing lost: every job ran; none ran twice but for what the cut host ran, whose results
    // could not come back.
    CHECK(runs.size() == static_cast<size_t>(kJobs));
    for (const auto& run : runs) {
      CAPTURE(run.first);
      CHECK(std::count_if(run.second.begin(), run.second.end(),
                          [&](pid_t pid) { return pid != cut_worker; }) <= 1);
    }

    // Its worker stops by itself, though nothing reaches its host.
    CHECK(wait_until([&] { return !testing::process_alive(cut_worker); }, absl::Seconds(20)));
    for (int i = 0; i < kHosts; ++i) {
      if (i != kCut) CHECK(worker_of(pool.stats(), relays[i]) > 0);
    }

    // The link comes back: the same host serves again, and takes its share of a new map.
    REQUIRE(network->set_link(kCut, true));
    const absl::Time healed_at = absl::Now();
    pid_t again = 0;
    CHECK(wait_until([&] { return (again = worker_of(pool.stats(), relays[kCut])) > 0; },
                     absl::Seconds(30)));
    MESSAGE("serving again ", absl::FormatDuration(absl::Now() - healed_at), " after the link came back");
    REQUIRE(again > 0);
    CHECK(again != cut_worker);
    CHECK(namespace_inode(absl::StrCat("/proc/", again, "/ns/net")) == network->inode_of(kCut));
    REQUIRE(wait_until([&] { return all_serving(pool.stats()); }, absl::Seconds(30)));
    std::vector<int64_t> more;
    for (int64_t i = 1000; i < 1015; ++i) more.push_back(i);
    absl::StatusOr<std::vector<int64_t>> results =
        testing::map_within(pool, more, {.chunksize = 1}, absl::Seconds(60));
    REQUIRE_MESSAGE(results.ok(), results.status());
    for (size_t i = 0; i < more.size(); ++i) CHECK((*results)[i] == 3 * more[i] + 1);
    bool served = false;
    for (const auto& [job, pids] : runs_of(events)) {
      if (job >= 1000 && std::find(pids.begin(), pids.end(), again) != pids.end()) served = true;
    }
    CHECK(served);
  }
  check_removed(namespaces, links);
}

}  // namespace
}  // namespace procpool
