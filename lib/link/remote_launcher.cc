#include "lib/link/remote_launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "lib/common/child_process.h"
#include "lib/common/clock.h"
#include "lib/link/handshake.h"
#include "lib/link/remote_frames.h"
#include "lib/link/worker_process.h"
#include "lib/worker/worker_placement.h"

extern char** environ;

namespace procpool::internal {
namespace {

// Admission. Connections not yet authenticated are at most kMaxHandshaking; the pool works on
// the handshakes of at most kMaxHandshakingPerSource from one address at a time, and the others
// from that address are held, unread, until one of those ends (64 relays of one host, or behind
// one NAT, that start together are all let in, none closed to dial again after a backoff). Each
// has kHandshakeDeadline from its accept to finish. A connection that would pass a cap takes the
// place of the oldest one that has sent nothing for kSilentAfterNs (from its address, or from
// any), and a held one that has spoken takes such a place as soon as there is one: a real worker
// says hello as soon as it has dialled, so a flood of idle connections, from its own address or
// not, does not keep it out. When none has been silent and the pool is full, a held connection of
// the address that holds the most makes room for one of an address holding fewer (held ones cannot
// keep other addresses out); else the new connection is closed, and its relay dials again
// (relay.cc). The listen backlog is the longest the system allows (listen_tcp), and each turn of
// the pool's loop accepts at most kMaxAcceptsPerTurn, so a flood cannot starve the connections
// already in.
constexpr size_t kMaxHandshaking = 256;
constexpr size_t kMaxHandshakingPerSource = 32;
constexpr absl::Duration kHandshakeDeadline = absl::Seconds(5);
constexpr int kMaxAcceptsPerTurn = 64;
// A real relay sends its first bytes (its ClientHello, or its hello) as soon as it has connected,
// but on a loaded host (64 relays starting on 2 cores) it may be descheduled between the two for
// tens of milliseconds (85 ms seen). A connection is taken for an idle one, which a newer one may
// replace, only once it has sent nothing for this long: a real relay's connection closed costs
// it a backoff, and a closed data connection fails its worker's start. Meanwhile newer ones are
// held; a held one that has spoken (a relay's ClientHello waits in it) takes the place of one
// silent this long as soon as there is one, looked for every kSilentRecheckNs.
constexpr int64_t kSilentAfterNs = 1'000'000'000;
constexpr int64_t kSilentRecheckNs = 250'000'000;
// Out of descriptors (EMFILE, ENFILE) or kernel memory, accept() fails while connections wait and
// the listener stays readable: polled again at once, the pool's thread would spin. The listener
// rests this long; handshakes and workers already in go on.
constexpr int64_t kAcceptPauseNs = 200'000'000;
// Authenticated hosts beyond those the pool's workers can use (late joiners, spares, hosts whose
// worker's start failed) are kept up to this many; more are closed once welcomed. Small: the
// pool's descriptors stay within 2 a worker plus 64 (bench_scale: 583 at 256 workers over
// loopback with 64 spares, beyond the 576 allowed).
constexpr int kSpareHosts = 16;
// The most a worker's placement (its env, the pool's name) may take in its host's spawn request,
// a control frame (remote_frames.h): what is left of one after the request's other fields.
constexpr size_t kMaxPlacementBytes = kControlFrameBytes - 1024;
// A launch command whose worker came is watched without its pidfd (a pool of many launched workers
// would hold a third descriptor a worker for it): its exit now only needs reaping, which a look
// this often does (a waitpid each, for as many commands as workers: 256 a second at 256).
constexpr int64_t kCameLookIntervalNs = 1'000'000'000;
// Budgets. A remote pool holds 2 descriptors a worker (its host's control connection and its
// data connection; a third, the launch command's pidfd, only until its worker comes), and needs
// this many more for handshakes in progress, spare hosts and its own (the listener, event fds,
// logs).
constexpr int kDescriptorHeadroom = static_cast<int>(kMaxHandshaking) + kSpareHosts + 64;
// Bytes in unfinished frames over all authenticated connections (FrameBudget): a token holder
// cannot make the pool hold more in frames it never finishes, beside the largest one.
constexpr size_t kUnfinishedFrameBudget = size_t{64} << 20;
// Why hosts were refused goes into calls' errors. Peers that need no token to be refused choose
// much of it (the worker type they name), and any number may dial: a few reasons are kept, each
// cut short, and the rest only counted.
constexpr size_t kMaxRefusalReasons = 8;
constexpr size_t kMaxRefusalBytes = 200;

// The keys of this launcher's watches (PollSet::watch): the listener's, a launch command's pidfd's
// (this bit and a serial), a host's connection's (a serial).
constexpr uint64_t kListenerKey = 0;
constexpr uint64_t kLaunchedKeyBit = uint64_t{1} << 63;

// "10.0.0.7" of "10.0.0.7:51234", "[::1]" of "[::1]:51234".
std::string source_of(const std::string& peer) { return peer.substr(0, peer.rfind(':')); }

}  // namespace

RemoteLauncher::RemoteLauncher(Config config) : config_(std::move(config)) {
  // No pool without a secret: a pool given none makes one, for its launches and remote_token().
  if (config_.remote.token.empty()) config_.remote.token = make_token();
  host_config_.token = config_.remote.token;
  host_config_.worker_type = config_.worker_type;
  host_config_.limits.max_frame_bytes = config_.max_frame_bytes;
  host_config_.limits.heartbeat_timeout = config_.remote.heartbeat_timeout;
  host_config_.limits.kill_grace = config_.kill_grace;
  host_config_.limits.frame_timeout = config_.frame_timeout;
  host_config_.limits.name = config_.name;
  host_config_.limits.resident_bytes = config_.report_resident_bytes;
  host_config_.limits.max_worker_memory_bytes = config_.max_worker_memory_bytes;
  host_config_.limits.cgroups_off = config_.cgroups_off;
  host_config_.limits.forward_output = config_.forward_output;
  host_config_.limits.crash_backtraces = config_.crash_backtraces;
  host_config_.handshake_timeout = kHandshakeDeadline;  // not connect_timeout's: a flood's turnover
  host_config_.frame_budget = std::make_shared<FrameBudget>(kUnfinishedFrameBudget);
}

absl::Status RemoteLauncher::raise_descriptor_limit() const {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) {
    return absl::ErrnoToStatus(errno, "reading RLIMIT_NOFILE");
  }
  // The soft limit is often 1024 while the hard one is far higher: a remote pool takes what it may.
  if (limit.rlim_cur < limit.rlim_max) {
    rlimit raised = limit;
    raised.rlim_cur = limit.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
  }
  const int per_worker = config_.remote.launch.empty() ? 2 : 3;
  const rlim_t needed = static_cast<rlim_t>(per_worker) * static_cast<rlim_t>(config_.workers) +
                        kDescriptorHeadroom;
  if (limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur < needed) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "RLIMIT_NOFILE: a pool of ", config_.workers, " remote workers needs about ", needed,
        " file descriptors (", per_worker, " a worker, and ", kDescriptorHeadroom,
        " for handshakes and the pool), but this process may open ", limit.rlim_cur,
        " (its hard limit is ", limit.rlim_max,
        "): raise the hard limit (ulimit -Hn, LimitNOFILE=, limits.conf) or use fewer workers"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<RemoteLauncher>> RemoteLauncher::start(Config config) {
  absl::StatusOr<HostPort> listen = parse_host_port(config.remote.listen);
  if (!listen.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("RemoteOptions::listen: ", listen.status().message()));
  }
  auto launcher = std::unique_ptr<RemoteLauncher>(new RemoteLauncher(std::move(config)));
  const RemoteOptions& remote = launcher->config_.remote;
  if (remote.encrypt) {
    absl::StatusOr<std::shared_ptr<TlsContext>> tls =
        remote.tls ? TlsContext::with_certificates(remote.tls->ca_file, remote.tls->cert_file,
                                                   remote.tls->key_file, TlsContext::Role::kServer)
                   : TlsContext::with_token(remote.token, TlsContext::Role::kServer);
    if (!tls.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("RemoteOptions::tls: ", tls.status().message()));
    }
    launcher->host_config_.tls = *std::move(tls);
  }
  if (absl::Status fits = launcher->raise_descriptor_limit(); !fits.ok()) return fits;
  absl::StatusOr<UniqueFd> listener = listen_tcp(*listen);
  if (!listener.ok()) return listener.status();
  launcher->listener_ = *std::move(listener);
  absl::StatusOr<HostPort> bound = local_address(launcher->listener_.get());
  if (!bound.ok()) return bound.status();
  if (!launcher->config_.remote.advertise.empty()) {
    launcher->address_ = launcher->config_.remote.advertise;
  } else {
    HostPort dial = *bound;
    if (is_wildcard_host(listen->host)) {
      char host[256] = {};
      ::gethostname(host, sizeof(host) - 1);
      dial.host = host;
    } else {
      dial.host = listen->host;
    }
    launcher->address_ = dial.to_string();
  }
  launcher->first_wait_until_ns_ = monotonic_now_ns() + to_ns(launcher->config_.remote.connect_timeout);
  return launcher;
}

RemoteLauncher::~RemoteLauncher() {
  // Every relay sees end of file, ends its worker and exits; then what we launched (an srun
  // step, an ssh) ends with it. One that has not within kill_grace (a stopped or hung launch
  // command) gets SIGTERM, and SIGKILL after another kill_grace, as a worker would: the pool's
  // destructor ends within join_timeout and a few kill_graces (guide, "Exit"). Each wait is
  // 0.1-10 s whatever kill_grace says: an infinite one must not hold the destructor forever.
  for (TcpLink* link : links_) {
    link->on_destroy(nullptr);
    link->on_stopped_waiting(nullptr);
  }
  hosts_.clear();
  if (launched_.empty()) return;
  const int64_t grace = std::clamp<int64_t>(to_ns(config_.kill_grace), 100'000'000, 10'000'000'000);
  auto reap_within = [this](int64_t ns) {
    const int64_t until = monotonic_now_ns() + ns;
    while (!launched_.empty() && monotonic_now_ns() < until) {
      reap_launched(nullptr);
      if (!launched_.empty()) ::usleep(10'000);
    }
  };
  reap_within(grace);
  for (int signal : {SIGTERM, SIGKILL}) {
    for (Launched& process : launched_) signal_child(process.pid, process.pidfd.get(), signal);
    reap_within(signal == SIGTERM ? grace : 1'000'000'000);
  }
}

absl::Status RemoteLauncher::run_launch_command(const std::string& launch_id) {
  std::vector<std::string> args;
  for (const std::string& arg : config_.remote.launch) {
    args.push_back(absl::StrReplaceAll(arg, {{"{address}", address_}}));
  }
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  // Its environment is ours, with the token (never on the command line: it would show in ps)
  // and the address to dial.
  std::vector<std::string> env_strings = {absl::StrCat("PROCPOOL_TOKEN=", config_.remote.token),
                                          absl::StrCat("PROCPOOL_CONNECT=", address_),
                                          absl::StrCat("PROCPOOL_LAUNCH_ID=", launch_id)};
  // How to speak to us: in plaintext only when told (relay.h), with the pool's certificates
  // unless this environment names the workers' own.
  if (!config_.remote.encrypt) env_strings.push_back("PROCPOOL_ENCRYPT=0");
  const bool own_certificates = std::getenv("PROCPOOL_TLS_CERT") != nullptr;
  if (config_.remote.tls && !own_certificates) {
    env_strings.push_back(absl::StrCat("PROCPOOL_TLS_CA=", config_.remote.tls->ca_file));
    env_strings.push_back(absl::StrCat("PROCPOOL_TLS_CERT=", config_.remote.tls->cert_file));
    env_strings.push_back(absl::StrCat("PROCPOOL_TLS_KEY=", config_.remote.tls->key_file));
  }
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (absl::StartsWith(*e, "PROCPOOL_TOKEN=") || absl::StartsWith(*e, "PROCPOOL_CONNECT=") ||
        absl::StartsWith(*e, "PROCPOOL_LAUNCH_ID=") || absl::StartsWith(*e, "PROCPOOL_ENCRYPT=") ||
        (config_.remote.tls && !own_certificates && absl::StartsWith(*e, "PROCPOOL_TLS_"))) {
      continue;
    }
    envp.push_back(*e);
  }
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attributes, &none);
  sigset_t defaults;
  sigfillset(&defaults);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  const int rc = ::posix_spawnp(&pid, argv[0], &actions, &attributes, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (rc != 0) {
    const absl::Status failed = absl::ErrnoToStatus(
        rc, absl::StrCat("could not run the launch command `", absl::StrJoin(args, " "), "`"));
    // A full process table is the fork failure any start may meet; anything else (no such
    // program, not executable) is the command's own fault, and the option to fix is named.
    if (rc == EAGAIN || rc == ENOMEM) return absl::ResourceExhaustedError(failed.message());
    return absl::InvalidArgumentError(absl::StrCat("RemoteOptions::launch: ", failed.message()));
  }
  // Without a pidfd (a kernel before 5.3) check() looks for its exit.
  Launched& process = launched_.emplace_back();
  process.pid = pid;
  process.pidfd = open_pidfd(pid);
  process.launch_id = launch_id;
  if (poll_set_ != nullptr && process.pidfd) {
    process.watch = poll_set_->watch(poll_group_, process.pidfd.get(), POLLIN,
                                     kLaunchedKeyBit | ++last_key_);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<WorkerLink>> RemoteLauncher::launch(int slot,
                                                                   const std::string& name) {
  RemoteHost* free_host = nullptr;
  int64_t wait_until = 0;
  std::string launch_id;
  for (auto& host : hosts_) {
    if (host->state() == RemoteHost::State::kIdle) {
      free_host = host.get();
      break;
    }
  }
  if (free_host == nullptr) {
    const int64_t now = monotonic_now_ns();
    if (!config_.remote.launch.empty()) {
      launch_id = absl::BytesToHexString(make_nonce());
      if (absl::Status ran = run_launch_command(launch_id); !ran.ok()) return ran;
      wait_until = now + to_ns(config_.remote.connect_timeout);
    } else if (now < first_wait_until_ns_) {
      wait_until = first_wait_until_ns_;
    } else {
      return waiting_for_host(unavailable_reason());
    }
  }
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> env =
      evaluate_worker_env(config_.worker_env, slot);
  if (!env.ok()) return env.status();
  WorkerPlacement placement{.generation = generations_[slot],
                            .workers = config_.workers,
                            .pool_name = config_.name,
                            .env = *std::move(env),
                            .spread_cpus = config_.spread_cpus};
  // It goes in the host's spawn request, a control frame: a relay refuses a larger one by
  // dropping the pool's connection, and with it every worker on that host.
  if (const size_t bytes = placement_wire_bytes(placement); bytes > kMaxPlacementBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PoolOptions::worker_env for slot ", slot, ": its variables (with PoolOptions::name) take ",
        bytes, " bytes, more than the ", kMaxPlacementBytes,
        " a remote worker's spawn request carries"));
  }
  ++generations_[slot];
  auto link = std::make_unique<TcpLink>(name, slot, wait_until, host_config_.limits);
  link->set_placement(std::move(placement));
  TcpLink* raw = link.get();
  links_.push_back(raw);
  link->on_destroy([this, raw] {
    std::erase(waiting_, raw);
    std::erase(links_, raw);
    std::erase_if(launches_, [raw](const auto& launch) { return launch.second == raw; });
    hosts_changed_ = true;  // its host (if any) is free now, or closed (it drained)
  });
  // A link stopped while it waits ends at the next check(), not at its wait's end.
  link->on_stopped_waiting([this] { check_soon_ = true; });
  check_soon_ = true;  // its wait's end, its launch command's exit
  if (!launch_id.empty()) launches_[launch_id] = raw;
  if (free_host != nullptr) {
    raw->bind(free_host);
  } else {
    waiting_.push_back(raw);
  }
  return link;
}

void RemoteLauncher::hand_over_data(RemoteHost& host, LauncherEvents& events) {
  TcpLink* owner = nullptr;
  for (TcpLink* link : links_) {
    if (!link->data_id().empty() && link->data_id() == host.data_id()) owner = link;
  }
  // A spawn nobody waits for any more (its link ended before its worker dialled): dropped.
  if (owner == nullptr) {
    (void)host.take_channel();
    return;
  }
  // Only the control session the spawn was asked of knows its key (handshake.h): a token holder
  // with a session of its own cannot take another host's worker slot.
  if (!proof_matches(owner->session_secret(), "data", host.data_id(), host.data_exporter(),
                     host.data_proof())) {
    host.refuse("a worker's data connection did not prove the control session its spawn was asked of");
    return;
  }
  owner->attach(host.take_channel(), host.take_reader(), events.events_of(*owner));
}

void RemoteLauncher::count_refusal(const std::string& why) {
  std::string reason = why.size() > kMaxRefusalBytes
                           ? absl::StrCat(why.substr(0, kMaxRefusalBytes), "...")
                           : why;
  if (refusals_.size() >= kMaxRefusalReasons && !refusals_.contains(reason)) {
    reason = "other reasons";
  }
  ++refusals_[reason];
}

std::string RemoteLauncher::unavailable_reason() const {
  int busy = 0;
  for (const auto& host : hosts_) busy += host->state() == RemoteHost::State::kBusy;
  std::string why =
      connected_ever_ == 0
          ? absl::StrCat("no remote worker has connected to ", address_, " (within ",
                         absl::FormatDuration(config_.remote.connect_timeout), ")")
      : busy == 0
          ? absl::StrCat("every remote worker that connected to ", address_, " (", connected_ever_,
                         ") is gone, and none connected again")
          : absl::StrCat("no remote worker is free: ", busy, " connected to ", address_,
                         ", all busy");
  return absl::StrCat(why, refusal_summary());
}

std::string RemoteLauncher::refusal_summary() const {
  if (refusals_.empty()) return "";
  std::vector<std::string> parts;
  for (const auto& [reason, count] : refusals_) parts.push_back(absl::StrCat(count, " x ", reason));
  return absl::StrCat("; refused: ", absl::StrJoin(parts, "; "));
}

std::string RemoteLauncher::launch_command() const {
  return absl::StrCat("the worker launched by `", absl::StrJoin(config_.remote.launch, " "), "`");
}

TcpLink* RemoteLauncher::take_launch(const std::string& launch_id) {
  if (launch_id.empty()) return nullptr;
  // Its worker came (welcomed or refused), whether or not its link still waits for it (one whose
  // start failed meanwhile leaves a spare host): its command's exit says nothing more about this
  // launch, and it is only reaped, by looking.
  for (Launched& process : launched_) {
    if (process.launch_id != launch_id) continue;
    process.watch.reset();
    process.pidfd.reset();
    process.came = true;
  }
  auto it = launches_.find(launch_id);
  if (it == launches_.end()) return nullptr;
  TcpLink* link = it->second;
  launches_.erase(it);  // a launch's worker comes once: a second hello with its id is no one's
  auto waiting = std::find(waiting_.begin(), waiting_.end(), link);
  // Its link took another host meanwhile, or was stopped (check() ends it).
  if (waiting == waiting_.end() || link->stopped_waiting()) return nullptr;
  waiting_.erase(waiting);
  return link;
}

int RemoteLauncher::hosts_welcomed() const {
  int count = 0;
  for (const auto& host : hosts_) {
    count += host->state() == RemoteHost::State::kIdle || host->state() == RemoteHost::State::kBusy;
  }
  return count;
}

bool RemoteLauncher::close_oldest_silent(const std::string& source, int64_t now_ns,
                                         const EventsOf& events_of) {
  RemoteHost* oldest = nullptr;
  for (const auto& host : hosts_) {
    if (host->state() != RemoteHost::State::kHandshake) continue;
    if (now_ns - host->accepted_ns() < kSilentAfterNs) continue;
    if (!source.empty() && source_of(host->peer()) != source) continue;
    if (oldest != nullptr && host->handshake_deadline_ns() >= oldest->handshake_deadline_ns()) continue;
    if (host->silent()) oldest = host.get();
  }
  if (oldest != nullptr) {
    hosts_changed_ = true;
    oldest->close(!source.empty() ? "sent nothing, and more connections from its address were waiting"
                                  : "sent nothing, and more connections were waiting",
                  events_of);
    return true;
  }
  if (!source.empty()) return false;
  for (auto it = held_.begin(); it != held_.end(); ++it) {
    if (now_ns - it->accepted_ns >= kSilentAfterNs && sent_nothing(it->socket.get())) {
      held_.erase(it);
      return true;
    }
  }
  return false;
}

RemoteLauncher::Admission RemoteLauncher::admit(const std::string& source, int64_t now_ns,
                                                const EventsOf& events_of) {
  size_t in_handshake = 0;
  size_t from_source = 0;
  for (const auto& host : hosts_) {
    if (host->state() != RemoteHost::State::kHandshake) continue;
    ++in_handshake;
    from_source += source_of(host->peer()) == source;
  }
  const bool source_full = from_source >= kMaxHandshakingPerSource;
  const bool pool_full = in_handshake + held_.size() >= kMaxHandshaking;
  if (!source_full && !pool_full) return Admission::kBegin;
  // The oldest silent one from the same address, when that is what is full, lets it begin now.
  if (source_full && close_oldest_silent(source, now_ns, events_of)) return Admission::kBegin;
  if (pool_full && !close_oldest_silent("", now_ns, events_of)) {
    // None silent: the newest held connection of the address holding the most, if that holds more
    // than this one's.
    std::map<std::string, size_t> held_from;
    for (const HeldConnection& held : held_) ++held_from[held.source];
    auto most = std::max_element(held_from.begin(), held_from.end(),
                                 [](const auto& a, const auto& b) { return a.second < b.second; });
    if (most == held_from.end() || most->second <= held_from[source]) return Admission::kClose;
    const std::string heaviest = most->first;
    for (auto it = held_.rbegin(); it != held_.rend(); ++it) {
      if (it->source != heaviest) continue;
      held_.erase(std::next(it).base());
      break;
    }
  }
  return source_full ? Admission::kHold : Admission::kBegin;
}

int64_t RemoteLauncher::begin_held(int64_t now_ns, const EventsOf& events_of) {
  if (held_.empty()) return INT64_MAX;
  std::map<std::string, size_t> handshaking;
  for (const auto& host : hosts_) {
    if (host->state() == RemoteHost::State::kHandshake) ++handshaking[source_of(host->peer())];
  }
  std::set<std::string> none_silent;  // addresses with no connection silent long enough, now
  int64_t next = INT64_MAX;
  for (auto it = held_.begin(); it != held_.end();) {
    const int64_t deadline = it->accepted_ns + to_ns(kHandshakeDeadline);
    if (now_ns >= deadline) {
      it = held_.erase(it);  // closed: its relay dials again
      continue;
    }
    size_t& under_way = handshaking[it->source];
    if (under_way >= kMaxHandshakingPerSource && !none_silent.contains(it->source) &&
        !sent_nothing(it->socket.get())) {
      // It has spoken: it takes the place of one from its address silent long enough, if any.
      if (close_oldest_silent(it->source, now_ns, events_of)) {
        --under_way;
      } else {
        none_silent.insert(it->source);
        next = std::min(next, now_ns + kSilentRecheckNs);
      }
    }
    if (under_way < kMaxHandshakingPerSource) {
      ++under_way;
      add_host(std::make_unique<RemoteHost>(std::move(it->socket), std::move(it->peer),
                                            host_config_, it->accepted_ns));
      it = held_.erase(it);
      continue;
    }
    next = std::min(next, deadline);
    ++it;
  }
  return next;
}

void RemoteLauncher::accept_connections(const EventsOf& events_of) {
  for (int accepted = 0; accepted < kMaxAcceptsPerTurn; ++accepted) {
    absl::StatusOr<UniqueFd> connection = accept_tcp(listener_.get());
    if (!connection.ok()) {
      accept_paused_until_ns_ = monotonic_now_ns() + kAcceptPauseNs;
      listener_watch_.change(0);  // check() lets it listen again
      next_check_ns_ = std::min(next_check_ns_, accept_paused_until_ns_);
      return;
    }
    if (!connection->valid()) return;
    const int64_t now = monotonic_now_ns();
    absl::StatusOr<HostPort> peer = peer_address(connection->get());
    std::string name = peer.ok() ? peer->to_string() : "?";
    std::string source = source_of(name);
    switch (admit(source, now, events_of)) {
      case Admission::kBegin:
        add_host(std::make_unique<RemoteHost>(*std::move(connection), std::move(name),
                                              host_config_, now));
        break;
      case Admission::kHold:
        held_.push_back({*std::move(connection), std::move(name), std::move(source), now});
        break;
      case Admission::kClose:
        break;  // closed: its relay dials again
    }
  }
}

void RemoteLauncher::watch_with(PollSet& set, uint32_t group) {
  poll_set_ = &set;
  poll_group_ = group;
  if (listener_) listener_watch_ = set.watch(group, listener_.get(), POLLIN, kListenerKey);
}

void RemoteLauncher::add_host(std::unique_ptr<RemoteHost> host) {
  RemoteHost& added = *host;
  hosts_.push_back(std::move(host));
  if (added.state() == RemoteHost::State::kClosed) {
    hosts_changed_ = true;  // its TLS could not begin: it goes at the next settle()
    return;
  }
  next_check_ns_ = std::min(next_check_ns_, added.handshake_deadline_ns());
  if (poll_set_ == nullptr) return;
  const uint64_t key = ++last_key_;
  added.set_watch(poll_set_->watch(poll_group_, added.fd(), added.poll_events(), key));
  hosts_by_key_[key] = &added;
}

void RemoteLauncher::service(const std::vector<PollSet::Fired>& fired, LauncherEvents& events) {
  const auto events_of = [&events](WorkerLink& link) -> LinkEvents& { return events.events_of(link); };
  const int64_t now = monotonic_now_ns();
  bool launched_ended = false;
  for (const PollSet::Fired& ready : fired) {
    if (ready.key == kListenerKey) {
      if (listener_) accept_connections(events_of);
    } else if ((ready.key & kLaunchedKeyBit) != 0) {
      launched_ended = true;
    } else if (auto host = hosts_by_key_.find(ready.key); host != hosts_by_key_.end()) {
      // (A host closed in this round is still there, closed: it does nothing.)
      service_host(*host->second, ready.revents, now, events);
    }
  }
  settle(events, launched_ended);
}

void RemoteLauncher::service_host(RemoteHost& host, short revents, int64_t now_ns,
                                  LauncherEvents& events) {
  const auto events_of = [&events](WorkerLink& link) -> LinkEvents& { return events.events_of(link); };
  const bool was_handshaking = host.state() == RemoteHost::State::kHandshake;
  host.service(revents, events_of);
  if (was_handshaking && host.state() == RemoteHost::State::kIdle) {
    hosts_changed_ = true;  // a free host: it takes a waiting link (settle)
    if (hosts_welcomed() > config_.workers + kSpareHosts) {
      host.close(absl::StrCat("the pool has ", config_.workers + kSpareHosts,
                              " worker hosts already, as many as it can use"),
                 events_of);
      return;
    }
    ++connected_ever_;
    if (TcpLink* own = take_launch(host.launch_id())) own->bind(&host);
  }
  if (host.state() == RemoteHost::State::kData) hand_over_data(host, events);
  // Its deadlines may have come closer (a frame begun, a handshake ended): check() knows when.
  if (host.state() != RemoteHost::State::kClosed) {
    next_check_ns_ = std::min(next_check_ns_, host.check(now_ns, events_of));
  }
  if (host.state() == RemoteHost::State::kClosed) hosts_changed_ = true;
}

void RemoteLauncher::settle(LauncherEvents& events, bool launched_ended) {
  const bool changed = std::exchange(hosts_changed_, false);
  if (changed) forget_closed_hosts(events);
  // After the refusals: a launched worker that was refused and exited says why above. Only when
  // one of theirs says so: a waitpid for each launched command at every turn of the loop would
  // cost as many system calls a turn as there are workers.
  if (launched_ended) reap_launched(&events);
  // Handshakes that ended make room for connections held from their addresses.
  if (!held_.empty()) {
    const auto events_of = [&events](WorkerLink& link) -> LinkEvents& { return events.events_of(link); };
    next_check_ns_ = std::min(next_check_ns_, begin_held(monotonic_now_ns(), events_of));
  }
  if (changed) match_free_hosts(events);
}

void RemoteLauncher::forget_closed_hosts(LauncherEvents& events) {
  // Closed hosts go, their refusals counted; a refused worker the pool launched fails that launch
  // at once (its slot's start fails and is tried again), rather than at connect_timeout.
  for (auto it = hosts_.begin(); it != hosts_.end();) {
    if ((*it)->state() == RemoteHost::State::kClosed) {
      if ((*it)->refused()) {
        count_refusal((*it)->closed_reason());
        if (TcpLink* own = take_launch((*it)->launch_id())) {
          own->end_waiting(events.events_of(*own),
                           absl::UnavailableError(absl::StrCat(launch_command(), " was refused: ",
                                                               (*it)->closed_reason())));
        }
      }
      hosts_by_key_.erase((*it)->watch_key());
      it = hosts_.erase(it);
    } else {
      ++it;
    }
  }
}

int64_t RemoteLauncher::check(int64_t now_ns, LauncherEvents& events) {
  // Called at every wake of the loop: a round over every host only when one is due.
  if (!check_soon_ && now_ns < next_check_ns_) return next_check_ns_;
  check_soon_ = false;
  next_check_ns_ = INT64_MAX;  // what this round starts (hosts, launches) may lower it
  const auto events_of = [&events](WorkerLink& link) -> LinkEvents& { return events.events_of(link); };
  int64_t next = INT64_MAX;
  if (accept_paused_until_ns_ != 0) {
    if (now_ns < accept_paused_until_ns_) {
      next = accept_paused_until_ns_;
    } else {
      accept_paused_until_ns_ = 0;
      listener_watch_.change(POLLIN);
    }
  }
  for (auto& host : hosts_) {
    next = std::min(next, host->check(now_ns, events_of));
    if (host->state() == RemoteHost::State::kClosed) hosts_changed_ = true;
  }
  next = std::min(next, begin_held(now_ns, events_of));
  // Launch commands watched without a pidfd: nothing wakes the loop when they exit. Looked for
  // often while one's worker has not come (its failure fails the launch), seldom after.
  const bool waited_for = std::any_of(launched_.begin(), launched_.end(),
                                      [](const Launched& p) { return !p.pidfd && !p.came; });
  const bool came = std::any_of(launched_.begin(), launched_.end(),
                                [](const Launched& p) { return p.came; });
  if (waited_for || came) {
    const int64_t interval = waited_for ? kChildLookIntervalNs : kCameLookIntervalNs;
    const int64_t due = (now_ns / interval + 1) * interval;
    if (now_ns >= next_look_ns_) {
      reap_launched(&events);
      next_look_ns_ = due;
    } else {
      next_look_ns_ = std::min(next_look_ns_, due);
    }
    next = std::min(next, next_look_ns_);
  }
  // Links that waited for a host long enough end: a start failure, saying why. Links stopped
  // while waiting (terminate, join_timeout, enter_timeout) end now: no worker of theirs exists.
  std::vector<TcpLink*> expired;
  for (TcpLink* link : waiting_) {
    if (link->stopped_waiting() || now_ns >= link->wait_until_ns()) {
      expired.push_back(link);
    } else {
      next = std::min(next, link->wait_until_ns());
    }
  }
  for (TcpLink* link : expired) {
    std::erase(waiting_, link);
    if (link->stopped_waiting()) {
      link->end_stopped(events.events_of(*link));
      continue;
    }
    link->end_waiting(
        events.events_of(*link),
        config_.remote.launch.empty()
            ? waiting_for_host(unavailable_reason())
            : absl::UnavailableError(absl::StrCat(
                  launch_command(), " did not connect to ", address_, " within connect_timeout (",
                  absl::FormatDuration(config_.remote.connect_timeout), ")", refusal_summary())));
  }
  // Hosts this round closed go; free ones take waiting links.
  settle(events);
  next_check_ns_ = std::min(next_check_ns_, next);
  return next_check_ns_;
}

void RemoteLauncher::set_workers(int workers) {
  if (workers > config_.workers && config_.remote.launch.empty()) {
    first_wait_until_ns_ = std::max(first_wait_until_ns_,
                                    monotonic_now_ns() + to_ns(config_.remote.connect_timeout));
  }
  config_.workers = workers;
}

void RemoteLauncher::finish() {
  // Every host's relay sees end of file and leaves; no one new is let in.
  hosts_.clear();
  hosts_by_key_.clear();
  held_.clear();
  listener_watch_.reset();
  listener_.reset();
}

void RemoteLauncher::match_free_hosts(LauncherEvents& events) {
  bool spare = false;
  for (auto& host : hosts_) {
    if (host->state() != RemoteHost::State::kIdle) continue;
    // A link stopped while it waited gets no host: check() ends it.
    const auto link = std::find_if(waiting_.begin(), waiting_.end(),
                                   [](TcpLink* waiting) { return !waiting->stopped_waiting(); });
    if (link == waiting_.end()) {
      spare = true;
      continue;
    }
    TcpLink* taken = *link;
    waiting_.erase(link);
    taken->bind(host.get());
  }
  if (spare) events.on_capacity();
}

void RemoteLauncher::reap_launched(LauncherEvents* events) {
  for (auto it = launched_.begin(); it != launched_.end();) {
    int status = 0;
    const pid_t got = ::waitpid(it->pid, &status, WNOHANG);
    if (got == it->pid || (got < 0 && errno == ECHILD)) {
      // Its worker never said it came (its hello had no launch id, or never was sent), and the
      // command failed: that launch is over. A command that succeeds may have handed the worker
      // to someone else (sbatch), who starts it later: its link waits on.
      const bool failed = got == it->pid && !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
      if (events != nullptr && failed) {
        if (TcpLink* own = take_launch(it->launch_id)) {
          own->end_waiting(events->events_of(*own),
                           absl::UnavailableError(absl::StrCat(
                               launch_command(), " ", describe_exit(status, nullptr),
                               " before it connected to ", address_, refusal_summary())));
        }
      }
      it = launched_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace procpool::internal
