#include "lib/link/remote_launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "lib/common/clock.h"
#include "lib/link/handshake.h"
#include "lib/link/worker_process.h"

extern char** environ;

namespace procpool::internal {
namespace {

// Connections still in their handshake. While this many are, no more are accepted: the rest wait
// in the listen backlog (a flood cannot exhaust us, and a real worker behind it gets in once the
// flood's connections time out, rather than being turned away).
constexpr size_t kMaxHandshaking = 256;
// Why hosts were refused goes into calls' errors. Peers that need no token to be refused choose
// much of it (the worker type they name), and any number may dial: a few reasons are kept, each
// cut short, and the rest only counted.
constexpr size_t kMaxRefusalReasons = 8;
constexpr size_t kMaxRefusalBytes = 200;

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
  host_config_.limits.forward_output = config_.forward_output;
  host_config_.limits.crash_backtraces = config_.crash_backtraces;
  host_config_.handshake_timeout = std::min(config_.remote.connect_timeout, absl::Seconds(20));
}

absl::StatusOr<std::unique_ptr<RemoteLauncher>> RemoteLauncher::start(Config config) {
  absl::StatusOr<HostPort> listen = parse_host_port(config.remote.listen);
  if (!listen.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("RemoteOptions::listen: ", listen.status().message()));
  }
  auto launcher = std::unique_ptr<RemoteLauncher>(new RemoteLauncher(std::move(config)));
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
  // step, an ssh) ends with it.
  for (TcpLink* link : links_) link->on_destroy(nullptr);
  hosts_.clear();
  if (launched_.empty()) return;
  const int64_t give_up = monotonic_now_ns() + 2'000'000'000;
  while (!launched_.empty() && monotonic_now_ns() < give_up) {
    reap_launched(nullptr);
    if (!launched_.empty()) ::usleep(10'000);
  }
  for (int signal : {SIGTERM, SIGKILL}) {
    for (Launched& process : launched_) {
      ::syscall(SYS_pidfd_send_signal, process.pidfd.get(), signal, nullptr, 0);
    }
    const int64_t until = monotonic_now_ns() + 1'000'000'000;
    while (!launched_.empty() && monotonic_now_ns() < until) {
      reap_launched(nullptr);
      if (!launched_.empty()) ::usleep(10'000);
    }
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
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (absl::StartsWith(*e, "PROCPOOL_TOKEN=") || absl::StartsWith(*e, "PROCPOOL_CONNECT=") ||
        absl::StartsWith(*e, "PROCPOOL_LAUNCH_ID=")) {
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
  launched_.push_back(
      {pid, own_fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0))), launch_id});
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
      return absl::UnavailableError(unavailable_reason());
    }
  }
  auto link = std::make_unique<TcpLink>(name, slot, wait_until, host_config_.limits);
  TcpLink* raw = link.get();
  links_.push_back(raw);
  link->on_destroy([this, raw] {
    std::erase(waiting_, raw);
    std::erase(links_, raw);
    std::erase_if(launches_, [raw](const auto& launch) { return launch.second == raw; });
  });
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
  if (!proof_matches(host_config_.token, "data", host.data_id(), "", host.data_proof())) {
    host.refuse("wrong token: a worker's data connection did not prove the pool's token");
    return;
  }
  // A spawn nobody waits for any more (its link ended before its worker dialled): dropped.
  UniqueFd socket = host.take_socket();
  if (owner != nullptr) owner->attach(std::move(socket), host.take_reader(), events.events_of(*owner));
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
          : absl::StrCat("no remote worker is free: ", busy, " connected, all busy");
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

size_t RemoteLauncher::handshaking() const {
  size_t count = 0;
  for (const auto& host : hosts_) count += host->state() == RemoteHost::State::kHandshake;
  return count;
}

void RemoteLauncher::add_pollfds(std::vector<pollfd>& fds) {
  const bool room = handshaking() < kMaxHandshaking;
  fds.push_back({listener_.get(), static_cast<short>(listener_ && room ? POLLIN : 0), 0});
  polled_host_list_.clear();
  for (auto& host : hosts_) {
    if (host->state() == RemoteHost::State::kClosed) continue;
    fds.push_back({host->fd(), host->poll_events(), 0});
    polled_host_list_.push_back(host.get());
  }
  polled_hosts_ = polled_host_list_.size();
  polled_launched_ = 0;
  for (Launched& process : launched_) {
    if (!process.pidfd) continue;
    fds.push_back({process.pidfd.get(), POLLIN, 0});
    ++polled_launched_;
  }
}

void RemoteLauncher::service(const pollfd* polled, size_t count, LauncherEvents& events) {
  const auto events_of = [&events](WorkerLink& link) -> LinkEvents& { return events.events_of(link); };
  if (count == 0) return;
  if (polled[0].revents != 0 && listener_) {
    for (size_t handshaking = this->handshaking(); handshaking < kMaxHandshaking;) {
      absl::StatusOr<UniqueFd> accepted = accept_tcp(listener_.get());
      if (!accepted.ok() || !accepted->valid()) break;
      absl::StatusOr<HostPort> peer = peer_address(accepted->get());
      hosts_.push_back(std::make_unique<RemoteHost>(
          *std::move(accepted), peer.ok() ? peer->to_string() : "?", host_config_));
      ++handshaking;
    }
  }
  for (size_t i = 0; i < polled_hosts_ && 1 + i < count; ++i) {
    RemoteHost* host = polled_host_list_[i];
    const bool was_handshaking = host->state() == RemoteHost::State::kHandshake;
    if (polled[1 + i].revents != 0) host->service(polled[1 + i].revents, events_of);
    if (was_handshaking && host->state() == RemoteHost::State::kIdle) {
      ++connected_ever_;
      if (TcpLink* own = take_launch(host->launch_id())) own->bind(host);
    }
    if (host->state() == RemoteHost::State::kData) hand_over_data(*host, events);
  }
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
      it = hosts_.erase(it);
    } else {
      ++it;
    }
  }
  // After the refusals: a launched worker that was refused and exited says why above.
  if (polled_launched_ > 0) reap_launched(&events);
  match_free_hosts(events);
}

int64_t RemoteLauncher::check(int64_t now_ns, LauncherEvents& events) {
  const auto events_of = [&events](WorkerLink& link) -> LinkEvents& { return events.events_of(link); };
  int64_t next = INT64_MAX;
  for (auto& host : hosts_) next = std::min(next, host->check(now_ns, events_of));
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
    const std::string why =
        config_.remote.launch.empty()
            ? unavailable_reason()
            : absl::StrCat(launch_command(), " did not connect to ", address_,
                           " within connect_timeout (",
                           absl::FormatDuration(config_.remote.connect_timeout), ")",
                           refusal_summary());
    link->end_waiting(events.events_of(*link), absl::UnavailableError(why));
  }
  return next;
}

void RemoteLauncher::finish() {
  // Every host's relay sees end of file and leaves; no one new is let in.
  hosts_.clear();
  listener_.reset();
}

void RemoteLauncher::match_free_hosts(LauncherEvents& events) {
  bool spare = false;
  for (auto& host : hosts_) {
    if (host->state() != RemoteHost::State::kIdle) continue;
    if (waiting_.empty()) {
      spare = true;
      continue;
    }
    TcpLink* link = waiting_.front();
    waiting_.pop_front();
    link->bind(host.get());
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
