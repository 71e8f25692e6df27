#include "lib/link/tcp_link.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/common/clock.h"
#include "lib/link/handshake.h"

namespace procpool::internal {

// --- RemoteHost ------------------------------------------------------------------------------

RemoteHost::RemoteHost(UniqueFd socket, std::string peer, const RemoteHostConfig& config)
    : socket_(std::move(socket)),
      peer_(std::move(peer)),
      config_(config),
      reader_(kHandshakeFrameBytes) {
  const int64_t now = monotonic_now_ns();
  handshake_deadline_ns_ = now + to_ns(config_.handshake_timeout);
  last_received_ns_ = now;
  last_ping_ns_ = now;
}

RemoteHost::~RemoteHost() {
  if (link_ != nullptr) link_->bind(nullptr);
}

short RemoteHost::poll_events() const {
  return static_cast<short>(POLLIN | (writer_.empty() ? 0 : POLLOUT));
}

void RemoteHost::queue(std::unique_ptr<capnp::MessageBuilder> frame) {
  if (state_ != State::kClosed) writer_.push(std::move(frame));
}

void RemoteHost::queue(capnp::MessageBuilder& message) {
  if (state_ != State::kClosed) writer_.push_copy(capnp::messageToFlatArray(message));
}

void RemoteHost::flush() {
  if (state_ == State::kClosed || writer_.empty()) return;
  // A failure means the connection is gone: the next read says so.
  if (!writer_.write_some(socket_.get()).ok()) writer_.clear();
}

void RemoteHost::service(short revents, const std::function<LinkEvents&(WorkerLink&)>& events_of) {
  if (state_ == State::kClosed) return;
  if ((revents & POLLOUT) && !writer_.write_some(socket_.get()).ok()) {
    close("its connection broke", events_of);
    return;
  }
  if (!(revents & (POLLIN | POLLHUP | POLLERR))) return;
  // Bounded: a flood from one host must not starve the others.
  for (int round = 0; round < 16 && state_ != State::kClosed; ++round) {
    absl::StatusOr<FrameReader::Fill> filled = reader_.fill(socket_.get());
    if (!filled.ok() || *filled == FrameReader::Fill::kEndOfFile) {
      if (reader_.has_partial_frame() && link_ != nullptr) {
        events_of(*link_).on_broken_stream(absl::DataLossError(
            absl::StrCat(link_->name(), " sent a truncated frame before its connection closed")));
      }
      close(filled.ok() ? "it closed its connection" : std::string(filled.status().message()),
            events_of);
      return;
    }
    if (*filled == FrameReader::Fill::kWouldBlock) break;
    last_received_ns_ = monotonic_now_ns();
    bool completed = false;
    while (state_ != State::kClosed) {
      absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader_.next();
      if (!frame.ok()) {
        const std::string why = absl::StrCat("sent a bad frame: ", frame.status().message());
        if (link_ != nullptr) {
          events_of(*link_).on_broken_stream(absl::DataLossError(absl::StrCat(link_->name(), " ", why)));
        }
        close(why, events_of);
        return;
      }
      if (frame->size() == 0) break;
      completed = true;
      on_frame(*frame, events_of);
    }
    if (!reader_.has_partial_frame()) {
      partial_since_ns_ = 0;
    } else if (completed || partial_since_ns_ == 0) {
      partial_since_ns_ = monotonic_now_ns();
    }
  }
}

void RemoteHost::on_frame(kj::ArrayPtr<const capnp::word> words,
                          const std::function<LinkEvents&(WorkerLink&)>& events_of) {
  if (state_ == State::kHandshake) {
    try {
      handshake_frame(words);
    } catch (const kj::Exception& e) {
      refuse(absl::StrCat("a malformed handshake frame: ", e.getDescription().cStr()));
    }
    return;
  }
  try {
    capnp::FlatArrayMessageReader message(words, reader_.options());
    auto root = message.getRoot<wire::FromWorker>();
    switch (root.which()) {
      case wire::FromWorker::PONG:
        if (link_ != nullptr) link_->on_pong(root.getPong());
        return;
      case wire::FromWorker::SPAWNED:
        if (link_ != nullptr) link_->on_spawned(root.getSpawned());
        return;
      case wire::FromWorker::REVOKED:
        if (link_ != nullptr) {
          auto revoked = root.getRevoked();
          events_of(*link_).on_revoked(revoked.getSlot(), revoked.getTag(), revoked.getClaimed());
        }
        return;
      case wire::FromWorker::ENDED:
        if (link_ != nullptr) link_->on_ended(root.getEnded(), events_of(*link_));
        return;
      case wire::FromWorker::READY:
      case wire::FromWorker::ENTER_FAILED:
      case wire::FromWorker::RESULTS:
      case wire::FromWorker::EXITED:
        // The worker's own frames: parsed by supervision, like a forked worker's.
        if (link_ != nullptr) events_of(*link_).on_frame(words);
        return;
      default:
        break;
    }
    const std::string why = "sent a handshake frame after the handshake";
    if (link_ != nullptr) {
      events_of(*link_).on_broken_stream(absl::DataLossError(absl::StrCat(link_->name(), " ", why)));
    }
    close(why, events_of);
  } catch (const kj::Exception& e) {
    const std::string why = absl::StrCat("sent a malformed frame: ", e.getDescription().cStr());
    if (link_ != nullptr) {
      events_of(*link_).on_broken_stream(absl::DataLossError(absl::StrCat(link_->name(), " ", why)));
    }
    close(why, events_of);
  }
}

void RemoteHost::handshake_frame(kj::ArrayPtr<const capnp::word> words) {
  capnp::FlatArrayMessageReader message(words, reader_.options());
  auto root = message.getRoot<wire::FromWorker>();
  if (worker_nonce_.empty()) {
    if (!root.isHello()) return refuse("the first frame was not a hello");
    auto hello = root.getHello();
    host_name_ = std::string(hello.getHost().cStr()).substr(0, 255);
    if (hello.getVersion() != kProtocolVersion) {
      return refuse(absl::StrCat("the worker speaks protocol version ", hello.getVersion(),
                                 ", the pool version ", kProtocolVersion,
                                 ": build both from the same procpool"));
    }
    if (hello.getWorkerType().size() > 0 &&
        std::string(hello.getWorkerType().cStr()) != config_.worker_type) {
      return refuse(absl::StrCat("the worker serves ", hello.getWorkerType().cStr(),
                                 ", but the pool's workers are ", config_.worker_type));
    }
    if (hello.getNonce().size() != kNonceBytes) return refuse("the worker's nonce has the wrong size");
    worker_nonce_ = as_string(hello.getNonce());
    pool_nonce_ = make_nonce();
    capnp::MallocMessageBuilder reply(64);
    auto challenge = reply.initRoot<wire::ToWorker>().initChallenge();
    challenge.setVersion(kProtocolVersion);
    challenge.setWorkerType(config_.worker_type);
    challenge.setNonce(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(pool_nonce_.data()),
                                           pool_nonce_.size()));
    const std::string proof = prove(config_.token, "pool", worker_nonce_, pool_nonce_);
    challenge.setProof(
        capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(proof.data()), proof.size()));
    queue(reply);
    flush();
    return;
  }
  if (root.isRefused()) {
    refused_ = true;
    closed_reason_ = absl::StrCat("the worker refused the pool: ", root.getRefused().cStr());
    state_ = State::kClosed;
    socket_.reset();
    return;
  }
  if (!root.isProof()) return refuse("the worker answered the challenge with something else");
  if (!proof_matches(config_.token, "worker", pool_nonce_, worker_nonce_, as_string(root.getProof()))) {
    return refuse(config_.token.empty()
                      ? "the worker proved a token, and this pool has none"
                      : root.getProof().size() == 0
                            ? "the worker proved no token (is PROCPOOL_TOKEN set in its environment?)"
                            : "wrong token: the worker's proof does not match the pool's token");
  }
  capnp::MallocMessageBuilder reply(64);
  write_welcome(config_.limits, reply.initRoot<wire::ToWorker>().initWelcome());
  queue(reply);
  flush();
  proved_ = true;
  state_ = State::kIdle;
  reader_.set_max_frame_bytes(config_.limits.max_frame_bytes);
}

void RemoteHost::refuse(const std::string& why) {
  capnp::MallocMessageBuilder message(64);
  message.initRoot<wire::ToWorker>().setRefused(why);
  queue(message);
  flush();
  refused_ = true;
  closed_reason_ = why;
  state_ = State::kClosed;
  socket_.reset();
}

int64_t RemoteHost::check(int64_t now_ns, const std::function<LinkEvents&(WorkerLink&)>& events_of) {
  if (state_ == State::kClosed) return INT64_MAX;
  if (state_ == State::kHandshake) {
    if (now_ns >= handshake_deadline_ns_) {
      close(absl::StrCat("did not finish its handshake within ",
                         absl::FormatDuration(config_.handshake_timeout)),
            events_of);
      return INT64_MAX;
    }
    return handshake_deadline_ns_;
  }
  const int64_t heartbeat = to_ns(config_.limits.heartbeat_timeout);
  if (now_ns - last_received_ns_ >= heartbeat) {
    close(absl::StrCat("sent nothing for ", absl::FormatDuration(config_.limits.heartbeat_timeout),
                       " (no heartbeat): its host or its connection is gone"),
          events_of);
    return INT64_MAX;
  }
  if (partial_since_ns_ != 0 && now_ns - partial_since_ns_ >= to_ns(config_.limits.frame_timeout)) {
    const std::string why = absl::StrCat("began a frame and did not finish it within frame_timeout (",
                                         absl::FormatDuration(config_.limits.frame_timeout), ")");
    if (link_ != nullptr) {
      events_of(*link_).on_broken_stream(absl::DataLossError(absl::StrCat(link_->name(), " ", why)));
    }
    close(why, events_of);
    return INT64_MAX;
  }
  if (now_ns - last_ping_ns_ >= heartbeat / 4) {
    capnp::MallocMessageBuilder ping(16);
    ping.initRoot<wire::ToWorker>().setPing();
    queue(ping);
    flush();
    last_ping_ns_ = now_ns;
  }
  int64_t next = std::min(last_received_ns_ + heartbeat, last_ping_ns_ + heartbeat / 4);
  if (partial_since_ns_ != 0) next = std::min(next, partial_since_ns_ + to_ns(config_.limits.frame_timeout));
  return next;
}

void RemoteHost::bind(TcpLink* link, int slot) {
  link_ = link;
  state_ = State::kBusy;
  capnp::MallocMessageBuilder spawn(16);
  spawn.initRoot<wire::ToWorker>().setSpawn(static_cast<uint32_t>(slot));
  queue(spawn);
  flush();
}

void RemoteHost::unbind(TcpLink* link) {
  if (link_ != link) return;
  link_ = nullptr;
  if (state_ == State::kBusy) state_ = State::kIdle;
}

void RemoteHost::close(const std::string& why,
                       const std::function<LinkEvents&(WorkerLink&)>& events_of) {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  closed_reason_ = why;
  socket_.reset();
  writer_.clear();
  if (TcpLink* link = std::exchange(link_, nullptr)) link->on_lost(why, events_of(*link));
}

// --- TcpLink -----------------------------------------------------------------------------------

TcpLink::TcpLink(std::string slot_name, int slot, int64_t wait_until_ns)
    : slot_name_(std::move(slot_name)), slot_(slot), name_(slot_name_), wait_until_ns_(wait_until_ns) {}

TcpLink::~TcpLink() {
  if (host_ != nullptr) host_->unbind(this);
  if (on_destroy_) on_destroy_();
}

void TcpLink::bind(RemoteHost* host) {
  host_ = host;
  if (host == nullptr) return;
  name_ = absl::StrCat(slot_name_, " (on ", host->host_name(), " ", host->peer(), ")");
  host->bind(this, slot_);
  // What was sent while it waited (a shutdown at join) follows the spawn, in order.
  for (auto& frame : unsent_) host->queue(std::move(frame));
  unsent_.clear();
  host->flush();
}

void TcpLink::send(std::unique_ptr<capnp::MessageBuilder> frame) {
  if (ended_) return;
  if (host_ != nullptr) {
    host_->queue(std::move(frame));
  } else {
    unsent_.push_back(std::move(frame));
  }
}

void TcpLink::flush() {
  if (host_ != nullptr) host_->flush();
}

bool TcpLink::has_unsent() const { return host_ != nullptr && host_->has_unsent(); }

int64_t TcpLink::check(int64_t now_ns, LinkEvents& events) {
  if (ended_ || host_ == nullptr) return INT64_MAX;
  if (drop_at_ns_ != 0) {
    if (now_ns >= drop_at_ns_) {
      host_->close("its worker did not end after SIGKILL", [&](WorkerLink&) -> LinkEvents& { return events; });
      return INT64_MAX;
    }
    return drop_at_ns_;
  }
  return INT64_MAX;
}

void TcpLink::revoke(uint32_t slot, uint16_t tag, LinkEvents&) {
  if (host_ == nullptr || ended_) return;
  capnp::MallocMessageBuilder message(32);
  auto revoke = message.initRoot<wire::ToWorker>().initRevoke();
  revoke.setSlot(slot);
  revoke.setTag(tag);
  host_->queue(message);
  host_->flush();
}

void TcpLink::stop(StopMode mode) {
  if (host_ == nullptr || ended_) return;
  capnp::MallocMessageBuilder message(16);
  message.initRoot<wire::ToWorker>().setStop(mode == StopMode::kKill ? 9 : 15);
  host_->queue(message);
  host_->flush();
  // A relay that cannot stop its worker is itself in trouble: the connection goes.
  if (mode == StopMode::kKill && drop_at_ns_ == 0) drop_at_ns_ = monotonic_now_ns() + 2'000'000'000;
}

void TcpLink::on_spawned(int pid) {
  pid_ = pid;
  if (host_ != nullptr) {
    name_ = absl::StrCat(slot_name_, " on ", host_->host_name(), " (pid ", pid, ")");
  }
}

void TcpLink::on_pong(wire::Progress::Reader progress) {
  progress_ = read_progress(progress, monotonic_now_ns());
  resident_bytes_ = progress.getResidentBytes();
}

void TcpLink::on_ended(wire::Ended::Reader ended, LinkEvents& events) {
  progress_ = read_progress(ended.getProgress(), monotonic_now_ns());
  progress_.exact = true;  // read by its relay after it ended
  if (ended.hasBrokenStream() && ended.getBrokenStream().size() > 0) {
    events.on_broken_stream(
        absl::DataLossError(absl::StrCat(name_, " ", ended.getBrokenStream().cStr())));
  }
  WorkerEnd end_of{ended.getHow(), ended.getClean()};
  if (ended.hasTimedOut() && ended.getTimedOut().size() > 0) {
    end_of.cause = absl::DeadlineExceededError(absl::StrCat(name_, ": ", ended.getTimedOut().cStr()));
  }
  end(std::move(end_of), events);
}

void TcpLink::on_lost(const std::string& why, LinkEvents& events) {
  progress_.exact = false;
  host_ = nullptr;
  end({absl::StrCat("was lost: ", why), false}, events);
}

void TcpLink::end_waiting(LinkEvents& events, absl::Status cause) {
  WorkerEnd end_of{absl::StrCat("got no worker host: ", cause.message()), false};
  end_of.cause = std::move(cause);
  end(std::move(end_of), events);
}

void TcpLink::end(WorkerEnd end_of, LinkEvents& events) {
  if (ended_) return;
  ended_ = true;
  if (host_ != nullptr) {
    host_->unbind(this);
    host_ = nullptr;
  }
  events.on_ended(std::move(end_of));
}

}  // namespace procpool::internal
