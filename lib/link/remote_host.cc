#include "lib/link/remote_host.h"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "capnp/serialize.h"
#include "lib/common/clock.h"
#include "lib/link/handshake.h"
#include "lib/link/tcp_link.h"
#include "procpool/codec.h"

namespace procpool::internal {
namespace {

// The launch ids the pool hands out are this long (hex); a longer one is no launch of ours.
constexpr size_t kMaxLaunchIdBytes = 64;
constexpr char kDrained[] = "it drained: its host is leaving";

// Why a peer failed the TLS handshake, in the words of what to fix.
std::string tls_refusal(bool keyed_by_token, absl::string_view why) {
  if (keyed_by_token && absl::StrContains(why, "binder does not verify")) {
    return absl::StrCat("wrong token: the worker's TLS key (derived from its token) is not the "
                        "pool's (", why, ")");
  }
  return absl::StrCat(keyed_by_token ? "its TLS handshake failed (a worker without the pool's "
                                       "token, or one told not to encrypt?): "
                                     : "its TLS handshake failed (no certificate, or one the "
                                       "pool's CA did not sign?): ",
                      why);
}

}  // namespace

RemoteHost::RemoteHost(UniqueFd socket, std::string peer, const RemoteHostConfig& config,
                       int64_t accepted_ns)
    : peer_(std::move(peer)),
      config_(config),
      stream_(kHandshakeFrameBytes, config_.limits.frame_timeout) {
  absl::StatusOr<std::unique_ptr<TlsChannel>> channel = TlsChannel::open(config_.tls, std::move(socket));
  if (channel.ok()) {
    channel_ = *std::move(channel);
  } else {
    state_ = State::kClosed;
    closed_reason_ = std::string(channel.status().message());
  }
  const int64_t now = monotonic_now_ns();
  accepted_ns_ = accepted_ns;
  handshake_deadline_ns_ = accepted_ns + to_ns(config_.handshake_timeout);
  last_received_ns_ = now;
  last_ping_ns_ = now;
}

RemoteHost::~RemoteHost() {
  if (link_ != nullptr) link_->bind(nullptr);
}

bool sent_nothing(int fd) {
  char byte;
  return ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN;
}

bool RemoteHost::silent() const {
  if (state_ != State::kHandshake || stream_.last_read_ns() != 0 || heard_ || !channel_) return false;
  return sent_nothing(channel_->fd());
}

short RemoteHost::poll_events() const {
  if (channel_ && !channel_->established()) return handshake_wants_write_ ? POLLOUT : POLLIN;
  return static_cast<short>(POLLIN | (writer_.empty() ? 0 : POLLOUT));
}

void RemoteHost::queue(capnp::MessageBuilder& message) {
  if (state_ != State::kClosed) writer_.push_copy(capnp::messageToFlatArray(message));
  update_watch();
}

void RemoteHost::flush() {
  if (state_ == State::kClosed || writer_.empty()) return;
  // A failure means the connection is gone: the next read says so.
  if (!writer_.write_some(*channel_).ok()) writer_.clear();
  update_watch();
}

std::unique_ptr<TlsChannel> RemoteHost::take_channel() {
  state_ = State::kClosed;
  watch_.reset();  // the link that takes it lists it itself
  return std::move(channel_);
}

void RemoteHost::set_watch(PollSet::Watch watch) {
  watch_ = std::move(watch);
  watch_key_ = watch_.key();
  update_watch();
}

void RemoteHost::update_watch() {
  if (watch_ && channel_) watch_.change(poll_events());
}

void RemoteHost::drop_channel() {
  watch_.reset();
  channel_.reset();
}

FrameReader RemoteHost::take_reader() { return std::move(stream_.reader()); }

void RemoteHost::service(short revents, const EventsOf& events_of) {
  service_events(revents, events_of);
  update_watch();
}

void RemoteHost::service_events(short revents, const EventsOf& events_of) {
  if (state_ == State::kClosed || state_ == State::kData) return;
  if (!channel_->established()) {
    if ((revents & POLLIN) && !heard_) {
      char byte;
      heard_ = ::recv(channel_->fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
    }
    absl::StatusOr<TlsChannel::Step> step = channel_->handshake();
    if (!step.ok()) {
      // Nothing came, or someone who is not a worker of this pool: no frame can tell it why.
      const bool silent = absl::StrContains(step.status().message(), "the peer closed the connection");
      refused_ = !silent;
      closed_reason_ = silent ? "it closed its connection during the TLS handshake"
                              : tls_refusal(!config_.tls->psk().empty(), step.status().message());
      state_ = State::kClosed;
      drop_channel();
      return;
    }
    handshake_wants_write_ = *step == TlsChannel::Step::kWantWrite;
    if (*step != TlsChannel::Step::kDone) return;
    // Done: its hello may have come with its last handshake message, read already.
    revents |= POLLIN;
  }
  if ((revents & POLLOUT) && !writer_.write_some(*channel_).ok()) {
    close("its connection broke", events_of);
    return;
  }
  if (!(revents & (POLLIN | POLLHUP | POLLERR))) return;
  // Bounded: a flood from one host must not starve the others. A frame begun must end within
  // frame_timeout (check()), as on a worker's data connection: a peer that sends half a frame and
  // then only heartbeats' worth of silence is not kept.
  const FrameStream::ReadResult read =
      stream_.read(*channel_, 16, [&](kj::ArrayPtr<const capnp::word> frame) {
        on_frame(frame, events_of);
        return state_ != State::kClosed && state_ != State::kData;
      });
  last_received_ns_ = std::max(last_received_ns_, stream_.last_read_ns());
  if (state_ == State::kClosed || state_ == State::kData) return;
  if (read.broken && channel_->record_failed()) {
    close(absl::StrCat("its control connection broke: ", read.why.message()), events_of,
          /*corrupted=*/true);
  } else if (read.broken) {
    close(std::string(read.why.message()), events_of);
  } else if (read.closed) {
    close(read.why.ok() ? "it closed its connection" : std::string(read.why.message()), events_of);
  }
}

void RemoteHost::on_frame(kj::ArrayPtr<const capnp::word> words, const EventsOf& events_of) {
  if (state_ == State::kHandshake) {
    const absl::Status shook = guarded("a malformed handshake frame", [&] {
      handshake_frame(words);
      return absl::OkStatus();
    });
    if (!shook.ok()) refuse(std::string(shook.message()));
    return;
  }
  const absl::Status parsed = guarded("sent a malformed frame", [&]() -> absl::Status {
    capnp::FlatArrayMessageReader message(words, stream_.options());
    auto root = message.getRoot<wire::FromWorker>();
    switch (root.which()) {
      case wire::FromWorker::PONG:
        if (link_ != nullptr) link_->on_pong(root.getPong());
        return absl::OkStatus();
      case wire::FromWorker::SPAWNED:
        if (link_ != nullptr) link_->on_spawned(root.getSpawned(), events_of(*link_));
        return absl::OkStatus();
      case wire::FromWorker::REVOKED:
        if (link_ != nullptr) {
          auto revoked = root.getRevoked();
          events_of(*link_).on_revoked(revoked.getSlot(), revoked.getTag(), revoked.getClaimed());
        }
        return absl::OkStatus();
      case wire::FromWorker::OUTPUT:
        if (link_ != nullptr) link_->on_output(root.getOutput(), events_of(*link_));
        return absl::OkStatus();
      case wire::FromWorker::ENDED:
        if (link_ != nullptr) link_->on_ended(root.getEnded(), events_of(*link_));
        return absl::OkStatus();
      case wire::FromWorker::DRAINING:
        // Its host is leaving: whatever it is told, it gets no worker again (unbind closes it).
        draining_ = true;
        if (link_ != nullptr) {
          link_->on_draining(events_of(*link_));
        } else {
          close(kDrained, events_of);
        }
        return absl::OkStatus();
      case wire::FromWorker::REFUSED:
        // After the welcome: the pool's proof or type did not suit the worker (handshake.h).
        close(absl::StrCat("the worker refused the pool: ", peer_text(root.getRefused())), events_of);
        return absl::OkStatus();
      default:
        return absl::DataLossError(
            "sent a frame a worker host does not send over its control connection");
    }
  });
  if (!parsed.ok()) close(std::string(parsed.message()), events_of);
}

void RemoteHost::handshake_frame(kj::ArrayPtr<const capnp::word> words) {
  capnp::FlatArrayMessageReader message(words, stream_.options());
  auto root = message.getRoot<wire::FromWorker>();
  if (worker_nonce_.empty()) {
    if (root.isAttach()) {
      // A worker's data connection: the launcher gives it to the link that spawned it.
      data_id_ = as_string(root.getAttach().getDataId());
      data_proof_ = as_string(root.getAttach().getProof());
      data_exporter_ = channel_->exporter(kDataExporterLabel);
      state_ = State::kData;
      stream_.reader().set_max_frame_bytes(config_.limits.max_frame_bytes);
      return;
    }
    if (!root.isHello()) return refuse("the first frame was not a hello");
    auto hello = root.getHello();
    // Read before anything is checked: a refused worker's launch fails at once (the launcher).
    if (auto id = hello.getLaunchId(); id.size() <= kMaxLaunchIdBytes) {
      launch_id_.assign(id.begin(), id.size());
    }
    if (hello.getVersion() != kProtocolVersion) {
      return refuse(absl::StrCat("the worker speaks protocol version ", hello.getVersion(),
                                 ", the pool version ", kProtocolVersion,
                                 ": build both from the same procpool"));
    }
    if (hello.getNonce().size() != kNonceBytes) return refuse("the worker's nonce has the wrong size");
    worker_nonce_ = as_string(hello.getNonce());
    pool_nonce_ = make_nonce();
    // Only a nonce: the pool proves the token (and says what it is) once the worker has proved it.
    capnp::MallocMessageBuilder reply(64);
    auto challenge = reply.initRoot<wire::ToWorker>().initChallenge();
    challenge.setVersion(kProtocolVersion);
    challenge.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(pool_nonce_.data()),
                                           pool_nonce_.size()));
    queue(reply);
    flush();
    return;
  }
  if (root.isRefused()) {
    refused_ = true;
    closed_reason_ = absl::StrCat("the worker refused the pool: ", peer_text(root.getRefused()));
    state_ = State::kClosed;
    drop_channel();
    return;
  }
  if (!root.isCredentials()) return refuse("the worker answered the challenge with something else");
  auto credentials = root.getCredentials();
  if (!proof_matches(config_.token, "worker", pool_nonce_, worker_nonce_,
                     as_string(credentials.getProof()))) {
    return refuse(credentials.getProof().size() == 0
                      ? "the worker proved no token (is PROCPOOL_TOKEN or PROCPOOL_TOKEN_FILE set "
                        "in its environment?)"
                      : "wrong token: the worker's proof does not match the pool's token");
  }
  host_name_ = peer_text(credentials.getHost());
  if (credentials.getWorkerType().size() > 0 &&
      std::string(credentials.getWorkerType().cStr()) != config_.worker_type) {
    return refuse(absl::StrCat("the worker serves ", peer_text(credentials.getWorkerType()),
                               ", but the pool's workers are ", config_.worker_type));
  }
  capnp::MallocMessageBuilder reply(64);
  auto welcome = reply.initRoot<wire::ToWorker>().initWelcome();
  write_welcome(config_.limits, welcome);
  const std::string proof = prove(config_.token, "pool", worker_nonce_, pool_nonce_);
  welcome.setProof(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(proof.data()), proof.size()));
  welcome.setWorkerType(config_.worker_type);
  queue(reply);
  flush();
  session_secret_ = internal::session_secret(config_.token, worker_nonce_, pool_nonce_,
                                   channel_->exporter(kSessionExporterLabel));
  state_ = State::kIdle;
  // Control frames are small (heartbeats, progress, a worker's end): a token holder's connection
  // may not make the pool buffer more, and what it holds unfinished counts against the pool's
  // budget.
  stream_.reader().set_max_frame_bytes(kControlFrameBytes);
  if (config_.frame_budget) stream_.share_budget(config_.frame_budget);
}

void RemoteHost::refuse(const std::string& why) {
  capnp::MallocMessageBuilder message(64);
  message.initRoot<wire::ToWorker>().setRefused(why);
  queue(message);
  flush();
  refused_ = true;
  closed_reason_ = why;
  state_ = State::kClosed;
  drop_channel();
}

int64_t RemoteHost::check(int64_t now_ns, const EventsOf& events_of) {
  const int64_t next = check_deadlines(now_ns, events_of);
  update_watch();
  return next;
}

int64_t RemoteHost::check_deadlines(int64_t now_ns, const EventsOf& events_of) {
  if (state_ == State::kClosed || state_ == State::kData) return INT64_MAX;
  if (state_ == State::kHandshake) {
    if (now_ns >= handshake_deadline_ns_) {
      close(absl::StrCat("did not finish its handshake within ",
                         absl::FormatDuration(config_.handshake_timeout)),
            events_of);
      return INT64_MAX;
    }
    return handshake_deadline_ns_;
  }
  int64_t next = INT64_MAX;
  if (const absl::Status late = stream_.check(now_ns, next); !late.ok()) {
    close(std::string(late.message()), events_of);
    return INT64_MAX;
  }
  const int64_t heartbeat = to_ns(config_.limits.heartbeat_timeout);
  if (now_ns - last_received_ns_ >= heartbeat) {
    close(absl::StrCat("sent nothing for ", absl::FormatDuration(config_.limits.heartbeat_timeout),
                       " (no heartbeat): its host or its connection is gone"),
          events_of);
    return INT64_MAX;
  }
  if (now_ns - last_ping_ns_ >= heartbeat / 4) {
    capnp::MallocMessageBuilder ping(16);
    ping.initRoot<wire::ToWorker>().setPing();
    queue(ping);
    flush();
    last_ping_ns_ = now_ns;
  }
  return std::min({next, last_received_ns_ + heartbeat, last_ping_ns_ + heartbeat / 4});
}

void RemoteHost::bind(TcpLink* link, int slot, const std::string& data_id) {
  link_ = link;
  state_ = State::kBusy;
  capnp::MallocMessageBuilder spawn(32);
  auto request = spawn.initRoot<wire::ToWorker>().initSpawn();
  request.setSlot(static_cast<uint32_t>(slot));
  request.setDataId(
      capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(data_id.data()), data_id.size()));
  placement_to_wire(link->placement(), request.initPlacement());
  queue(spawn);
  flush();
}

void RemoteHost::unbind(TcpLink* link) {
  if (link_ != link) return;
  link_ = nullptr;
  if (state_ == State::kBusy) state_ = State::kIdle;
  // Its worker has ended: the relay sees end of file and exits. (No link is bound: close() needs
  // no events. Safe within this host's own reading: it stops at a closed host.)
  if (draining_) close(kDrained, EventsOf());
}

void RemoteHost::close(const std::string& why, const EventsOf& events_of, bool corrupted) {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  closed_reason_ = why;
  drop_channel();
  writer_.clear();
  if (TcpLink* link = std::exchange(link_, nullptr)) link->on_lost(why, events_of(*link), corrupted);
}

}  // namespace procpool::internal
