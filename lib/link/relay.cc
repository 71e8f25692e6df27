#include "lib/link/relay.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "lib/common/clock.h"
#include "lib/common/fork_proof_secret.h"
#include "lib/common/socket.h"
#include "lib/link/fork_launcher.h"
#include "lib/link/handshake.h"
#include "lib/link/remote_frames.h"
#include "lib/link/stop_sequence.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/tls_channel.h"
#include "procpool/codec.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/internal/worker_registry.h"

extern char** environ;

namespace procpool::internal {
namespace {

constexpr absl::Duration kDefaultConnectTimeout = absl::Seconds(60);
// One try at the handshake (the pool gives one kHandshakeDeadline, 5 s, once it accepted us).
constexpr absl::Duration kHandshakeTimeout = absl::Seconds(10);
constexpr absl::Duration kDataConnectTimeout = absl::Seconds(10);
constexpr char kConnectFlag[] = "--procpool-connect=";
// While it has a worker, the relay looks at its progress this often and tells the pool when it
// changed (a task started or ended): the pool's view of a remote worker lags by about this.
constexpr int64_t kProgressWatchNs = 10'000'000;
// While tasks stream (the progress moved between two looks: tasks shorter than a look), a change
// is told at most this often. Each report is a frame the pool's one thread reads, and with
// hundreds of hosts streaming short tasks those were most of its work; the results tell the pool
// of the same tasks anyway. A task seen running at two looks in a row (a long one), or a worker
// gone idle, is told at once. The pool allows for the lag (kInexactProgressLagNs).
constexpr int64_t kStreamingProgressNs = 100'000'000;
constexpr int64_t kResidentBytesIntervalNs = 50'000'000;

// Which task a worker is at, as one number: it changes when a task starts or ends.
uint64_t progress_signature(const WorkerProgress& progress) {
  return progress.batch_seq * 1'000'003 + progress.task_index * 2 + (progress.running ? 1 : 0);
}
// Forwarded output: lines go to the pool in frames of about this many bytes (or fewer: at most
// what its max_frame_bytes allows), and the worker's pipes are not read while this much is queued
// for the pool (the worker then blocks on its full pipe: memory stays bounded here).
constexpr size_t kOutputFrameBytes = size_t{64} << 10;
// A frame of output, its lines' list and its own words included, is read by the pool's control
// stream (remote_host.cc), which takes no frame over kControlFrameBytes.
static_assert(kOutputFrameBytes + 1024 <= kControlFrameBytes);
constexpr size_t kMaxQueuedBytes = size_t{4} << 20;

void say(const std::string& message) {
  const std::string line = absl::StrCat("[procpool worker pid ", ::getpid(), "] ", message, "\n");
  (void)!::write(STDERR_FILENO, line.data(), line.size());
}

std::optional<std::string> connect_address(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (absl::StartsWith(argv[i], kConnectFlag)) return std::string(argv[i] + sizeof(kConnectFlag) - 1);
  }
  if (const char* env = std::getenv("PROCPOOL_CONNECT"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  return std::nullopt;
}

absl::Duration connect_timeout() {
  int seconds = 0;
  if (const char* env = std::getenv("PROCPOOL_CONNECT_TIMEOUT");
      env != nullptr && absl::SimpleAtoi(env, &seconds) && seconds > 0) {
    return absl::Seconds(seconds);
  }
  return kDefaultConnectTimeout;
}

// Removes every `name`=... from the environment, and erases its bytes: unsetenv() alone leaves
// them in memory, where a forked worker reads them still (/proc/self/environ shows the bytes the
// process started with).
void erase_from_environment(const char* name) {
  const size_t length = std::strlen(name);
  std::vector<char*> entries;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, name, length) == 0 && (*e)[length] == '=') entries.push_back(*e);
  }
  ::unsetenv(name);
  for (char* entry : entries) ::explicit_bzero(entry, std::strlen(entry));
}

// No token is longer than a handshake frame.
constexpr size_t kTokenCapacity = kHandshakeFrameBytes;

// The token this worker proves: PROCPOOL_TOKEN, else the contents of the file PROCPOOL_TOKEN_FILE
// names (without one trailing newline), copied nowhere but into a ForkProofSecret. Both leave the
// environment (erase_from_environment). kInvalidArgument when neither is set or the file cannot
// be read, or is empty.
absl::StatusOr<ForkProofSecret> take_token_from_environment() {
  ForkProofSecret token(kTokenCapacity);
  if (!token.valid()) return absl::ErrnoToStatus(errno, "mapping a page for the token");
  std::string file;
  bool too_long = false;
  if (const char* value = std::getenv("PROCPOOL_TOKEN")) {
    const size_t length = std::strlen(value);
    too_long = length > kTokenCapacity;
    if (!too_long) {
      std::memcpy(token.data(), value, length);
      token.resize(length);
    }
  }
  if (const char* value = std::getenv("PROCPOOL_TOKEN_FILE")) file = value;
  erase_from_environment("PROCPOOL_TOKEN");
  erase_from_environment("PROCPOOL_TOKEN_FILE");
  if (too_long) return absl::InvalidArgumentError("PROCPOOL_TOKEN is longer than any token (64 KiB)");
  if (token.size() > 0) return token;
  if (file.empty()) {
    return absl::InvalidArgumentError(
        "no token: set PROCPOOL_TOKEN, or PROCPOOL_TOKEN_FILE to a file holding it (the pool's "
        "RemoteOptions::token, or ProcessPool::remote_token() for one the pool made)");
  }
  auto unreadable = [&file](int error) {
    return absl::InvalidArgumentError(
        absl::StrCat("PROCPOOL_TOKEN_FILE ", file, " cannot be read: ", std::strerror(error)));
  };
  UniqueFd fd = own_fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return unreadable(errno);
  size_t got = 0;
  while (true) {
    if (got == kTokenCapacity) return unreadable(EFBIG);  // no token is this long
    const ssize_t n = ::read(fd.get(), token.data() + got, kTokenCapacity - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return unreadable(errno);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got > 0 && token.data()[got - 1] == '\n') --got;
  if (got > 0 && token.data()[got - 1] == '\r') --got;
  token.resize(got);
  if (got == 0) return absl::InvalidArgumentError(absl::StrCat("PROCPOOL_TOKEN_FILE ", file, " is empty"));
  return token;
}

// How this worker speaks to its pool (relay.h): TLS keyed by the token, by default; certificates
// when PROCPOOL_TLS_CERT (with PROCPOOL_TLS_KEY and PROCPOOL_TLS_CA) names one; plaintext only
// when PROCPOOL_ENCRYPT=0 and the pool is on this host. A null context: plaintext.
absl::StatusOr<std::shared_ptr<TlsContext>> tls_from_environment(absl::string_view token,
                                                                 const HostPort& pool) {
  const char* encrypt = std::getenv("PROCPOOL_ENCRYPT");
  if (encrypt != nullptr && std::strcmp(encrypt, "0") == 0) {
    if (!is_loopback_host(pool.host)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "PROCPOOL_ENCRYPT=0 is allowed only for a pool on this host (a loopback address), not ",
          pool.to_string()));
    }
    return std::shared_ptr<TlsContext>();
  }
  const char* cert = std::getenv("PROCPOOL_TLS_CERT");
  if (cert == nullptr || *cert == '\0') return TlsContext::with_token(token, TlsContext::Role::kClient);
  const char* key = std::getenv("PROCPOOL_TLS_KEY");
  const char* ca = std::getenv("PROCPOOL_TLS_CA");
  if (key == nullptr || ca == nullptr) {
    return absl::InvalidArgumentError(
        "PROCPOOL_TLS_CERT needs PROCPOOL_TLS_KEY and PROCPOOL_TLS_CA beside it");
  }
  absl::StatusOr<std::shared_ptr<TlsContext>> context =
      TlsContext::with_certificates(ca, cert, key, TlsContext::Role::kClient);
  if (!context.ok()) return absl::InvalidArgumentError(absl::StrCat("PROCPOOL_TLS_*: ", context.status().message()));
  return context;
}

// SIGTERM (a preemption, scancel, an eviction) asks the relay to drain. The first one writes a
// byte to a pipe the relay's loop polls; the handler is reset as it runs (SA_RESETHAND), so a
// second SIGTERM ends the process at once, as it did before there was a handler (its worker dies
// with it: PR_SET_PDEATHSIG). The program's own disposition comes back when the relay returns.
// The worker the relay forks resets every handler and closes the pipe (child_setup.cc).
class DrainSignal {
 public:
  DrainSignal() {
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC | O_NONBLOCK) != 0) return;
    read_ = own_fd(ends[0]);
    write_ = own_fd(ends[1]);
    write_fd_ = write_.get();
    struct sigaction action {};
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESETHAND | SA_RESTART;
    sigemptyset(&action.sa_mask);
    installed_ = ::sigaction(SIGTERM, &action, &previous_) == 0;
  }
  ~DrainSignal() {
    if (installed_) ::sigaction(SIGTERM, &previous_, nullptr);
    write_fd_ = -1;
  }
  DrainSignal(const DrainSignal&) = delete;
  DrainSignal& operator=(const DrainSignal&) = delete;

  int fd() const { return read_.get(); }
  // Empties the pipe; true if a SIGTERM came since the last call.
  bool take() {
    bool came = false;
    char bytes[16];
    while (read_ && ::read(read_.get(), bytes, sizeof(bytes)) > 0) came = true;
    return came;
  }

 private:
  static void on_signal(int) {
    const int saved = errno;
    const char byte = 1;
    (void)!::write(write_fd_, &byte, 1);
    errno = saved;
  }

  static inline volatile sig_atomic_t write_fd_ = -1;
  UniqueFd read_;
  UniqueFd write_;
  struct sigaction previous_ {};
  bool installed_ = false;
};

class Relay final : private LinkEvents {
 public:
  Relay(std::shared_ptr<TlsContext> tls, HostPort pool, const WorkerTypeFinder& find,
        ForkProofSecret token, std::string worker_type)
      : tls_(std::move(tls)),
        pool_(std::move(pool)),
        find_(find),
        token_(std::move(token)),
        worker_type_(std::move(worker_type)),
        reader_(kHandshakeFrameBytes) {}

  // Dials the pool and does the handshake, again and again with growing pauses until `timeout`:
  // the pool may not listen yet, or may have closed a connection of ours that came during a flood
  // (admission control, remote_launcher.cc). A refusal (kPermissionDenied), a pool refused
  // (kFailedPrecondition) or one that broke the protocol (kDataLoss) ends it at once.
  absl::Status join(absl::Duration timeout);
  int run();

 private:
  // After a handshake: a worker launcher for this pool's limits, a fresh heartbeat clock, and
  // the frames the pool sent right after its welcome. False when one broke the protocol.
  bool begin_session();
  // The pool went silent: its host died, or the network between us broke (a partition). The pool
  // has given this host's worker up (its task failed or runs again elsewhere), so the worker goes
  // now, killed and reaped; then the relay dials again as at its start, for connect_timeout, and
  // serves once the pool answers (the network healed). False when no pool answered.
  bool rejoin();
  // One try: TLS over `socket` (plaintext with no context), then the protocol's handshake.
  absl::Status handshake(UniqueFd socket, absl::Time deadline);
  void queue(capnp::MessageBuilder& message) { writer_.push_copy(capnp::messageToFlatArray(message)); }
  // False when the pool broke the protocol.
  bool on_pool_frame(kj::ArrayPtr<const capnp::word> words);
  // Handles every whole frame buffered; false when one broke the protocol.
  bool take_pool_frames();
  void send_pong();
  // The first SIGTERM: tells the pool this host is leaving (FromWorker.draining).
  void begin_drain();
  void spawn(wire::Spawn::Reader request);
  void stop_child(StopMode mode);
  // The watchdog: a task past its batch's timeout stops the worker. Returns when to look again.
  int64_t watchdog(int64_t now);
  // Reports the worker's progress when it changed; returns when to look again.
  int64_t watch_progress(int64_t now);

  // The worker's events (worker_link.h). It has no channel here (its frames go straight to the
  // pool over its data connection): only its end and revocations come this way.
  void on_frame(kj::ArrayPtr<const capnp::word>) override {}
  void on_broken_stream(absl::Status) override {}
  void on_revoked(uint32_t slot, uint16_t tag, uint32_t claimed) override {
    capnp::MallocMessageBuilder message(32);
    auto revoked = message.initRoot<wire::FromWorker>().initRevoked();
    revoked.setSlot(slot);
    revoked.setTag(tag);
    revoked.setClaimed(claimed);
    queue(message);
  }
  void on_output(bool is_stderr, std::span<const std::string_view> lines,
                 OutputPlace place) override;
  void on_ended(WorkerEnd end) override;
  // Sends the lines of forwarded output not sent yet.
  void flush_output();

  std::unique_ptr<TlsChannel> channel_;  // the control connection
  const std::shared_ptr<TlsContext> tls_;  // for data connections too; null: plaintext
  ForkProofSecret session_secret_;        // what data connections prove (handshake.h)
  const HostPort pool_;
  const WorkerTypeFinder& find_;
  const WorkerBodyFactory* factory_ = nullptr;  // the pool's worker type, found in the handshake
  const ForkProofSecret token_;  // never copied: a forked worker must not inherit it
  const std::string worker_type_;
  FrameReader reader_;
  FrameWriter writer_;
  RelayLimits limits_;
  std::unique_ptr<ForkLauncher> launcher_;
  std::unique_ptr<ForkLink> child_;
  std::unique_ptr<WorkerLink> retired_;  // ended during this loop turn; dropped after it
  std::optional<std::string> timed_out_;  // the watchdog stopped the worker: why
  // Draining (a SIGTERM came): the pool retires the worker and then closes the connection. While
  // there is no worker, the relay waits for that close at most heartbeat_timeout from
  // `idle_since_ns_` (a worker the pool asked for before it heard of the drain is served).
  bool draining_ = false;
  int64_t idle_since_ns_ = 0;
  StopSequence child_stop_;               // the worker's: SIGTERM, then SIGKILL after kill_grace
  int64_t last_received_ns_ = 0;
  int64_t last_rss_read_ns_ = 0;
  size_t resident_bytes_ = 0;
  // watch_progress: the progress last sent (and when), and last looked at (and when next).
  uint64_t reported_signature_ = 0;
  int64_t reported_ns_ = 0;
  uint64_t looked_signature_ = 0;
  int64_t next_look_ns_ = 0;
  // Forwarded output not sent yet: lines of one stream (a line of the other sends these first).
  std::vector<std::string> output_lines_;
  bool output_stderr_ = false;
  OutputPlace output_place_;  // where they were read: one place a frame
  size_t output_bytes_ = 0;
};

absl::Status Relay::join(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::Duration pause = absl::Milliseconds(50);
  while (true) {
    absl::Status last;
    absl::StatusOr<UniqueFd> socket =
        connect_tcp(pool_, std::max(deadline - absl::Now(), absl::Seconds(1)));
    if (socket.ok()) {
      last = guarded("the pool sent a malformed handshake frame", [&] {
        return handshake(*std::move(socket), std::min(deadline, absl::Now() + kHandshakeTimeout));
      });
      if (last.ok()) return last;
      channel_.reset();
      if (last.code() != absl::StatusCode::kUnavailable &&
          last.code() != absl::StatusCode::kDeadlineExceeded) {
        return last;
      }
    } else {
      last = socket.status();
    }
    if (absl::Now() + pause >= deadline) {
      return absl::UnavailableError(absl::StrCat(last.message(), " (kept trying for ",
                                                 absl::FormatDuration(timeout), ")"));
    }
    absl::SleepFor(pause);
    pause = std::min(pause * 2, absl::Seconds(1));
  }
}

absl::Status Relay::handshake(UniqueFd socket, absl::Time deadline) {
  absl::StatusOr<std::unique_ptr<TlsChannel>> channel = TlsChannel::open(tls_, std::move(socket));
  if (!channel.ok()) return channel.status();
  channel_ = *std::move(channel);
  reader_ = FrameReader(kHandshakeFrameBytes);
  if (absl::Status shook = channel_->handshake_within(deadline); !shook.ok()) {
    // A TLS alert is a refusal: another token, a certificate its CA did not sign, or the pool
    // speaks plaintext. A connection closed without one may be admission control's (the pool
    // drops the oldest silent connection during a flood), or one that took too long: dial again.
    if (shook.code() == absl::StatusCode::kUnauthenticated &&
        !absl::StrContains(shook.message(), "the peer closed the connection")) {
      return absl::PermissionDeniedError(absl::StrCat(
          "the pool at ", pool_.to_string(), " refused this worker: ", shook.message(),
          " (another token, a certificate its CA did not sign, or PROCPOOL_ENCRYPT differs?)"));
    }
    return absl::UnavailableError(absl::StrCat("TLS with the pool at ", pool_.to_string(), ": ",
                                               shook.message()));
  }
  const std::string nonce = make_nonce();
  {
    // Nothing about this host or its worker type yet: the pool has proved nothing.
    capnp::MallocMessageBuilder message(64);
    auto hello = message.initRoot<wire::FromWorker>().initHello();
    hello.setVersion(kProtocolVersion);
    hello.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(nonce.data()), nonce.size()));
    // Which of its launches this is, when the pool ran us: a refusal then fails that launch at once.
    if (const char* launch_id = std::getenv("PROCPOOL_LAUNCH_ID")) hello.setLaunchId(launch_id);
    if (absl::Status sent = write_frame(*channel_, message); !sent.ok()) {
      return absl::UnavailableError(sent.message());  // the pool closed it: dial again
    }
  }
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = read_frame_within(*channel_, reader_, deadline);
  if (!frame.ok() && channel_->encrypted() && frame.status().code() == absl::StatusCode::kDataLoss) {
    // TLS 1.3 lets a client finish its handshake before the server has checked its certificate:
    // a refusal of it (an alert) comes as the first read.
    return absl::PermissionDeniedError(
        absl::StrCat("the pool refused this worker's TLS: ", frame.status().message()));
  }
  if (!frame.ok()) return frame.status();
  std::string pool_nonce;
  {
    capnp::FlatArrayMessageReader message(*frame, reader_.options());
    auto root = message.getRoot<wire::ToWorker>();
    if (root.isRefused()) {
      return absl::PermissionDeniedError(
          absl::StrCat("the pool refused this worker: ", peer_text(root.getRefused())));
    }
    if (!root.isChallenge()) return absl::DataLossError("the pool answered hello with something else");
    auto challenge = root.getChallenge();
    if (challenge.getVersion() != kProtocolVersion) {
      return refuse_peer(*channel_, absl::StrCat("protocol version ", challenge.getVersion(),
                                                    " of the pool differs from this worker's ",
                                                    kProtocolVersion));
    }
    if (challenge.getNonce().size() != kNonceBytes) {
      return refuse_peer(*channel_, "the pool's nonce has the wrong size");
    }
    pool_nonce = as_string(challenge.getNonce());
  }
  {
    capnp::MallocMessageBuilder message(64);
    auto credentials = message.initRoot<wire::FromWorker>().initCredentials();
    const std::string proof = prove(token_.view(), "worker", pool_nonce, nonce);
    credentials.setProof(
        capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(proof.data()), proof.size()));
    credentials.setWorkerType(worker_type_);
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    credentials.setHost(host);
    credentials.setPid(::getpid());
    if (absl::Status sent = write_frame(*channel_, message); !sent.ok()) {
      return absl::UnavailableError(sent.message());
    }
  }
  frame = read_frame_within(*channel_, reader_, deadline);
  if (!frame.ok()) return frame.status();
  capnp::FlatArrayMessageReader message(*frame, reader_.options());
  auto root = message.getRoot<wire::ToWorker>();
  if (root.isRefused()) {
    return absl::PermissionDeniedError(
        absl::StrCat("the pool refused this worker: ", peer_text(root.getRefused())));
  }
  if (!root.isWelcome()) return absl::DataLossError("the pool answered the proof with something else");
  auto welcome = root.getWelcome();
  // Nothing of the welcome counts before the pool's proof holds.
  if (!proof_matches(token_.view(), "pool", nonce, pool_nonce, as_string(welcome.getProof()))) {
    return refuse_peer(*channel_, welcome.getProof().size() == 0
                                          ? "the pool proved no token"
                                          : "wrong token: the pool's proof does not match this "
                                            "worker's token");
  }
  factory_ = find_(welcome.getWorkerType());
  if (factory_ == nullptr) {
    return refuse_peer(*channel_,
                       worker_type_.empty()
                           ? absl::StrCat("this program does not serve ",
                                          peer_text(welcome.getWorkerType()),
                                          " (none of its ProcessPool types is that one)")
                           : absl::StrCat("this worker serves ", worker_type_,
                                          ", but the pool's workers are ",
                                          peer_text(welcome.getWorkerType())));
  }
  limits_ = relay_limits(welcome);
  // Kept where the token is: a worker forked later has no use for it and must not hold it.
  std::string secret = session_secret(token_.view(), nonce, pool_nonce, channel_->exporter(kSessionExporterLabel));
  session_secret_ = ForkProofSecret::copy_of(secret);
  ::explicit_bzero(secret.data(), secret.size());
  if (!session_secret_.valid()) return absl::ErrnoToStatus(errno, "mapping a page for the session's key");
  return absl::OkStatus();
}

bool Relay::take_pool_frames() {
  while (true) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader_.next();
    if (!frame.ok()) {
      say(absl::StrCat("the pool sent a bad frame: ", frame.status().message()));
      return false;
    }
    if (frame->size() == 0) return true;
    if (!on_pool_frame(*frame)) return false;
  }
}

bool Relay::begin_session() {
  // The same reader: frames the pool sent right after its welcome may be in it already.
  reader_.set_max_frame_bytes(kControlFrameBytes);
  (void)set_nonblocking(channel_->fd(), true);
  launcher_ = std::make_unique<ForkLauncher>(ForkLauncher::Config{
      .process_name_prefix = limits_.name,
      .fork_server = false,
      .max_frame_bytes = limits_.max_frame_bytes,
      .frame_timeout = limits_.frame_timeout,
      .factory = factory_,
      .cgroups = limits_.cgroups_off ? Cgroups::kOff : Cgroups::kAuto,
      .max_worker_memory_bytes = limits_.max_worker_memory_bytes,
      // Each spawn brings its worker's placement (launch_on), env and CPU included.
      .workers = 0,
      .worker_env = {},
      .spread_cpus = false,
      .forward_output = limits_.forward_output,
      .crash_backtraces = limits_.crash_backtraces});
  // What stops its workers' trees and caps their memory on this host, as the pool logs its own.
  if (std::getenv("PROCPOOL_LOG_ALL") != nullptr) say(launcher_->cgroup_plan().describe());
  last_received_ns_ = monotonic_now_ns();
  return take_pool_frames();
}

bool Relay::rejoin() {
  stop_child(StopMode::kKill);
  // Its end reported to no one (the connection goes): reaped here, before a spawn may come.
  const int64_t give_up = monotonic_now_ns() + to_ns(limits_.kill_grace + absl::Seconds(5));
  std::vector<pollfd> fds;
  while (child_ && monotonic_now_ns() < give_up) {
    fds.clear();
    child_->add_pollfds(fds, false);
    (void)::poll(fds.data(), fds.size(), 10);
    child_->service(fds.data(), fds.size(), false, *this);
    if (child_) (void)child_->check(monotonic_now_ns(), *this);
  }
  child_.reset();
  retired_.reset();
  timed_out_.reset();
  child_stop_ = StopSequence();
  writer_.clear();
  output_lines_.clear();
  output_bytes_ = 0;
  channel_.reset();
  if (absl::Status joined = join(connect_timeout()); !joined.ok()) {
    say(std::string(joined.message()));
    return false;
  }
  say("connected to the pool again");
  return begin_session();
}

int Relay::run() {
  const absl::Status shook = join(connect_timeout());
  if (!shook.ok()) {
    say(std::string(shook.message()));
    return shook.code() == absl::StatusCode::kPermissionDenied ||
                   shook.code() == absl::StatusCode::kFailedPrecondition
               ? 2
               : 1;
  }
  // Whatever ends the relay ends its worker: it would die with us anyway (PR_SET_PDEATHSIG).
  auto leave = [this](int status) {
    stop_child(StopMode::kKill);
    return status;
  };
  if (!begin_session()) return leave(1);
  DrainSignal drain_signal;
  std::vector<pollfd> fds;
  while (true) {
    const int64_t now = monotonic_now_ns();
    if (now - last_received_ns_ > to_ns(limits_.heartbeat_timeout)) {
      say(absl::StrCat("nothing from the pool for ", absl::FormatDuration(limits_.heartbeat_timeout),
                       ": it or the network to it is gone; stopping the worker and dialling again"));
      // A draining host was leaving anyway: it does not come back.
      if (draining_ || !rejoin()) return leave(1);
      continue;
    }
    int64_t next = last_received_ns_ + to_ns(limits_.heartbeat_timeout);
    if (draining_ && !child_) {
      const int64_t give_up = idle_since_ns_ + to_ns(limits_.heartbeat_timeout);
      if (now >= give_up) {
        say("drained, but the pool did not close the connection; leaving");
        return leave(0);
      }
      next = std::min(next, give_up);
    }
    // With a kernel without pidfds, check() looks for the worker's exit: it may end here.
    if (child_) next = std::min(next, child_->check(now, *this));
    if (child_) {
      next = std::min(next, child_stop_.check(*child_, now));
      next = std::min(next, watchdog(now));
      next = std::min(next, watch_progress(now));
      next = std::min(next, child_->check(now, *this));  // its output pipes' rests
    }
    fds.clear();
    fds.push_back({channel_->fd(), static_cast<short>(POLLIN | (writer_.empty() ? 0 : POLLOUT)), 0});
    fds.push_back({drain_signal.fd(), POLLIN, 0});
    const size_t child_offset = fds.size();
    if (child_) {
      child_->pause_output(writer_.queued_bytes() > kMaxQueuedBytes);
      child_->add_pollfds(fds, false);
    }
    // What the TLS session holds already, poll() does not see: no sleeping on it.
    const bool in_hand = channel_->encrypted() && channel_->buffered();
    const int timeout_ms =
        in_hand ? 0 : static_cast<int>(std::clamp<int64_t>((next - now + 999'999) / 1'000'000, 0, 1000));
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0) continue;
    if ((fds[1].revents & POLLIN) && drain_signal.take() && !draining_) begin_drain();

    if ((fds[0].revents & POLLOUT) && !writer_.write_some(*channel_).ok()) writer_.clear();
    if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) || in_hand) {
      absl::StatusOr<FrameReader::Fill> filled = reader_.fill(*channel_);
      if (!filled.ok() && filled.status().code() == absl::StatusCode::kDataLoss) {
        // A record changed on the way: nothing more from this connection can be trusted.
        say(absl::StrCat("the connection to the pool broke: ", filled.status().message()));
        return leave(1);
      }
      // The pool is done with us (or gone).
      if (!filled.ok() || *filled == FrameReader::Fill::kEndOfFile) return leave(0);
      if (*filled == FrameReader::Fill::kData) last_received_ns_ = monotonic_now_ns();
      if (!take_pool_frames()) return leave(1);
    }
    if (child_) child_->service(fds.data() + child_offset, fds.size() - child_offset, false, *this);
    flush_output();
    retired_.reset();
    if (!writer_.empty() && !writer_.write_some(*channel_).ok()) writer_.clear();
  }
}

bool Relay::on_pool_frame(kj::ArrayPtr<const capnp::word> words) {
  const absl::Status handled = guarded("the pool sent a malformed frame", [&]() -> absl::Status {
    capnp::FlatArrayMessageReader message(words, reader_.options());
    auto root = message.getRoot<wire::ToWorker>();
    switch (root.which()) {
      case wire::ToWorker::PING:
        send_pong();
        return absl::OkStatus();
      case wire::ToWorker::SPAWN:
        spawn(root.getSpawn());
        return absl::OkStatus();
      case wire::ToWorker::STOP:
        stop_child(root.getStop() == 9 ? StopMode::kKill : StopMode::kTerminate);
        return absl::OkStatus();
      case wire::ToWorker::REVOKE:
        if (child_) child_->revoke(root.getRevoke().getSlot(), root.getRevoke().getTag(), *this);
        return absl::OkStatus();
      case wire::ToWorker::STOP_TASKS: {
        const auto stop = root.getStopTasks();
        if (child_) child_->request_stop(stop.getSeq(), stop.getFrom(), stop.getTo());
        return absl::OkStatus();
      }
      default:
        return absl::DataLossError(
            "the pool sent a frame a worker host does not expect after the handshake");
    }
  });
  if (!handled.ok()) say(std::string(handled.message()));
  return handled.ok();
}

void Relay::send_pong() {
  const int64_t now = monotonic_now_ns();
  if (child_ && limits_.resident_bytes && now - last_rss_read_ns_ >= kResidentBytesIntervalNs) {
    last_rss_read_ns_ = now;
    resident_bytes_ = child_->resident_bytes();  // a /proc read: not on every pong
  }
  capnp::MallocMessageBuilder message(64);
  auto pong = message.initRoot<wire::FromWorker>().initPong();
  if (child_) {
    const WorkerProgress progress = child_->progress();
    write_progress(progress, resident_bytes_, pong);
    reported_signature_ = progress_signature(progress);
    reported_ns_ = now;
  }
  queue(message);
}

void Relay::begin_drain() {
  draining_ = true;
  idle_since_ns_ = monotonic_now_ns();
  say(child_ ? "SIGTERM: draining: the running task finishes, the rest goes back to the pool, then "
               "the worker runs exit() (a second SIGTERM stops at once)"
             : "SIGTERM: leaving (a second SIGTERM stops at once)");
  capnp::MallocMessageBuilder message(16);
  message.initRoot<wire::FromWorker>().setDraining();
  queue(message);
}

void Relay::spawn(wire::Spawn::Reader request) {
  if (child_) return;  // one worker at a time; the pool knows it has one
  const int slot = static_cast<int>(request.getSlot());
  capnp::MallocMessageBuilder reply(64);
  auto root = reply.initRoot<wire::FromWorker>();
  auto fail = [&](absl::string_view why) {
    auto ended = root.initEnded();
    ended.setHow(absl::StrCat("could not be started on its host: ", why));
    ended.setClean(false);
    queue(reply);
  };
  // The worker's own connection to the pool, TLS as ours: it presents the spawn's id, with a proof
  // of this control session bound to its own TLS session (handshake.h).
  const absl::Time deadline = absl::Now() + kDataConnectTimeout;
  absl::StatusOr<UniqueFd> socket = connect_tcp(pool_, kDataConnectTimeout);
  if (!socket.ok()) return fail(socket.status().message());
  absl::StatusOr<std::unique_ptr<TlsChannel>> data = TlsChannel::open(tls_, *std::move(socket));
  if (!data.ok()) return fail(data.status().message());
  if (absl::Status shook = (*data)->handshake_within(deadline); !shook.ok()) return fail(shook.message());
  {
    capnp::MallocMessageBuilder attach(64);
    auto a = attach.initRoot<wire::FromWorker>().initAttach();
    a.setDataId(request.getDataId());
    const std::string proof = prove(session_secret_.view(), "data", as_string(request.getDataId()),
                                    (*data)->exporter(kDataExporterLabel));
    a.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(proof.data()), proof.size()));
    if (absl::Status sent = write_frame(**data, attach); !sent.ok()) return fail(sent.message());
  }
  absl::StatusOr<std::unique_ptr<ForkLink>> child =
      launcher_->launch_on(slot, absl::StrCat("worker ", slot), *std::move(data),
                           placement_from_wire(request.getPlacement()));
  if (!child.ok()) return fail(child.status().message());
  child_ = *std::move(child);
  reported_signature_ = 0;
  looked_signature_ = 0;
  next_look_ns_ = 0;
  root.setSpawned(child_->pid());
  queue(reply);
}

void Relay::stop_child(StopMode mode) {
  if (child_) child_stop_.stop(*child_, mode, limits_.kill_grace, monotonic_now_ns());
}

int64_t Relay::watch_progress(int64_t now) {
  if (now < next_look_ns_) return next_look_ns_;
  next_look_ns_ = now + kProgressWatchNs;
  const uint64_t signature = progress_signature(child_->progress());
  const bool streaming = signature != looked_signature_;
  looked_signature_ = signature;
  if (signature != reported_signature_ &&
      (!streaming || now - reported_ns_ >= kStreamingProgressNs)) {
    send_pong();
  }
  return next_look_ns_;
}

int64_t Relay::watchdog(int64_t now) {
  if (timed_out_) return INT64_MAX;
  const WorkerProgress progress = child_->progress();
  if (!progress.running || progress.timeout_ns <= 0) return INT64_MAX;
  const int64_t deadline = progress.started_ns + progress.timeout_ns + coarse_clock_slack_ns();
  if (now < deadline) return deadline;
  timed_out_ = absl::StrCat("task ", progress.task_index, " of batch ", progress.batch_seq,
                            " ran past its timeout of ",
                            absl::FormatDuration(absl::Nanoseconds(progress.timeout_ns)),
                            "; its host's watchdog stopped it");
  stop_child(StopMode::kTerminate);
  return child_stop_.kill_at_ns();
}

void Relay::on_output(bool is_stderr, std::span<const std::string_view> lines,
                      OutputPlace place) {
  // Each piece fits a frame the pool accepts, with room for the frame's own words.
  const size_t piece =
      std::min(kOutputFrameBytes, limits_.max_frame_bytes > 1024 ? limits_.max_frame_bytes - 1024 : 1);
  if (is_stderr != output_stderr_ || place.batch_seq != output_place_.batch_seq ||
      place.task_index != output_place_.task_index) {
    flush_output();
  }
  output_stderr_ = is_stderr;
  output_place_ = place;
  for (const std::string_view line : lines) {
    for (size_t at = 0; at == 0 || at < line.size(); at += piece) {
      const std::string_view part = line.substr(at, piece);
      if (output_bytes_ + part.size() + 16 > piece) flush_output();
      output_lines_.emplace_back(part);
      output_bytes_ += part.size() + 16;  // a list entry and its padding, at most
    }
  }
}

void Relay::flush_output() {
  if (output_lines_.empty()) return;
  capnp::MallocMessageBuilder message(output_bytes_ / sizeof(capnp::word) + 64);
  auto output = message.initRoot<wire::FromWorker>().initOutput();
  output.setStderr(output_stderr_);
  if (output_place_.batch_seq != ControlPage::kNoBatch) {
    output.setHasPlace(true);
    output.setBatchSeq(output_place_.batch_seq);
    output.setTaskIndex(output_place_.task_index);
  }
  auto lines = output.initLines(static_cast<unsigned>(output_lines_.size()));
  for (size_t i = 0; i < output_lines_.size(); ++i) {
    lines.set(static_cast<unsigned>(i),
              capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(output_lines_[i].data()),
                                  output_lines_[i].size()));
  }
  queue(message);
  output_lines_.clear();
  output_bytes_ = 0;
}

void Relay::on_ended(WorkerEnd end) {
  flush_output();  // everything it wrote goes before its end
  capnp::MallocMessageBuilder message(128);
  auto ended = message.initRoot<wire::FromWorker>().initEnded();
  ended.setHow(end.how);
  ended.setClean(end.clean);
  if (!end.crash_stack.empty()) ended.setCrashStack(end.crash_stack);
  if (timed_out_) ended.setTimedOut(*timed_out_);
  if (end.cause && end.cause->code() == absl::StatusCode::kResourceExhausted) {
    // The pool names the worker itself ("worker 0 on host (pid 4242): ").
    absl::string_view why = end.cause->message();
    absl::ConsumePrefix(&why, absl::StrCat(child_->name(), " "));
    ended.setMemoryExhausted(std::string(why));
  }
  write_progress(child_->progress(), 0, ended.initProgress());
  queue(message);
  timed_out_.reset();
  child_stop_ = StopSequence();  // the next worker's is its own
  retired_ = std::move(child_);
  idle_since_ns_ = monotonic_now_ns();
}

}  // namespace

bool relay_requested(int argc, char** argv) { return connect_address(argc, argv).has_value(); }

int serve_registered(int argc, char** argv) {
  return run_relay(argc, argv, [](const std::string& wanted) { return find_worker_type(wanted); },
                   "");
}

int run_relay(int argc, char** argv, const WorkerTypeFinder& find, const std::string& offered_type) {
  std::optional<std::string> address_text = connect_address(argc, argv);
  if (!address_text) {
    say("no pool to connect to: pass --procpool-connect=HOST:PORT or set PROCPOOL_CONNECT");
    return 2;
  }
  absl::StatusOr<HostPort> address = parse_host_port(*address_text);
  if (!address.ok()) {
    say(absl::StrCat("--procpool-connect: ", address.status().message()));
    return 2;
  }
  // From here on this process's memory holds the token, and then the session's keys. Its workers
  // (and what their tasks run) are the same user: undumpable, it is not theirs to read through
  // /proc/<pid>/mem, environ or ptrace without CAP_SYS_PTRACE. Each worker is dumpable again
  // (ForkLauncher::launch_on), and holds none of it (ForkProofSecret).
  ::prctl(PR_SET_DUMPABLE, 0);
  // Taken before anything is forked: no worker of ours, nor what its tasks run, inherits it.
  absl::StatusOr<ForkProofSecret> token = take_token_from_environment();
  if (!token.ok()) {
    say(std::string(token.status().message()));
    return 2;
  }
  absl::StatusOr<std::shared_ptr<TlsContext>> tls = tls_from_environment(token->view(), *address);
  if (!tls.ok()) {
    say(std::string(tls.status().message()));
    return 2;
  }
  Relay relay(*std::move(tls), *address, find, *std::move(token), offered_type);
  return relay.run();
}

}  // namespace procpool::internal
