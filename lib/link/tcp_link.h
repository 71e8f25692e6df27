// TcpLink: the WorkerLink of a remote worker, and RemoteHost: the TCP connection to the relay on
// its host (relay.h) that carries it.
//
// A RemoteHost is one connected worker program (one `procpool::serve` process): it does the
// pool's side of the handshake (handshake.h), sends heartbeats and declares the host gone when
// nothing has come from it for heartbeat_timeout. A TcpLink is one worker process that relay
// forks for a slot: the pool asks for it (`spawn`), talks to it through the relay, and learns of
// its end from the relay (`ended`, with its exact last progress) or from the connection's loss
// (then its progress is what the last heartbeat said: `WorkerProgress::exact` is false). When a
// link ends its host is free for the slot's next worker: a task that kills its worker costs the
// pool no connection.
//
// Frames are read and written by the remote launcher's event loop (remote_launcher.h), which
// polls every host; a TcpLink itself has no descriptor to poll and cannot be borrowed.

#ifndef PROCPOOL_LIB_LINK_TCP_LINK_H_
#define PROCPOOL_LIB_LINK_TCP_LINK_H_

#include <poll.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/common/socket.h"
#include "lib/common/unique_fd.h"
#include "lib/link/remote_frames.h"
#include "lib/link/worker_link.h"
#include "lib/wire/frame_io.h"

namespace procpool::internal {

class TcpLink;

// What every host of one pool shares.
struct RemoteHostConfig {
  std::string token;
  std::string worker_type;
  RelayLimits limits;
  absl::Duration handshake_timeout = absl::Seconds(20);
};

class RemoteHost {
 public:
  enum class State { kHandshake, kIdle, kBusy, kClosed };
  RemoteHost(UniqueFd socket, std::string peer, const RemoteHostConfig& config);
  ~RemoteHost();

  State state() const { return state_; }
  const std::string& peer() const { return peer_; }           // "10.0.0.7:51234"
  const std::string& host_name() const { return host_name_; }  // from its hello
  // Why it closed (a refusal, a lost connection), once it has.
  const std::string& closed_reason() const { return closed_reason_; }
  bool refused() const { return refused_; }

  int fd() const { return socket_.get(); }
  short poll_events() const;
  // Reads and writes what poll() said is ready; reports to the bound link through `events_of`.
  void service(short revents, const std::function<LinkEvents&(WorkerLink&)>& events_of);
  // Handshake deadline, heartbeats; returns when it wants to be called again.
  int64_t check(int64_t now_ns, const std::function<LinkEvents&(WorkerLink&)>& events_of);

  // A free host takes `link`: it asks its relay to fork a worker for `slot`.
  void bind(TcpLink* link, int slot);
  // The link is done with this host (it ended, or is being destroyed).
  void unbind(TcpLink* link);
  void queue(std::unique_ptr<capnp::MessageBuilder> frame);
  void queue(capnp::MessageBuilder& message);
  void flush();
  bool has_unsent() const { return !writer_.empty(); }
  // Closes the connection; a bound link ends ("was lost: <why>").
  void close(const std::string& why, const std::function<LinkEvents&(WorkerLink&)>& events_of);

 private:
  void on_frame(kj::ArrayPtr<const capnp::word> words,
                const std::function<LinkEvents&(WorkerLink&)>& events_of);
  void handshake_frame(kj::ArrayPtr<const capnp::word> words);
  void refuse(const std::string& why);

  UniqueFd socket_;
  const std::string peer_;
  const RemoteHostConfig& config_;
  State state_ = State::kHandshake;
  FrameReader reader_;
  FrameWriter writer_;
  std::string host_name_;
  std::string worker_nonce_;
  std::string pool_nonce_;
  bool proved_ = false;  // the handshake got as far as the proof
  bool refused_ = false;
  std::string closed_reason_;
  int64_t handshake_deadline_ns_ = 0;
  int64_t last_received_ns_ = 0;
  int64_t last_ping_ns_ = 0;
  int64_t partial_since_ns_ = 0;
  TcpLink* link_ = nullptr;
};

class TcpLink final : public WorkerLink {
 public:
  // A link for `slot`, waiting for a host until `wait_until_ns` (its launcher then ends it).
  TcpLink(std::string slot_name, int slot, int64_t wait_until_ns);
  ~TcpLink() override;

  int slot() const { return slot_; }
  bool waiting() const { return host_ == nullptr && !ended_; }
  int64_t wait_until_ns() const { return wait_until_ns_; }
  // Called by the launcher: a host for this waiting link.
  void bind(RemoteHost* host);

  const std::string& name() const override { return name_; }
  int pid() const override { return pid_; }
  void send(std::unique_ptr<capnp::MessageBuilder> frame) override;
  void flush() override;
  bool has_unsent() const override;
  void add_pollfds(std::vector<pollfd>&, bool) override {}
  void service(const pollfd*, size_t, bool, LinkEvents&) override {}
  int64_t check(int64_t now_ns, LinkEvents& events) override;
  int channel_fd() const override { return -1; }
  void pump(short, LinkEvents&) override {}
  WorkerProgress progress() const override { return progress_; }
  size_t resident_bytes() const override { return resident_bytes_; }
  void open_claims(uint32_t, uint16_t, uint32_t) override {}  // its relay opens them
  void revoke(uint32_t slot, uint16_t tag, LinkEvents& events) override;
  void stop(StopMode mode) override;

  // From its host.
  void on_spawned(int pid);
  void on_pong(wire::Progress::Reader progress);
  void on_ended(wire::Ended::Reader ended, LinkEvents& events);
  void on_lost(const std::string& why, LinkEvents& events);
  // No host came in time: it ends, and `cause` is its start failure.
  void end_waiting(LinkEvents& events, absl::Status cause);
  // Called when the link is destroyed (the launcher forgets it).
  void on_destroy(std::function<void()> callback) { on_destroy_ = std::move(callback); }

 private:
  void end(WorkerEnd end, LinkEvents& events);

  const std::string slot_name_;
  const int slot_;
  std::string name_;
  RemoteHost* host_ = nullptr;
  int pid_ = 0;
  int64_t wait_until_ns_;
  int64_t drop_at_ns_ = 0;  // stopped by force and not ended by then: drop the connection
  bool ended_ = false;
  WorkerProgress progress_;
  size_t resident_bytes_ = 0;
  std::vector<std::unique_ptr<capnp::MessageBuilder>> unsent_;  // sent while waiting for a host
  std::function<void()> on_destroy_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_TCP_LINK_H_
