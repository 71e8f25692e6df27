#include "lib/link/tcp_link.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/common/clock.h"
#include "lib/link/handshake.h"

namespace procpool::internal {
namespace {

// The relay reports a worker's end over its control connection; what the worker sent before it
// comes over its data connection, which closes as it dies. Waited for at most this long.
constexpr int64_t kDataDrainNs = 2'000'000'000;

}  // namespace

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

void RemoteHost::queue(capnp::MessageBuilder& message) {
  if (state_ != State::kClosed) writer_.push_copy(capnp::messageToFlatArray(message));
}

void RemoteHost::flush() {
  if (state_ == State::kClosed || writer_.empty()) return;
  // A failure means the connection is gone: the next read says so.
  if (!writer_.write_some(socket_.get()).ok()) writer_.clear();
}

UniqueFd RemoteHost::take_socket() {
  state_ = State::kClosed;
  return std::move(socket_);
}

FrameReader RemoteHost::take_reader() { return std::move(reader_); }

void RemoteHost::service(short revents, const EventsOf& events_of) {
  if (state_ == State::kClosed || state_ == State::kData) return;
  if ((revents & POLLOUT) && !writer_.write_some(socket_.get()).ok()) {
    close("its connection broke", events_of);
    return;
  }
  if (!(revents & (POLLIN | POLLHUP | POLLERR))) return;
  // Bounded: a flood from one host must not starve the others.
  for (int round = 0; round < 16 && (state_ != State::kClosed && state_ != State::kData); ++round) {
    absl::StatusOr<FrameReader::Fill> filled = reader_.fill(socket_.get());
    if (!filled.ok() || *filled == FrameReader::Fill::kEndOfFile) {
      close(filled.ok() ? "it closed its connection" : std::string(filled.status().message()),
            events_of);
      return;
    }
    if (*filled == FrameReader::Fill::kWouldBlock) break;
    last_received_ns_ = monotonic_now_ns();
    bool completed = false;
    while (state_ != State::kClosed && state_ != State::kData) {
      absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader_.next();
      if (!frame.ok()) {
        close(absl::StrCat("sent a bad frame: ", frame.status().message()), events_of);
        return;
      }
      if (frame->size() == 0) break;
      completed = true;
      on_frame(*frame, events_of);
    }
    if (!reader_.has_partial_frame()) {
      partial_since_ns_ = 0;
    } else if (completed || partial_since_ns_ == 0) {
      partial_since_ns_ = last_received_ns_;
    }
  }
}

void RemoteHost::on_frame(kj::ArrayPtr<const capnp::word> words, const EventsOf& events_of) {
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
        if (link_ != nullptr) link_->on_spawned(root.getSpawned(), events_of(*link_));
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
      default:
        break;
    }
    close("sent a frame a worker host does not send over its control connection", events_of);
  } catch (const kj::Exception& e) {
    close(absl::StrCat("sent a malformed frame: ", e.getDescription().cStr()), events_of);
  }
}

void RemoteHost::handshake_frame(kj::ArrayPtr<const capnp::word> words) {
  capnp::FlatArrayMessageReader message(words, reader_.options());
  auto root = message.getRoot<wire::FromWorker>();
  if (worker_nonce_.empty()) {
    if (root.isAttach()) {
      // A worker's data connection: the launcher gives it to the link that spawned it.
      data_id_ = as_string(root.getAttach().getDataId());
      data_proof_ = as_string(root.getAttach().getProof());
      state_ = State::kData;
      reader_.set_max_frame_bytes(config_.limits.max_frame_bytes);
      return;
    }
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

int64_t RemoteHost::check(int64_t now_ns, const EventsOf& events_of) {
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
  // A frame begun must end within frame_timeout, as on a worker's data connection: bytes that
  // trickle in keep the heartbeat fresh but never make a frame.
  int64_t next = INT64_MAX;
  if (partial_since_ns_ != 0) {
    const int64_t deadline = partial_since_ns_ + to_ns(config_.limits.frame_timeout);
    if (now_ns >= deadline) {
      close(absl::StrCat("began a frame and did not finish it within frame_timeout (",
                         absl::FormatDuration(config_.limits.frame_timeout), ")"),
            events_of);
      return INT64_MAX;
    }
    next = deadline;
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
  queue(spawn);
  flush();
}

void RemoteHost::unbind(TcpLink* link) {
  if (link_ != link) return;
  link_ = nullptr;
  if (state_ == State::kBusy) state_ = State::kIdle;
}

void RemoteHost::close(const std::string& why, const EventsOf& events_of) {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  closed_reason_ = why;
  socket_.reset();
  writer_.clear();
  if (TcpLink* link = std::exchange(link_, nullptr)) link->on_lost(why, events_of(*link));
}

// --- TcpLink -----------------------------------------------------------------------------------

TcpLink::TcpLink(std::string slot_name, int slot, int64_t wait_until_ns, RelayLimits limits)
    : slot_name_(std::move(slot_name)),
      slot_(slot),
      limits_(std::move(limits)),
      name_(slot_name_),
      wait_until_ns_(wait_until_ns),
      reader_(limits_.max_frame_bytes) {}

TcpLink::~TcpLink() {
  if (host_ != nullptr) host_->unbind(this);
  if (on_destroy_) on_destroy_();
}

void TcpLink::bind(RemoteHost* host) {
  host_ = host;
  if (host == nullptr) return;
  name_ = absl::StrCat(slot_name_, " on ", host->host_name());
  placed_ns_ = monotonic_now_ns();
  data_id_ = make_nonce();
  host->bind(this, slot_, data_id_);
}

void TcpLink::attach(UniqueFd data, FrameReader reader, LinkEvents& events) {
  if (ended_ || attached_) return;  // a late or second connection: dropped with `data`
  attached_ = true;
  data_ = std::move(data);
  reader_ = std::move(reader);
  (void)set_nonblocking(data_.get(), true);
  for (auto& frame : unsent_) writer_.push(std::move(frame));
  unsent_.clear();
  flush();
  // Frames that came with the attach (its READY) are buffered already: poll() will not say so.
  if (pid_ != 0) read_data(events);
}

void TcpLink::send(std::unique_ptr<capnp::MessageBuilder> frame) {
  if (ended_ || data_closed_) return;
  if (!attached_) {
    unsent_.push_back(std::move(frame));
  } else {
    writer_.push(std::move(frame));
  }
}

void TcpLink::flush() {
  if (!attached_ || data_closed_ || writer_.empty()) return;
  // A failure means the worker is gone: its relay reports it.
  if (!writer_.write_some(data_.get()).ok()) writer_.clear();
}

bool TcpLink::has_unsent() const { return !writer_.empty() || !unsent_.empty(); }

void TcpLink::add_pollfds(std::vector<pollfd>& fds, bool with_channel) {
  // Its frames wait for its pid (`spawned`, from its relay): a worker is never seen without it.
  polled_data_ = with_channel && attached_ && pid_ != 0 && !data_closed_ && !ended_;
  if (polled_data_) {
    fds.push_back({data_.get(), static_cast<short>(POLLIN | (writer_.empty() ? 0 : POLLOUT)), 0});
  }
}

void TcpLink::service(const pollfd* polled, size_t count, bool with_channel, LinkEvents& events) {
  if (polled_data_ && count > 0 && polled[0].revents != 0 && with_channel) {
    pump(polled[0].revents, events);
  }
}

void TcpLink::pump(short revents, LinkEvents& events) {
  if (!attached_ || pid_ == 0 || data_closed_ || ended_) return;
  if ((revents & POLLOUT) && !writer_.write_some(data_.get()).ok()) writer_.clear();
  if (revents & (POLLIN | POLLHUP | POLLERR)) read_data(events);
}

void TcpLink::read_data(LinkEvents& events) {
  // Frames already buffered go first (on attach, those that came with it: poll() will not say
  // so); then what the socket has. Bounded: a flood from one worker must not starve the others.
  for (int round = 0; !data_closed_; ++round) {
    bool completed = false;
    while (!data_closed_) {
      absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader_.next();
      if (!frame.ok()) {
        events.on_broken_stream(absl::DataLossError(
            absl::StrCat(name_, " sent a bad frame: ", frame.status().message())));
        close_data();
        return;
      }
      if (frame->size() == 0) break;
      completed = true;
      events.on_frame(*frame);
    }
    if (data_closed_) return;
    if (!reader_.has_partial_frame()) {
      partial_since_ns_ = 0;
    } else if (completed || partial_since_ns_ == 0) {
      partial_since_ns_ = monotonic_now_ns();
    }
    if (round == 16) return;
    absl::StatusOr<FrameReader::Fill> filled = reader_.fill(data_.get());
    if (filled.ok() && *filled == FrameReader::Fill::kWouldBlock) return;
    if (!filled.ok() || *filled == FrameReader::Fill::kEndOfFile) {
      // The worker closed its end: it is gone or going; its relay says how.
      if (reader_.has_partial_frame()) {
        events.on_broken_stream(absl::DataLossError(
            absl::StrCat(name_, " sent a truncated frame before its connection closed")));
      }
      close_data();
      if (ended_report_) end(*std::exchange(ended_report_, std::nullopt), events);
      return;
    }
  }
}

void TcpLink::close_data() {
  data_closed_ = true;
  data_.reset();
  writer_.clear();
  partial_since_ns_ = 0;
}

int64_t TcpLink::check(int64_t now_ns, LinkEvents& events) {
  if (ended_) return INT64_MAX;
  int64_t next = INT64_MAX;
  if (partial_since_ns_ != 0 && !data_closed_) {
    const int64_t deadline = partial_since_ns_ + to_ns(limits_.frame_timeout);
    if (now_ns >= deadline) {
      events.on_broken_stream(absl::DataLossError(absl::StrCat(
          name_, " began a frame and did not finish it within frame_timeout (",
          absl::FormatDuration(limits_.frame_timeout), ")")));
      close_data();
    } else {
      next = std::min(next, deadline);
    }
  }
  if (ended_report_) {
    // Its data connection should have closed with it; do not wait for it forever.
    if (data_closed_ || now_ns >= ended_report_ns_ + kDataDrainNs) {
      end(*std::exchange(ended_report_, std::nullopt), events);
      return INT64_MAX;
    }
    next = std::min(next, ended_report_ns_ + kDataDrainNs);
  }
  if (drop_at_ns_ != 0 && host_ != nullptr) {
    if (now_ns >= drop_at_ns_) {
      host_->close("its worker did not end after SIGKILL",
                   [&](WorkerLink&) -> LinkEvents& { return events; });
      return INT64_MAX;
    }
    next = std::min(next, drop_at_ns_);
  }
  return next;
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
  if (ended_) return;
  if (host_ == nullptr) {
    stopped_waiting_ = true;
    return;
  }
  capnp::MallocMessageBuilder message(16);
  message.initRoot<wire::ToWorker>().setStop(mode == StopMode::kKill ? 9 : 15);
  host_->queue(message);
  host_->flush();
  // A relay that cannot stop its worker is itself in trouble: the connection goes.
  if (mode == StopMode::kKill && drop_at_ns_ == 0) {
    drop_at_ns_ = monotonic_now_ns() + std::max<int64_t>(2'000'000'000, to_ns(limits_.kill_grace));
  }
}

void TcpLink::on_spawned(int pid, LinkEvents& events) {
  if (pid_ != 0 || pid <= 0) return;
  pid_ = pid;
  if (host_ != nullptr) name_ = absl::StrCat(slot_name_, " on ", host_->host_name(), " (pid ", pid, ")");
  if (attached_ && !data_closed_) read_data(events);
}

void TcpLink::on_pong(wire::Progress::Reader progress) {
  progress_ = read_progress(progress, monotonic_now_ns());
  resident_bytes_ = progress.getResidentBytes();
}

void TcpLink::on_ended(wire::Ended::Reader ended, LinkEvents& events) {
  progress_ = read_progress(ended.getProgress(), monotonic_now_ns());
  progress_.exact = true;  // read by its relay after it ended
  WorkerEnd end_of{ended.getHow(), ended.getClean()};
  if (ended.hasTimedOut() && ended.getTimedOut().size() > 0) {
    end_of.cause = absl::DeadlineExceededError(absl::StrCat(name_, ": ", ended.getTimedOut().cStr()));
  }
  // What it sent before it died comes first: wait for its data connection's end of file.
  if (attached_ && !data_closed_) {
    ended_report_ = std::move(end_of);
    ended_report_ns_ = monotonic_now_ns();
    return;
  }
  end(std::move(end_of), events);
}

void TcpLink::on_lost(const std::string& why, LinkEvents& events) {
  progress_.exact = false;
  host_ = nullptr;
  ended_report_.reset();
  end({absl::StrCat("was lost: ", why), false}, events);
}

void TcpLink::end_waiting(LinkEvents& events, absl::Status cause) {
  WorkerEnd end_of{absl::StrCat("got no worker host: ", cause.message()), false};
  end_of.cause = std::move(cause);
  end(std::move(end_of), events);
}

void TcpLink::end_stopped(LinkEvents& events) {
  end({"was stopped while it waited for a worker host", false}, events);
}

void TcpLink::end(WorkerEnd end_of, LinkEvents& events) {
  if (ended_) return;
  ended_ = true;
  close_data();
  if (host_ != nullptr) {
    host_->unbind(this);
    host_ = nullptr;
  }
  events.on_ended(std::move(end_of));
}

}  // namespace procpool::internal
