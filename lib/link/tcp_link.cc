#include "lib/link/tcp_link.h"

#include <algorithm>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/common/clock.h"
#include "lib/wire/output_lines.h"
#include "lib/link/handshake.h"

namespace procpool::internal {
namespace {

// The relay reports a worker's end over its control connection; what the worker sent before it
// comes over its data connection, which closes as it dies. Waited for at most this long.
constexpr int64_t kDataDrainNs = 2'000'000'000;

}  // namespace

TcpLink::TcpLink(std::string slot_name, int slot, int64_t wait_until_ns, RelayLimits limits)
    : slot_name_(std::move(slot_name)),
      slot_(slot),
      limits_(std::move(limits)),
      name_(slot_name_),
      wait_until_ns_(wait_until_ns),
      stream_(limits_.max_frame_bytes, limits_.frame_timeout) {}

TcpLink::~TcpLink() {
  if (host_ != nullptr) host_->unbind(this);
  if (on_destroy_) on_destroy_();
}

void TcpLink::bind(RemoteHost* host) {
  host_ = host;
  if (host == nullptr) return;
  name_ = absl::StrCat(slot_name_, " on ", host->host_name());
  host_name_ = host->host_name();
  placed_ns_ = monotonic_now_ns();
  data_id_ = make_nonce();
  session_secret_ = host->session_secret();
  host->bind(this, slot_, data_id_);
}

void TcpLink::attach(std::unique_ptr<TlsChannel> data, FrameReader reader, LinkEvents& events) {
  if (ended_ || attached_) return;  // a late or second connection: dropped with `data`
  attached_ = true;
  data_ = std::move(data);
  stream_ = FrameStream(std::move(reader), limits_.frame_timeout);
  if (host_ != nullptr && host_->frame_budget()) stream_.share_budget(host_->frame_budget());
  (void)set_nonblocking(data_->fd(), true);
  flush();  // what was sent before it attached
  // Frames that came with the attach (its READY) are buffered already: poll() will not say so.
  if (pid_ != 0) read_data(events);
}

void TcpLink::send(std::unique_ptr<capnp::MessageBuilder> frame) {
  if (ended_ || data_closed_) return;
  // Queued even before the data connection is attached: nothing is written until it is (flush),
  // and the writer is what release_borrowed copies from.
  writer_.push(std::move(frame));
}

void TcpLink::release_borrowed(const void* borrower) { writer_.release_borrowed(borrower); }

void TcpLink::flush() {
  if (!attached_ || data_closed_ || writer_.empty()) return;
  // A failure means the worker is gone: its relay reports it.
  if (!writer_.write_some(*data_).ok()) writer_.clear();
}

bool TcpLink::has_unsent() const { return !writer_.empty(); }

void TcpLink::add_pollfds(std::vector<pollfd>& fds, bool with_channel) {
  // Its frames wait for its pid (`spawned`, from its relay): a worker is never seen without it.
  polled_data_ = with_channel && attached_ && pid_ != 0 && !data_closed_ && !ended_;
  if (polled_data_) {
    fds.push_back({data_->fd(), static_cast<short>(POLLIN | (writer_.empty() ? 0 : POLLOUT)), 0});
  }
}

void TcpLink::service(const pollfd* polled, size_t count, bool with_channel, LinkEvents& events) {
  if (polled_data_ && count > 0 && polled[0].revents != 0 && with_channel) {
    pump(polled[0].revents, events);
  }
}

void TcpLink::pump(short revents, LinkEvents& events) {
  if (!attached_ || pid_ == 0 || data_closed_ || ended_) return;
  if ((revents & POLLOUT) && !writer_.write_some(*data_).ok()) writer_.clear();
  if (revents & (POLLIN | POLLHUP | POLLERR)) read_data(events);
}

void TcpLink::read_data(LinkEvents& events) {
  if (data_closed_) return;
  // Frames already buffered go first (on attach, those that came with it: poll() will not say
  // so); then what the socket has. Bounded: a flood from one worker must not starve the others.
  const FrameStream::ReadResult read =
      stream_.read(*data_, 16, [&](kj::ArrayPtr<const capnp::word> frame) {
        events.on_frame(frame);
        return !data_closed_;
      });
  if (data_closed_) return;
  if (read.broken && data_->record_failed()) {
    // Someone on the path, not the worker: its tasks are not to blame.
    events.on_corrupted_connection(
        absl::DataLossError(absl::StrCat(name_, ": its data connection broke: ", read.why.message())));
    close_data();
  } else if (read.broken) {
    events.on_broken_stream(absl::DataLossError(absl::StrCat(name_, " ", read.why.message())));
    close_data();
  }
  if (read.closed) {
    // The worker closed its end: it is gone or going; its relay says how.
    close_data();
    if (ended_report_) end(*std::exchange(ended_report_, std::nullopt), events);
  }
}

void TcpLink::close_data() {
  data_closed_ = true;
  data_.reset();
  writer_.clear();
}

int64_t TcpLink::check(int64_t now_ns, LinkEvents& events) {
  if (ended_) return INT64_MAX;
  int64_t next = INT64_MAX;
  if (!data_closed_) {
    if (const absl::Status late = stream_.check(now_ns, next); !late.ok()) {
      events.on_broken_stream(absl::DataLossError(absl::StrCat(name_, " ", late.message())));
      close_data();
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

void TcpLink::request_stop(uint64_t seq, uint32_t from, uint32_t to) {
  if (host_ == nullptr || ended_) return;
  capnp::MallocMessageBuilder message(32);
  auto stop = message.initRoot<wire::ToWorker>().initStopTasks();
  stop.setSeq(seq);
  stop.setFrom(from);
  stop.setTo(to);
  host_->queue(message);
  host_->flush();
}

void TcpLink::stop(StopMode mode) {
  if (ended_) return;
  if (host_ == nullptr) {
    stopped_waiting_ = true;
    if (on_stopped_waiting_) on_stopped_waiting_();
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

void TcpLink::on_output(wire::OutputLines::Reader output, LinkEvents& events) {
  if (ended_) return;
  // Read once: each read of the list counts against the frame's traversal limit, which a frame
  // full of lines nearly reaches (frame_io.cc).
  const capnp::List<capnp::Data>::Reader got = output.getLines();
  std::vector<std::string_view> lines;
  lines.reserve(got.size());
  for (capnp::Data::Reader line : got) {
    // The relay's bytes, passed on as the worker wrote them, in pieces no longer than a pool's own.
    const std::string_view bytes(reinterpret_cast<const char*>(line.begin()), line.size());
    for (size_t at = 0; at == 0 || at < bytes.size(); at += OutputLines::kMaxLineBytes) {
      lines.push_back(bytes.substr(at, OutputLines::kMaxLineBytes));
    }
  }
  // Where its relay read them: the worker's own stamps, so no more trusted than they (a wrong
  // place names another task of this worker, or none).
  OutputPlace place;
  if (output.getHasPlace()) place = {output.getBatchSeq(), output.getTaskIndex()};
  if (!lines.empty()) events.on_output(output.getStderr(), lines, place);
}

void TcpLink::on_pong(wire::Progress::Reader progress) {
  progress_ = read_progress(progress, monotonic_now_ns());
  resident_bytes_ = progress.getResidentBytes();
}

void TcpLink::on_ended(wire::Ended::Reader ended, LinkEvents& events) {
  progress_ = read_progress(ended.getProgress(), monotonic_now_ns());
  progress_.exact = true;  // read by its relay after it ended
  // How it ended is the relay's text: escaped before it reaches a status or a log.
  WorkerEnd end_of{peer_text(ended.getHow()), ended.getClean()};
  end_of.crash_stack = clean_crash_stack(
      std::string_view(ended.getCrashStack().cStr(), ended.getCrashStack().size()));
  if (ended.hasTimedOut() && ended.getTimedOut().size() > 0) {
    end_of.cause = absl::DeadlineExceededError(absl::StrCat(name_, ": ", peer_text(ended.getTimedOut())));
    end_of.timed_out_by_host = true;
  } else if (ended.hasMemoryExhausted() && ended.getMemoryExhausted().size() > 0) {
    end_of.cause =
        absl::ResourceExhaustedError(absl::StrCat(name_, ": ", peer_text(ended.getMemoryExhausted())));
  }
  // What it sent before it died comes first: wait for its data connection's end of file.
  if (attached_ && !data_closed_) {
    ended_report_ = std::move(end_of);
    ended_report_ns_ = monotonic_now_ns();
    return;
  }
  end(std::move(end_of), events);
}

void TcpLink::on_lost(const std::string& why, LinkEvents& events, bool corrupted) {
  progress_.exact = false;
  host_ = nullptr;
  ended_report_.reset();
  WorkerEnd end_of{absl::StrCat("was lost: ", why), false};
  if (corrupted) {
    end_of.cause = absl::DataLossError(absl::StrCat(name_, " ", end_of.how));
    end_of.corrupted = true;
  }
  end(std::move(end_of), events);
}

void TcpLink::on_draining(LinkEvents& events) {
  if (!ended_) events.on_host_leaving();
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
