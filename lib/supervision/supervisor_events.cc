// Supervisor: what reaches it from its workers' links (frames, broken streams, revocations) and
// from the scheduler (its ports), apply's borrowed workers, and stats.

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "capnp/serialize.h"
#include "lib/common/clock.h"
#include "lib/supervision/slot.h"
#include "lib/supervision/supervisor.h"
#include "lib/wire/frame_io.h"
#include "procpool/codec.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {
namespace {

// The most a worker's own count (tasks done, resident bytes) shows in stats: 4096 workers of a
// host summed stay below INT64_MAX.
constexpr int64_t kMaxReportedCount = INT64_MAX / 8192;

}  // namespace

void Supervisor::Events::on_revoked(uint32_t slot, uint16_t tag, uint32_t claimed) {
  owner_.scheduler_.on_revoked(slot_.index, slot, tag, claimed);
}

const std::string& Supervisor::Port::name() const { return slot_.display(); }
void Supervisor::Port::send(std::unique_ptr<capnp::MessageBuilder> frame) {
  if (!slot_.link) return;
  slot_.sent_since_look = true;  // idle_timeout's clock starts again
  // The segment table's sizes, not the bytes: a handful of additions per frame.
  owner_.bytes_sent_ += static_cast<int64_t>(capnp::computeSerializedSizeInWords(*frame) *
                                             sizeof(capnp::word));
  owner_.touch(slot_);  // it may wait to write now
  slot_.link->send(std::move(frame));
}
void Supervisor::Port::flush() {
  if (!slot_.link) return;
  owner_.touch(slot_);
  slot_.link->flush();
}
SharedRegion* Supervisor::Port::shared_region() {
  return slot_.link ? slot_.link->shared_region() : nullptr;
}
bool Supervisor::Port::can_borrow() const { return slot_.link && slot_.link->can_borrow(); }
WorkerProgress Supervisor::Port::progress() const {
  return slot_.link ? slot_.link->progress() : WorkerProgress();
}
void Supervisor::Port::open_claims(uint32_t slot, uint16_t tag, uint32_t count) {
  if (slot_.link) slot_.link->open_claims(slot, tag, count);
}
void Supervisor::Port::revoke(uint32_t slot, uint16_t tag) {
  if (!slot_.link) return;
  owner_.touch(slot_);  // a remote link asks and waits for the answer
  slot_.link->revoke(slot, tag, slot_.events);
}
void Supervisor::Port::request_stop(uint64_t seq, uint32_t from, uint32_t to) {
  if (slot_.link) slot_.link->request_stop(seq, from, to);
}
void Supervisor::Port::stop(absl::Status reason) {
  owner_.stop(slot_, std::move(reason), StopMode::kTerminate);
}

void Supervisor::on_frame(Slot& slot, kj::ArrayPtr<const capnp::word> words, bool recovered) {
  // A recovered frame may repeat one counted already.
  if (!recovered) bytes_received_ += static_cast<int64_t>(words.size() * sizeof(capnp::word));
  // The one place a worker's bytes are parsed: whatever Cap'n Proto throws becomes kDataLoss.
  const absl::Status parsed = guarded("sent a malformed frame", [&]() -> absl::Status {
    capnp::FlatArrayMessageReader message(words, frame_reader_options(config_.max_frame_bytes));
    auto frame = message.getRoot<wire::FromWorker>();
    switch (frame.which()) {
      case wire::FromWorker::READY:
        if (slot.state != State::kStarting) break;
        slot.state = State::kReady;
        slot.last_active_ns = monotonic_now_ns();
        consecutive_start_failures_ = 0;
        last_start_failure_ = absl::OkStatus();
        scheduler_.attach(slot.index, &slot.port);
        break;
      case wire::FromWorker::ENTER_FAILED: {
        // Said instead of READY (also after a shutdown sent while it started); a worker that was
        // ready cannot fail to start, and is not taken for one that did (calls would fail).
        if (slot.state != State::kStarting && slot.state != State::kShutdownSent) break;
        absl::Status failure = status_from_wire(frame.getEnterFailed());
        if (failure.ok()) failure = absl::UnknownError("enter() failed without a status");
        record_start_failure(slot,
                             absl::Status(failure.code(), absl::StrCat(slot.display(), " failed enter(): ",
                                                                       failure.message())),
                             monotonic_now_ns());
        break;
      }
      case wire::FromWorker::RESULTS:
        if (recovered) {
          // The worker is gone: only results not seen yet count, and nothing is blamed.
          if (slot.state == State::kReady || slot.state == State::kDraining ||
              slot.state == State::kShutdownSent) {
            (void)scheduler_.on_results(slot.index, frame.getResults(), /*recovered=*/true);
          }
          break;
        }
        if (absl::Status ok = scheduler_.on_results(slot.index, frame.getResults()); !ok.ok()) {
          on_broken_stream(slot, ok);
        }
        break;
      case wire::FromWorker::EXITED:
        slot.exit_hook_status = status_from_wire(frame.getExited());
        break;
      case wire::FromWorker::LOG: {
        // procpool::log in the worker: in its stream, so before the results that follow it.
        auto record = frame.getLog();
        LogEvent event;
        const uint8_t severity = record.getSeverity();
        event.severity = severity == 2   ? LogSeverity::kError
                         : severity == 1 ? LogSeverity::kWarning
                                         : LogSeverity::kInfo;
        event.source = LogSource::kWorker;
        if (record.getRunning()) {
          event.task = scheduler_.task_number(slot.index, record.getBatchSeq(), record.getTaskIndex());
        }
        const capnp::Text::Reader message = record.getMessage();
        event.message.assign(message.begin(), message.size());
        log(slot, std::move(event));
        break;
      }
      default:
        // The union also carries what a remote host says to a pool (its link reads those); from
        // a worker's stream they change nothing.
        break;
    }
    return absl::OkStatus();
  });
  if (!parsed.ok() && !recovered) {
    on_broken_stream(slot, absl::DataLossError(absl::StrCat(slot.display(), " ", parsed.message())));
  }
}

void Supervisor::on_broken_stream(Slot& slot, absl::Status why) {
  if (!slot.link || slot.stop_reason) return;
  // Only the task running when the stream broke, or between tasks the one that just finished
  // (the bad bytes came with its result or after it), is charged with it. A link that learns of
  // progress late (a remote worker) is asked again when the worker has ended: it is stopped at
  // once, so the task it ran then is the one it ran now.
  const WorkerProgress progress = slot.link->progress();
  slot.blamed_failure = why;
  if (!progress.exact) {
    slot.blame_at_end = true;
  } else if (progress.batch_seq != ControlPage::kNoBatch) {
    slot.blamed = std::make_pair(progress.batch_seq, progress.task_index);
  }
  log(slot, LogSeverity::kError, std::string(why.message()));
  stop(slot, absl::AbortedError(absl::StrCat(slot.display(), " was stopped after its stream broke (",
                                             why.message(), ")")),
       StopMode::kKill);
}

void Supervisor::on_corrupted_connection(Slot& slot, absl::Status why) {
  if (!slot.link || slot.stop_reason) return;
  slot.corrupted = true;
  log(slot, LogSeverity::kError, std::string(why.message()));
  stop(slot, std::move(why), StopMode::kKill);
}

WorkerLink* Supervisor::borrow(int slot) {
  // Its channel leaves the pool thread's set at that thread's next wake (until then the thread
  // may wake for it, and leaves it alone: service()'s with_channel).
  touch(*slots_[slot]);
  slots_[slot]->borrowed = true;
  return slots_[slot]->link.get();
}

void Supervisor::give_back(int slot) {
  touch(*slots_[slot]);
  slots_[slot]->borrowed = false;
}

void Supervisor::pump_borrowed(int slot, short revents) {
  Slot& s = *slots_[slot];
  touch(s);
  if (s.link) s.link->pump(revents, s.events);
}

void Supervisor::release_borrowed(const void* borrower) {
  for (auto& slot : slots_) {
    if (slot->link) slot->link->release_borrowed(borrower);
  }
  for (auto& link : ended_links_) link->release_borrowed(borrower);
}

uint64_t Supervisor::generation(int slot) const { return slots_[slot]->generation; }

WorkerLink* Supervisor::link(int slot) const { return slots_[slot]->link.get(); }

void Supervisor::fill_stats(PoolStats& stats) const {
  stats.workers_restarted = workers_restarted_;
  stats.bytes_sent = bytes_sent_;
  stats.bytes_received = bytes_received_;
  for (const auto& slot : slots_) {
    WorkerStats worker;
    worker.slot = slot->index;
    worker.pid = slot->link ? slot->link->pid() : 0;
    if (!slot->link) {
      worker.state = WorkerState::kDead;
    } else if (slot->state == State::kShutdownSent || slot->stop_reason) {
      worker.state = WorkerState::kExiting;
    } else if (slot->state == State::kStarting) {
      worker.state = WorkerState::kStarting;
    } else if (scheduler_.idle(slot->index)) {
      worker.state = WorkerState::kIdle;
    } else {
      worker.state = WorkerState::kBusy;
    }
    if (slot->link) {
      // Counts a worker gives of itself (its control page, or a remote host's report): never
      // below zero, nor so large that the per-host sums below could overflow.
      const WorkerProgress progress = slot->link->progress();
      worker.tasks_done = std::clamp<int64_t>(progress.tasks_done, 0, kMaxReportedCount);
      worker.time_busy = absl::Nanoseconds(std::max<int64_t>(progress.busy_ns, 0));
      worker.current_task = scheduler_.current_task(slot->index);
      worker.host = slot->link->host();
      worker.resident_bytes = static_cast<int64_t>(
          std::min<size_t>(slot->link->resident_bytes(), kMaxReportedCount));
    }
    worker.restarts = slot->generation > 1 ? static_cast<int64_t>(slot->generation - 1) : 0;
    worker.last_exit = slot->last_exit;
    if (worker.current_task) ++stats.tasks_running;
    // The pool's size is its slots not retired; a retired one still finishing its task counts
    // only in tasks_running.
    if (slot->retired) continue;
    stats.workers.push_back(std::move(worker));
  }
  // The per-host breakdown, hosts in order of their first slot (a pool has a handful of hosts).
  for (const WorkerStats& worker : stats.workers) {
    auto host = std::find_if(stats.hosts.begin(), stats.hosts.end(),
                             [&](const HostStats& h) { return h.host == worker.host; });
    if (host == stats.hosts.end()) host = stats.hosts.insert(host, HostStats{.host = worker.host});
    ++host->workers;
    if (worker.state == WorkerState::kBusy) ++host->busy;
    host->tasks_done += worker.tasks_done;
    host->resident_bytes += worker.resident_bytes;
    host->restarts += worker.restarts;
  }
}

}  // namespace procpool::internal
