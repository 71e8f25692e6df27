// TcpLink: the WorkerLink of a remote worker, served by a worker host (remote_host.h).
//
// A TcpLink is one worker process that a relay forks for a slot: the pool asks for it, over the
// host's control connection, with a fresh random id (`spawn`); the relay opens a data connection
// (TLS, as every one: tls_channel.h) that presents the id and a proof bound to that control
// session (`attach`, handshake.h), and the worker then speaks the same
// frames over it as a forked worker over its socketpair — so apply's fast path can borrow it, and
// frames never pass through the relay. The link ends when the relay reports the worker's end
// (`ended`, with its exact last progress) and the data connection has delivered everything before
// its end of file; or when the control connection is lost (then its progress is what the relay
// last said: `WorkerProgress::exact` is false). Its host is then free for the slot's next worker:
// a task that kills its worker costs the pool no connection.

#ifndef PROCPOOL_LIB_LINK_TCP_LINK_H_
#define PROCPOOL_LIB_LINK_TCP_LINK_H_

#include <poll.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/common/socket.h"
#include "lib/common/unique_fd.h"
#include "lib/link/remote_frames.h"
#include "lib/link/remote_host.h"
#include "lib/link/worker_link.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/frame_stream.h"
#include "lib/wire/tls_channel.h"
#include "lib/worker/worker_main.h"

namespace procpool::internal {

class TcpLink final : public WorkerLink {
 public:
  // A link for `slot`, waiting for a host until `wait_until_ns` (its launcher then ends it).
  TcpLink(std::string slot_name, int slot, int64_t wait_until_ns, RelayLimits limits);
  ~TcpLink() override;

  int slot() const { return slot_; }
  bool waiting() const { return host_ == nullptr && !ended_; }
  int64_t wait_until_ns() const { return wait_until_ns_; }
  // Called by the launcher: a host for this waiting link (it asks the relay for a worker, with
  // `placement`: who it is, what it starts with).
  void bind(RemoteHost* host);
  void set_placement(WorkerPlacement placement) { placement_ = std::move(placement); }
  const WorkerPlacement& placement() const { return placement_; }
  // The spawn's id the worker's data connection will present (set by bind), and the key of the
  // control session it was asked of, which that connection must prove (handshake.h).
  const std::string& data_id() const { return data_id_; }
  const std::string& session_secret() const { return session_secret_; }
  // Called by the launcher: the worker's data connection, with what was read from it so far.
  void attach(std::unique_ptr<TlsChannel> data, FrameReader reader, LinkEvents& events);

  const std::string& name() const override { return name_; }
  int pid() const override { return pid_; }
  std::string host_name() const override { return host_name_; }
  void send(std::unique_ptr<capnp::MessageBuilder> frame) override;
  void flush() override;
  bool has_unsent() const override;
  // Frames over a caller's memory (the word path's jobs sent in place) wait in the writer like
  // any other until the socket takes them; release_borrowed copies what is left of them.
  bool can_borrow() const override { return true; }
  void release_borrowed(const void* borrower) override;
  void add_pollfds(std::vector<pollfd>& fds, bool with_channel) override;
  void service(const pollfd* polled, size_t count, bool with_channel, LinkEvents& events) override;
  int64_t check(int64_t now_ns, LinkEvents& events) override;
  int channel_fd() const override { return data_ ? data_->fd() : -1; }
  void pump(short revents, LinkEvents& events) override;
  WorkerProgress progress() const override { return progress_; }
  size_t resident_bytes() const override { return resident_bytes_; }
  std::string host() const override { return host_ != nullptr ? host_->host_name() : ""; }
  void open_claims(uint32_t, uint16_t, uint32_t) override {}  // the worker's page is its relay's
  void revoke(uint32_t slot, uint16_t tag, LinkEvents& events) override;
  // Sent to the relay, which writes the worker's page (a round trip later than locally).
  void request_stop(uint64_t seq, uint32_t from, uint32_t to) override;
  void stop(StopMode mode) override;
  int64_t placed_ns() const override { return placed_ns_; }

  // From its host.
  void on_spawned(int pid, LinkEvents& events);
  void on_pong(wire::Progress::Reader progress);
  void on_ended(wire::Ended::Reader ended, LinkEvents& events);
  // Lines of the worker's output its relay read (RelayLimits::forward_output).
  void on_output(wire::OutputLines::Reader output, LinkEvents& events);
  // Its host's control connection is gone; `corrupted`: it failed TLS record authentication
  // (WorkerEnd::corrupted: the tasks lost with the worker fail kDataLoss).
  void on_lost(const std::string& why, LinkEvents& events, bool corrupted = false);
  // Its host is leaving (it got SIGTERM): LinkEvents::on_host_leaving.
  void on_draining(LinkEvents& events);
  // No host came in time: it ends, and `cause` is its start failure.
  void end_waiting(LinkEvents& events, absl::Status cause);
  // stop() before any host took it: there is no worker to stop, and no host may take it now; its
  // launcher ends it at once (end_stopped), rather than at wait_until_ns.
  bool stopped_waiting() const { return stopped_waiting_ && waiting(); }
  void end_stopped(LinkEvents& events);
  // Called when the link is destroyed (the launcher forgets it).
  void on_destroy(std::function<void()> callback) { on_destroy_ = std::move(callback); }
  // Called when it is stopped while it waits for a host (its launcher then ends it).
  void on_stopped_waiting(std::function<void()> callback) {
    on_stopped_waiting_ = std::move(callback);
  }

 private:
  void read_data(LinkEvents& events);
  void close_data();
  void end(WorkerEnd end, LinkEvents& events);

  const std::string slot_name_;
  const int slot_;
  WorkerPlacement placement_;
  const RelayLimits limits_;
  std::string name_;
  RemoteHost* host_ = nullptr;
  std::string host_name_;  // its host's, kept after the host is gone (for log events)
  int pid_ = 0;
  int64_t wait_until_ns_;
  int64_t placed_ns_ = INT64_MAX;  // when a host took it
  std::string data_id_;
  std::string session_secret_;
  // The worker's data connection: frames both ways, as over a forked worker's socketpair.
  std::unique_ptr<TlsChannel> data_;
  FrameStream stream_;  // the data connection's frames, with its partial-frame clock
  FrameWriter writer_;
  bool attached_ = false;
  bool data_closed_ = false;     // end of file (or broken): everything it sent was delivered
  bool polled_data_ = false;     // what add_pollfds added, for service()
  // The relay reported the worker's end; it is delivered once the data connection has closed.
  std::optional<WorkerEnd> ended_report_;
  int64_t ended_report_ns_ = 0;
  int64_t drop_at_ns_ = 0;  // stopped by force and not ended by then: drop the connection
  bool ended_ = false;
  bool stopped_waiting_ = false;
  // What its relay last said (inexact: tasks after it may have started), until the relay reads
  // it after the worker ended. Inexact from the start: before the first report the worker may
  // already be running a task.
  WorkerProgress progress_{.exact = false};
  size_t resident_bytes_ = 0;
  std::function<void()> on_destroy_;
  std::function<void()> on_stopped_waiting_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_TCP_LINK_H_
