// RemoteHost: a TCP connection from a worker host, as the pool sees it — the control connection
// of a relay (relay.h), or, briefly, a data connection until it is handed to the TcpLink it
// belongs to (tcp_link.h).
//
// A relay's control connection carries the handshake (handshake.h), heartbeats, the pool's
// requests (spawn, stop, revoke) and the relay's reports (progress, revocations, a worker's end).
// It is declared gone when nothing has come over it for heartbeat_timeout, or when a frame it
// began is not finished within frame_timeout. A free host takes one waiting TcpLink at a time. A
// host whose relay says it is draining (its host got SIGTERM) takes none again: its link is told
// (TcpLink::on_draining), and the connection closes as soon as no link is bound to it.
//
// Every connection is a TlsChannel (tls_channel.h): its TLS handshake comes first (keyed by the
// token, or certificates), then the frames of the handshake (handshake.h) inside it. A peer that
// fails the TLS handshake is refused without a frame (it could not read one).

#ifndef PROCPOOL_LIB_LINK_REMOTE_HOST_H_
#define PROCPOOL_LIB_LINK_REMOTE_HOST_H_

#include <poll.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "capnp/message.h"
#include "lib/common/poll_set.h"
#include "lib/common/unique_fd.h"
#include "lib/link/remote_frames.h"
#include "lib/link/worker_link.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/frame_stream.h"
#include "lib/wire/tls_channel.h"

namespace procpool::internal {

class TcpLink;

// What every host of one pool shares.
struct RemoteHostConfig {
  std::string token;
  std::string worker_type;
  RelayLimits limits;
  absl::Duration handshake_timeout = absl::Seconds(5);
  // Every connection's TLS (the pool's side), or null: plaintext (RemoteOptions::encrypt false).
  std::shared_ptr<TlsContext> tls;
  // Bytes in unfinished frames, over every authenticated connection of the pool (null: unbounded).
  std::shared_ptr<FrameBudget> frame_budget;
};

using EventsOf = std::function<LinkEvents&(WorkerLink&)>;

// Whether nothing the peer of connection `fd` sent waits to be read (peeked: nothing is taken).
bool sent_nothing(int fd);

class RemoteHost {
 public:
  // kData: the connection presented a spawn's id; the launcher hands it to that link.
  enum class State { kHandshake, kIdle, kBusy, kData, kClosed };
  // `accepted_ns`: when the connection was accepted; its handshake must end handshake_timeout
  // after that (the time it waited for its turn counts).
  RemoteHost(UniqueFd socket, std::string peer, const RemoteHostConfig& config, int64_t accepted_ns);
  ~RemoteHost();

  State state() const { return state_; }
  const std::string& peer() const { return peer_; }           // "10.0.0.7:51234"
  const std::string& host_name() const { return host_name_; }  // from its credentials, escaped
  // PROCPOOL_LAUNCH_ID from its hello: which of the pool's launches it says it is ("" if none).
  const std::string& launch_id() const { return launch_id_; }
  // Why it closed (a refusal, a lost connection), once it has.
  const std::string& closed_reason() const { return closed_reason_; }
  bool refused() const { return refused_; }
  // In its handshake, and nothing has come from it yet (nothing read, nothing waiting): a
  // connection a flood may have opened, which admission control drops first.
  bool silent() const;
  int64_t accepted_ns() const { return accepted_ns_; }
  int64_t handshake_deadline_ns() const { return handshake_deadline_ns_; }
  const std::shared_ptr<FrameBudget>& frame_budget() const { return config_.frame_budget; }

  int fd() const { return channel_ ? channel_->fd() : -1; }
  short poll_events() const;
  // Its connection in the event loop's set (the launcher's watch, with the key it chose): kept
  // waiting for poll_events() as they change, and reset before the connection closes or goes to
  // a link (take_channel).
  void set_watch(PollSet::Watch watch);
  uint64_t watch_key() const { return watch_key_; }  // 0: never watched
  // Reads and writes what poll() said is ready; reports to the bound link through `events_of`.
  void service(short revents, const EventsOf& events_of);
  // Handshake deadline, heartbeats; returns when it wants to be called again.
  int64_t check(int64_t now_ns, const EventsOf& events_of);

  // A free host takes `link`: it asks its relay to fork a worker for `slot`, whose data
  // connection will present `data_id`.
  void bind(TcpLink* link, int slot, const std::string& data_id);
  // The link is done with this host (it ended, or is being destroyed).
  void unbind(TcpLink* link);
  void queue(capnp::MessageBuilder& message);
  void flush();
  // Closes the connection; a bound link ends ("was lost: <why>"), its tasks failing kDataLoss
  // when `corrupted` (the connection failed TLS record authentication: TcpLink::on_lost).
  void close(const std::string& why, const EventsOf& events_of, bool corrupted = false);
  // Refuses the peer (a frame saying why) and closes.
  void refuse(const std::string& why);

  // Welcomed: the key a data connection proves to show it comes from this control session
  // (handshake.h: HMAC over the token, both nonces and the session's TLS exporter).
  const std::string& session_secret() const { return session_secret_; }

  // kData: what the connection presented, and the connection itself (with what was read).
  const std::string& data_id() const { return data_id_; }
  const std::string& data_proof() const { return data_proof_; }
  // The data connection's own TLS exporter, which its proof covers ("" in plaintext).
  const std::string& data_exporter() const { return data_exporter_; }
  std::unique_ptr<TlsChannel> take_channel();
  FrameReader take_reader();

 private:
  void service_events(short revents, const EventsOf& events_of);
  int64_t check_deadlines(int64_t now_ns, const EventsOf& events_of);
  void on_frame(kj::ArrayPtr<const capnp::word> words, const EventsOf& events_of);
  void handshake_frame(kj::ArrayPtr<const capnp::word> words);
  // The watch waits for what poll_events() says now.
  void update_watch();
  // Closes the connection: out of the loop's set first.
  void drop_channel();

  std::unique_ptr<TlsChannel> channel_;  // null once closed
  PollSet::Watch watch_;  // channel_'s, while it has one (after it: goes first)
  uint64_t watch_key_ = 0;
  bool handshake_wants_write_ = false;    // its TLS handshake waits for room to write
  bool heard_ = false;  // bytes of its TLS handshake came (TLS took them: silent() cannot peek them)
  const std::string peer_;
  const RemoteHostConfig& config_;
  State state_ = State::kHandshake;
  FrameStream stream_;  // with its partial-frame clock; the handshake's small limit at first
  FrameWriter writer_;
  std::string host_name_;
  std::string launch_id_;
  std::string worker_nonce_;
  std::string pool_nonce_;
  std::string data_id_;
  std::string data_proof_;
  std::string data_exporter_;
  std::string session_secret_;
  bool refused_ = false;
  bool draining_ = false;  // its relay is leaving: closed once no link is bound
  std::string closed_reason_;
  int64_t accepted_ns_ = 0;
  int64_t handshake_deadline_ns_ = 0;
  int64_t last_received_ns_ = 0;
  int64_t last_ping_ns_ = 0;
  TcpLink* link_ = nullptr;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_REMOTE_HOST_H_
