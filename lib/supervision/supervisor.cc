#include "lib/supervision/supervisor.h"
#include "lib/supervision/slot.h"

#include <algorithm>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/common/clock.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/internal/reworded.h"
#include "procpool/internal/worker_body.h"
#include "procpool/logging.h"

namespace procpool::internal {
namespace {

// A worker's resident memory is read at most this often (a /proc read).
constexpr int64_t kMemoryCheckIntervalNs = 50'000'000;
// Every slot is checked (and its link asked what it waits for) at least this often, touched or
// not: what changes without an event (a worker writing its control page) is seen within it, as
// when every wake of the loop (at least one a second) checked every slot.
constexpr int64_t kSlotRecheckNs = 1'000'000'000;

}  // namespace
Supervisor::Supervisor(Config config, Launcher& launcher, Scheduler& scheduler,
                       PollSet& poll_set)
    : config_(std::move(config)), launcher_(launcher), scheduler_(scheduler),
      target_(config_.workers), poll_set_(poll_set) {
  launcher_.watch_with(poll_set_, kLauncherGroup);
  for (int i = 0; i < config_.workers; ++i) slots_.push_back(std::make_unique<Slot>(*this, i));
  check_at_.assign(slots_.size(), INT64_MIN);
  for (auto& slot : slots_) touch(*slot);
}

Supervisor::~Supervisor() = default;

std::string Supervisor::process_name(const Slot& slot) const {
  return absl::StrCat(config_.process_name_prefix, "-w", slot.index).substr(0, 15);
}

void Supervisor::log(const Slot& slot, LogSeverity severity, const std::string& message) const {
  LogEvent event;
  event.severity = severity;
  event.message = message;
  log(slot, std::move(event));
}

void Supervisor::log(const Slot& slot, LogEvent event) const {
  if (!config_.log) return;
  identify(slot, event);
  config_.log(std::move(event));
}

void Supervisor::identify(const Slot& slot, LogEvent& event) const {
  event.process = process_name(slot);
  event.pid = slot.link ? slot.link->pid() : 0;
  event.worker = slot.index;
  if (slot.link) {
    event.host = slot.link->host_name();
  } else {
    event.host.clear();
  }
}

void Supervisor::touch(Slot& slot) {
  slot.unsynced = true;
  slot.unchecked = true;
  if (slot.in_touched) return;
  slot.in_touched = true;
  touched_.push_back(slot.index);
}

void Supervisor::touch_all() {
  for (auto& slot : slots_) touch(*slot);
}

LinkEvents& Supervisor::events_of(WorkerLink& link) {
  for (auto& slot : slots_) {
    if (slot->link.get() == &link) {
      touch(*slot);  // the launcher is about to tell it something
      return slot->events;
    }
  }
  // A launcher reports only on links it made for us, which are in a slot until they end.
  return slots_.front()->events;
}

void Supervisor::on_capacity() {
  const int64_t now = monotonic_now_ns();
  // Only slots that could not get a worker at all: a worker that failed to start waits out its
  // delay whatever else arrives.
  for (auto& slot : slots_) {
    if (slot->state == State::kEmpty && slot->no_capacity && !slot->retired &&
        slot->next_start_ns != INT64_MAX) {
      slot->next_start_ns = std::min(slot->next_start_ns, now);
      touch(*slot);
    }
  }
}

bool Supervisor::wanted() const {
  return !terminating_ && !join_deadline_passed_ && (!joining_ || scheduler_.work_outstanding());
}

void Supervisor::start_due(int64_t now_ns) {
  for (auto& slot : slots_) {
    if (slot->retired || slot->state != State::kEmpty || now_ns < slot->next_start_ns) continue;
    // Recycled workers are replaced even at join when work is left; others only when wanted.
    if (!wanted()) continue;
    launch(*slot, now_ns);
  }
  fail_queued_if_unavailable();
  announce_waiting_places();
}

void Supervisor::launch(Slot& slot, int64_t now_ns) {
  touch(slot);
  absl::StatusOr<std::unique_ptr<WorkerLink>> link = launcher_.launch(slot.index, slot.name);
  slot.no_capacity = !link.ok();
  slot.waits_for_host = false;
  if (!link.ok()) {
    // What the launcher marked it with (is_waiting_for_host) goes with it.
    record_start_failure(
        slot, reworded(link.status(), absl::StrCat(slot.name, ": ", link.status().message())),
        now_ns);
    return;
  }
  if (slot.generation > 0) ++workers_restarted_;
  // Everything of the process before it goes with it: a fresh state, then what is known now.
  ProcessState fresh;
  fresh.link = *std::move(link);
  fresh.started_ns = now_ns;
  fresh.last_memory_check_ns = now_ns;
  slot.process() = std::move(fresh);
  ++slot.generation;
  slot.state = State::kStarting;
  log(slot, LogSeverity::kInfo, "started");
}

void Supervisor::record_start_failure(Slot& slot, absl::Status failure, int64_t now_ns) {
  touch(slot);
  slot.start_failed = true;
  ++consecutive_start_failures_;
  last_start_failure_ = failure;
  // respawn_delay, doubled per consecutive failure, up to respawn_max_delay.
  absl::Duration delay = config_.respawn_delay;
  for (int i = 1; i < consecutive_start_failures_ && delay < config_.respawn_max_delay; ++i) {
    delay *= 2;
  }
  delay = std::min(delay, config_.respawn_max_delay);
  slot.next_start_ns = now_ns + to_ns(delay);
  slot.waits_for_host = is_waiting_for_host(failure);
  if (!slot.waits_for_host) {
    log(slot, LogSeverity::kError,
        absl::StrCat(failure.message(), "; next start in ", absl::FormatDuration(delay)));
  }
  fail_queued_if_unavailable();
}

void Supervisor::announce_waiting_places() {
  int waiting = 0;
  for (const auto& slot : slots_) {
    waiting += slot->waits_for_host && slot->state == State::kEmpty && !slot->retired &&
               !slot->parked;
  }
  if (waiting > waiting_places_announced_ && config_.log) {
    LogEvent event;
    event.severity = LogSeverity::kWarning;
    event.message = absl::StrCat(
        waiting, " of ", target_, " worker places wait for a worker host (",
        last_start_failure_.message(),
        "): hosts may dial in at any time, each taking a waiting place; the pool works on "
        "with those it has");
    config_.log(std::move(event));
  }
  waiting_places_announced_ = waiting;
}

absl::Status Supervisor::availability() const {
  if (last_start_failure_.ok()) return absl::OkStatus();
  for (const auto& slot : slots_) {
    if (slot->state != State::kEmpty && !slot->start_failed && !slot->stop_reason &&
        !slot->retired) {
      return absl::OkStatus();
    }
  }
  return last_start_failure_;
}

void Supervisor::fail_queued_if_unavailable() {
  if (absl::Status available = availability(); !available.ok()) scheduler_.cancel_all(available);
}

bool Supervisor::any_alive() const {
  for (const auto& slot : slots_) {
    if (slot->link) return true;
  }
  return false;
}

void Supervisor::stop(Slot& slot, absl::Status reason, StopMode mode) {
  if (!slot.link) return;
  touch(slot);
  scheduler_.stop_accepting(slot.index);
  if (!slot.stop_reason) {
    slot.stop_reason = std::move(reason);
    // A deliberate stop (terminate) is not news; anything else is.
    const bool deliberate = slot.stop_reason->code() == absl::StatusCode::kCancelled;
    log(slot, deliberate ? LogSeverity::kInfo : LogSeverity::kWarning,
        absl::StrCat("stopping: ", slot.stop_reason->message()));
  }
  slot.stop_sequence.stop(*slot.link, mode, config_.kill_grace, monotonic_now_ns());
}

void Supervisor::send_shutdown(Slot& slot) {
  touch(slot);
  auto message = std::make_unique<capnp::MallocMessageBuilder>(16);
  message->initRoot<wire::ToWorker>().setShutdown();
  slot.link->send(std::move(message));
  slot.link->flush();
  slot.state = State::kShutdownSent;
  scheduler_.stop_accepting(slot.index);
  // join() bounds the exit() of those it tells to leave by its deadline; the others get as long.
  if (!joining_ && config_.join_timeout != absl::InfiniteDuration()) {
    slot.leave_by_ns = monotonic_now_ns() + to_ns(config_.join_timeout);
  }
}

void Supervisor::on_ended(Slot& slot, WorkerEnd end) {
  const int64_t now = monotonic_now_ns();
  touch(slot);
  if (end.cause && !slot.stop_reason) {
    slot.stop_reason = *end.cause;
    slot.corrupted = end.corrupted;
    if (end.timed_out_by_host) {
      // The task its host read running as it stopped it.
      const WorkerProgress last = slot.link->progress();
      std::optional<absl::Status> failure;
      if (last.running) {
        failure = scheduler_.host_timeout_failure(slot.index, last.batch_seq, last.task_index,
                                                  slot.display());
      }
      if (failure) slot.stop_reason = *std::move(failure);
    }
  }
  const State state = slot.state;
  const bool expected = state == State::kShutdownSent && end.clean && !slot.stop_reason;
  const std::string how = absl::StrCat(slot.display(), " ", end.how);
  slot.last_exit = end.how;
  // Ended on purpose: by terminate(), or, still waiting for a worker host, because the pool no
  // longer needed it (shutdown_if_due). Only those stops are kCancelled.
  const bool deliberate = terminating_ || (slot.stop_reason &&
                                           slot.stop_reason->code() == absl::StatusCode::kCancelled);
  // A place whose wait for a host to dial in ended waits on (announce_waiting_places).
  const bool waits_for_host = end.cause && is_waiting_for_host(*end.cause);
  log(slot, expected || deliberate || waits_for_host ? LogSeverity::kInfo : LogSeverity::kWarning,
      how);
  if (!end.crash_stack.empty()) {
    // The stack it recorded as it crashed: in one error event, and on its task's status below.
    LogEvent crash;
    crash.severity = LogSeverity::kError;
    crash.task = scheduler_.current_task(slot.index);
    crash.message = absl::StrCat(how, "; its stack:\n", end.crash_stack);
    log(slot, std::move(crash));
  }

  // join() reports what went wrong with a worker's exit().
  if (!slot.exit_hook_status.ok()) {
    join_problems_.push_back(
        absl::StrCat(slot.display(), ": exit() failed: ", slot.exit_hook_status.message()));
    if (join_code_ == absl::StatusCode::kOk) join_code_ = slot.exit_hook_status.code();
  }
  if (joining_ && !terminating_) {
    if (join_deadline_passed_ && slot.stop_reason &&
        slot.stop_reason->code() == absl::StatusCode::kDeadlineExceeded) {
      join_problems_.push_back(absl::StrCat(how, " after join_timeout (",
                                            absl::FormatDuration(config_.join_timeout), ") passed"));
      join_code_ = absl::StatusCode::kDeadlineExceeded;
    } else if (state == State::kShutdownSent && !end.clean && !slot.stop_reason &&
               !slot.start_failed) {
      // (One that reported a failed start, and was told to leave as it exited, never ran exit():
      // its failure was the calls' already.)
      join_problems_.push_back(absl::StrCat(how, " during exit()"));
      if (join_code_ == absl::StatusCode::kOk) join_code_ = absl::StatusCode::kAborted;
    }
  }

  // A worker terminate() or a resize() stopped before it was ready did not fail to start: the
  // pool stopped it.
  if (state == State::kStarting && !slot.start_failed && !deliberate && !slot.retired) {
    record_start_failure(
        slot, end.cause.value_or(absl::AbortedError(absl::StrCat(how, " before it was ready"))), now);
  }
  if (state == State::kReady || state == State::kDraining || state == State::kShutdownSent) {
    LostWorker lost;
    // Stopped by the pool: why it was stopped says more than the signal the pool sent.
    lost.ended = slot.stop_reason ? std::string(slot.stop_reason->message()) : how;
    lost.running_failure = slot.stop_reason.value_or(
        absl::AbortedError(absl::StrCat(how, " while running this task")));
    if (!end.crash_stack.empty()) {
      lost.running_failure.SetPayload(kBacktracePayloadUrl, absl::Cord(end.crash_stack));
    }
    lost.last = slot.link->progress();
    if (slot.blame_at_end && lost.last.batch_seq != ControlPage::kNoBatch) {
      slot.blamed = std::make_pair(lost.last.batch_seq, lost.last.task_index);
    }
    lost.blamed_task = slot.blamed;
    lost.blamed_failure = slot.blamed_failure;
    // A connection changed on the way is no one's doing here: what the worker held may run again.
    lost.retry_allowed = !slot.stop_reason || slot.corrupted;
    lost.corrupted = slot.corrupted;
    scheduler_.on_worker_lost(slot.index, lost);
  }
  ended_links_.push_back(std::move(slot.link));
  slot.state = State::kEmpty;
  slot.borrowed = false;
  if (!slot.start_failed) slot.next_start_ns = now;
  // A worker that left as asked at join, or for a resize or idle_timeout, is not replaced
  // (start_due checks wanted() and skips retired slots; parked ones start when work needs them);
  // one told to leave for a resize or idle_timeout not either when its exit() crashed or was
  // stopped (a replacement would idle and fail the same way). One whose slot a resize took back
  // meanwhile is.
  const bool told_to_leave = state == State::kShutdownSent && (slot.retired || slot.parked);
  if ((expected || deliberate || told_to_leave) && !slot.recycling &&
      (joining_ || slot.retired || slot.parked)) {
    slot.next_start_ns = INT64_MAX;
  }
  if (!wanted() && !any_alive() && scheduler_.has_pending()) {
    scheduler_.cancel_all(last_start_failure_.ok() ? absl::AbortedError("no worker is left")
                                                   : last_start_failure_);
  }
}

void Supervisor::on_host_leaving(Slot& slot) {
  if (!slot.link || slot.stop_reason || slot.state == State::kShutdownSent) return;
  touch(slot);
  log(slot, LogSeverity::kInfo,
      "its host is leaving (SIGTERM): it finishes its task, hands back the rest, runs exit(), and "
      "another worker takes its place");
  slot.recycling = true;  // replaced once it has left (on_ended)
  // Still starting: its shutdown is read after enter(), and it never takes a task.
  if (slot.state == State::kStarting) {
    send_shutdown(slot);
    return;
  }
  // The rest is recycling's: the shutdown goes once it is idle (after_events).
  slot.state = State::kDraining;
  scheduler_.stop_accepting(slot.index);
  scheduler_.take_back_unstarted(slot.index);
}

void Supervisor::on_output(Slot& slot, bool is_stderr, std::span<const std::string_view> lines,
                           OutputPlace place) {
  if (!config_.log_lines) return;
  // Lines read at one time share everything but their text: the worker, and the task it had
  // started when they were read, are looked up once for all of them (a read holds thousands when
  // tasks print a line each).
  LogEvent& event = output_event_;
  event.severity = is_stderr ? LogSeverity::kWarning : LogSeverity::kInfo;
  event.source = is_stderr ? LogSource::kStderr : LogSource::kStdout;
  event.task = place.batch_seq == ControlPage::kNoBatch
                   ? std::nullopt
                   : scheduler_.task_number(slot.index, place.batch_seq, place.task_index);
  identify(slot, event);
  config_.log_lines(event, lines);
}

void Supervisor::prepare_wait() {
  size_t kept = 0;
  for (size_t i = 0; i < touched_.size(); ++i) {
    Slot& slot = *slots_[touched_[i]];
    if (slot.unsynced) {
      wanted_.clear();
      if (slot.link) slot.link->add_pollfds(wanted_, !slot.borrowed);
      // Its next link's descriptors may have the numbers its last one closed.
      poll_set_.set(kFirstSlotGroup + static_cast<uint32_t>(slot.index), wanted_.data(),
                    wanted_.size(), /*fresh=*/slot.polled_generation != slot.generation);
      slot.polled_generation = slot.generation;
      slot.unsynced = false;
    }
    // Touched after check() ran (the second dispatch, after_events): checked at the next wake.
    if (slot.unchecked) {
      touched_[kept++] = slot.index;
    } else {
      slot.in_touched = false;
    }
  }
  touched_.resize(kept);
  poll_set_.apply();
}

void Supervisor::service() {
  // The launcher hears only of its watches that are ready, or when it has work without them.
  const std::vector<PollSet::Fired>& fired = poll_set_.fired(kLauncherGroup);
  if (!fired.empty() || launcher_.has_pending_events()) launcher_.service(fired, *this);
  for (const uint32_t group : poll_set_.ready_groups()) {
    if (group < kFirstSlotGroup) continue;
    Slot& slot = *slots_[group - kFirstSlotGroup];
    // A link that ended meanwhile (its server reported it) has nothing more to say.
    if (!slot.link || slot.generation != slot.polled_generation) continue;
    touch(slot);
    const PollSet::Entries& entries = poll_set_.entries(group);
    slot.link->service(entries.data(), entries.size(), !slot.borrowed, slot.events);
  }
}

bool Supervisor::launcher_has_pending_events() const { return launcher_.has_pending_events(); }

int64_t Supervisor::check(int64_t now_ns) {
  int64_t next = INT64_MAX;
  // (terminate() bounds its own wait: cancel_grace.)
  if (joining_ && !join_deadline_passed_ && !terminating_) {
    if (now_ns >= join_deadline_ns_) {
      join_deadline_passed_ = true;
      const absl::Status late = absl::DeadlineExceededError(absl::StrCat(
          "the pool's join_timeout (", absl::FormatDuration(config_.join_timeout), ") passed"));
      scheduler_.cancel_all(
          absl::DeadlineExceededError("join_timeout passed before this task could start"));
      for (auto& slot : slots_) {
        if (slot->link) stop(*slot, late, StopMode::kTerminate);
      }
    } else {
      next = std::min(next, join_deadline_ns_);
    }
  }
  next = std::min(next, launcher_.check(now_ns, *this));
  announce_waiting_places();
  next = std::min(next, check_idle(now_ns));
  // The slots something touched, then those due: not every link at every wake (each check may
  // read a worker's control page, a cache miss per worker).
  for (size_t i = 0; i < touched_.size(); ++i) {
    Slot& slot = *slots_[touched_[i]];
    if (slot.unchecked) check_slot(slot, now_ns);
  }
  for (size_t i = 0; i < check_at_.size(); ++i) {
    if (check_at_[i] <= now_ns) check_slot(*slots_[i], now_ns);
    next = std::min(next, check_at_[i]);
  }
  next = std::min(next, scheduler_.check(now_ns));
  return next;
}

void Supervisor::check_slot(Slot& slot, int64_t now_ns) {
  int64_t next = now_ns + kSlotRecheckNs;
  check_slot(slot, now_ns, next);
  // Checked: what it decided may have changed what its link waits for.
  touch(slot);
  slot.unchecked = false;
  check_at_[static_cast<size_t>(slot.index)] = next;
}

void Supervisor::check_slot(Slot& slot, int64_t now, int64_t& next) {
  if (!slot.link) {
    if (slot.state == State::kEmpty && slot.next_start_ns != INT64_MAX && !slot.retired &&
        wanted()) {
      next = std::min(next, slot.next_start_ns);
    }
    return;
  }
  next = std::min(next, slot.stop_sequence.check(*slot.link, now));
  if (slot.terminate_at_ns != INT64_MAX && !slot.stop_reason) {
    // terminate() with a cancel_grace: the task asked to stop returned, or its time is up. A
    // report learnt late (a remote worker's) tells so only once it may be newer than the request:
    // before, the worker may have begun another task since, which is owed its grace.
    const WorkerProgress progress = slot.link->progress();
    const bool returned = progress.batch_seq != ControlPage::kNoBatch &&
                          progress.batch_seq >= slot.terminate_after_batch && !progress.running &&
                          (progress.exact || now >= slot.terminate_asked_ns + kInexactProgressLagNs);
    if (now >= slot.terminate_at_ns || returned) {
      stop(slot, absl::CancelledError("the pool was terminated"), StopMode::kTerminate);
    } else {
      next = std::min(next, std::min(slot.terminate_at_ns, now + 1'000'000));
    }
  }
  if (slot.state == State::kShutdownSent && !slot.stop_reason && slot.leave_by_ns != INT64_MAX) {
    if (now >= slot.leave_by_ns) {
      stop(slot,
           absl::DeadlineExceededError(absl::StrCat(
               "told to leave, it did not finish exit() within join_timeout (",
               absl::FormatDuration(config_.join_timeout), ")")),
           StopMode::kTerminate);
    } else {
      next = std::min(next, slot.leave_by_ns);
    }
  }
  // Counted from when the worker was asked for: a remote slot's wait for a host is bounded by
  // connect_timeout, not by this.
  const int64_t placed = slot.link->placed_ns();
  if (slot.state == State::kStarting && !slot.stop_reason &&
      config_.enter_timeout != absl::InfiniteDuration() && placed != INT64_MAX) {
    const int64_t deadline = std::max(slot.started_ns, placed) + to_ns(config_.enter_timeout);
    if (now >= deadline) {
      const absl::Status late = absl::DeadlineExceededError(absl::StrCat(
          slot.display(), " did not finish enter() within enter_timeout (",
          absl::FormatDuration(config_.enter_timeout), ")"));
      record_start_failure(slot, late, now);
      stop(slot, late, StopMode::kTerminate);
    } else {
      next = std::min(next, deadline);
    }
  }
  if (config_.max_worker_rss_bytes > 0 && slot.state == State::kReady && !slot.recycling) {
    if (now - slot.last_memory_check_ns >= kMemoryCheckIntervalNs) {
      slot.last_memory_check_ns = now;
      const size_t rss = slot.link->resident_bytes();
      if (rss > config_.max_worker_rss_bytes) {
        slot.recycling = true;
        slot.state = State::kDraining;
        scheduler_.stop_accepting(slot.index);
        log(slot, LogSeverity::kInfo,
            absl::StrFormat("recycling: resident memory %d bytes exceeds max_worker_rss_bytes %d",
                            rss, config_.max_worker_rss_bytes));
      }
    }
    // The loop must come back for the next look: nothing else need wake it (an apply that
    // borrows an idle worker and gives it back idle does not).
    if (!slot.recycling) next = std::min(next, slot.last_memory_check_ns + kMemoryCheckIntervalNs);
  }
  if (!slot.link) return;
  next = std::min(next, slot.link->check(now, slot.events));
}

void Supervisor::shutdown_if_due(Slot& slot) {
  // (A worker terminate() lets finish its task gets no shutdown: it runs no exit() hook.)
  if (!slot.link || slot.stop_reason || slot.borrowed || slot.terminate_at_ns != INT64_MAX) {
    return;
  }
  const bool serving = slot.state == State::kReady || slot.state == State::kDraining;
  if (serving && scheduler_.quota_used(slot.index) && !slot.recycling) {
    slot.recycling = true;
    slot.state = State::kDraining;
    scheduler_.stop_accepting(slot.index);
  }
  const bool idle = scheduler_.idle(slot.index);
  const bool leaving = (joining_ && !scheduler_.has_pending()) || slot.retired || slot.parked;
  if (slot.state == State::kStarting && leaving && slot.link->placed_ns() == INT64_MAX) {
    // A remote slot still waiting for a worker host has no worker to tell: it ends now. A host
    // that comes (or one that join frees) is not given a worker only to run enter() and exit(),
    // and join does not wait for a host that may never come. Its wait is no start failure.
    stop(slot, absl::CancelledError("no longer needed before a worker host took it"),
         StopMode::kTerminate);
    return;
  }
  // A worker still starting gets its shutdown after enter(): frames are read in order.
  if ((serving && idle && (slot.recycling || leaving)) ||
      (slot.state == State::kStarting && leaving)) {
    send_shutdown(slot);
  }
}

void Supervisor::after_events() {
  // What makes a shutdown due happens to a slot (it is touched: results, a batch sent, a
  // retirement, a recycling), except at join, when the queue running dry makes every idle worker's
  // due at once.
  if (joining_) {
    for (auto& slot : slots_) shutdown_if_due(*slot);
  } else {
    for (size_t i = 0; i < touched_.size(); ++i) shutdown_if_due(*slots_[touched_[i]]);
  }
  // Before the ended links close their descriptors: removed from the set while their numbers
  // are still theirs.
  prepare_wait();
  ended_links_.clear();
}

void Supervisor::resize(int workers) {
  const int64_t now = monotonic_now_ns();
  touch_all();
  // Growing: retired slots first, lowest first (their numbers stay those of a pool of this
  // size where they can), then new ones.
  for (auto& slot : slots_) {
    if (target_ >= workers) break;
    if (!slot->retired) continue;
    take_back(*slot, now);
    ++target_;
  }
  while (target_ < workers) {
    slots_.push_back(std::make_unique<Slot>(*this, static_cast<int>(slots_.size())));
    check_at_.push_back(INT64_MIN);
    touch(*slots_.back());
    scheduler_.add_slot();
    ++target_;
  }
  // Shrinking: what costs least first, and among equals the highest slot. A slot without a
  // worker costs nothing; one leaving anyway, little; a starting one has done no work yet; an
  // idle one leaves at once; a busy one only after its task.
  const auto cost = [this](const Slot& slot) {
    if (!slot.link) return 0;
    if (slot.stop_reason || slot.recycling || slot.state == State::kShutdownSent) return 1;
    if (slot.state == State::kStarting) return 2;
    if (scheduler_.idle(slot.index) && !slot.borrowed) return 3;
    return 4;
  };
  while (target_ > workers) {
    Slot* cheapest = nullptr;
    for (auto it = slots_.rbegin(); it != slots_.rend(); ++it) {
      if ((*it)->retired) continue;
      if (cheapest == nullptr || cost(**it) < cost(*cheapest)) cheapest = it->get();
    }
    retire(*cheapest);
    --target_;
  }
  launcher_.set_workers(target_);
}

void Supervisor::retire(Slot& slot) {
  slot.retired = true;
  slot.parked = false;
  if (!slot.link) return;
  // (A remote slot still waiting for a worker host ends at once: shutdown_if_due.)
  if (slot.link->placed_ns() != INT64_MAX) {
    log(slot, LogSeverity::kInfo, "retired by resize(): leaves once the task it runs is done");
  }
  // What it has not started runs elsewhere (exactly: through its claims); it finishes the rest.
  scheduler_.stop_accepting(slot.index);
  scheduler_.take_back_unstarted(slot.index);
  shutdown_if_due(slot);
}

void Supervisor::take_back(Slot& slot, int64_t now_ns) {
  slot.retired = false;
  slot.parked = false;
  if (!slot.link) {
    // Due now, unless its last start failed: the crash guard's delay stands.
    if (!slot.start_failed || slot.next_start_ns == INT64_MAX) slot.next_start_ns = now_ns;
    return;
  }
  // A worker not yet told to leave stays; one told already leaves, and on_ended starts the next.
  // (One still starting is attached when it is ready.)
  if (slot.state == State::kReady && !slot.recycling && !slot.stop_reason &&
      slot.terminate_at_ns == INT64_MAX) {
    scheduler_.accept_again(slot.index);
  }
}

int64_t Supervisor::check_idle(int64_t now_ns) {
  if (config_.idle_timeout == absl::InfiniteDuration() || terminating_) return INT64_MAX;
  int64_t next = INT64_MAX;
  // Work no worker could take (dispatch ran just before) starts parked slots again: one per task
  // waiting, less the workers already starting for it.
  const bool any_parked = std::any_of(slots_.begin(), slots_.end(), [](const auto& slot) {
    return slot->parked && !slot->retired;
  });
  if (any_parked && wanted() && scheduler_.has_pending()) {
    size_t starts = scheduler_.queued_tasks();
    for (const auto& slot : slots_) {
      // Coming: starting, due to start, or leaving with a successor to follow (on_ended).
      const bool coming = slot->state == State::kStarting ||
                          (slot->state == State::kEmpty && slot->next_start_ns != INT64_MAX) ||
                          (slot->state == State::kShutdownSent && !joining_);
      if (coming && !slot->retired && !slot->parked && starts > 0) --starts;
    }
    for (auto& slot : slots_) {
      if (starts == 0) break;
      if (slot->retired || !slot->parked) continue;
      slot->parked = false;
      touch(*slot);
      --starts;
      // Still leaving: on_ended starts its successor.
      if (!slot->link) {
        slot->next_start_ns = now_ns;
        next = now_ns;
      }
    }
  }
  if (joining_) return next;
  // Idle workers leave, highest slots first, while more than min_workers remain: workers that
  // started, not places (one whose worker is still starting, may fail to, or waits for a worker
  // host, is none yet).
  const int64_t timeout_ns = to_ns(config_.idle_timeout);
  int remaining = 0;
  for (const auto& slot : slots_) {
    remaining += !slot->retired && !slot->parked && slot->link && slot->state != State::kStarting;
  }
  const int keep = std::min(config_.min_workers, target_);
  for (auto it = slots_.rbegin(); it != slots_.rend(); ++it) {
    Slot& slot = **it;
    if (slot.retired || slot.parked || !slot.link) continue;
    const bool idle = slot.state == State::kReady && !slot.stop_reason && !slot.recycling &&
                      !slot.borrowed && slot.terminate_at_ns == INT64_MAX &&
                      scheduler_.accepting(slot.index) && scheduler_.idle(slot.index);
    if (!idle || slot.sent_since_look) {
      slot.last_active_ns = now_ns;
      slot.sent_since_look = false;
      continue;
    }
    if (now_ns - slot.last_active_ns < timeout_ns) {
      next = std::min(next, slot.last_active_ns + timeout_ns);
      continue;
    }
    if (remaining <= keep) continue;
    --remaining;
    slot.parked = true;
    touch(slot);
    log(slot, LogSeverity::kInfo,
        absl::StrCat("idle for idle_timeout (", absl::FormatDuration(config_.idle_timeout),
                     "): leaves until work needs it"));
    scheduler_.stop_accepting(slot.index);
    shutdown_if_due(slot);
  }
  return next;
}

void Supervisor::begin_join(int64_t deadline_ns) {
  touch_all();
  join_deadline_ns_ = joining_ ? std::min(join_deadline_ns_, deadline_ns) : deadline_ns;
  joining_ = true;
}

absl::Status Supervisor::join_result() const {
  if (join_problems_.empty()) return absl::OkStatus();
  return absl::Status(join_code_, absl::StrCat("join: ", absl::StrJoin(join_problems_, "; ")));
}

void Supervisor::terminate() {
  if (terminating_) return;
  terminating_ = true;
  touch_all();
  joining_ = true;
  const absl::Status cancelled = absl::CancelledError("the pool was terminated");
  // Which workers hold work, before it is abandoned: with a cancel_grace they are asked to stop
  // every task and get that long to return from the one they run. (Over TCP the pool learns
  // progress late: a worker is done once it reported its last batch begun and no task running.)
  std::vector<uint64_t> newest(slots_.size(), 0);
  for (auto& slot : slots_) newest[slot->index] = scheduler_.newest_batch(slot->index);
  scheduler_.abandon_all(cancelled);
  const int64_t asked = monotonic_now_ns();
  const int64_t grace_ends =
      config_.cancel_grace > absl::ZeroDuration() ? asked + to_ns(config_.cancel_grace) : 0;
  for (auto& slot : slots_) {
    if (!slot->link) continue;
    if (grace_ends != 0 && slot->state != State::kStarting && newest[slot->index] != 0) {
      slot->link->request_stop(ControlPage::kStopEveryTask, 0, 0);
      slot->terminate_at_ns = grace_ends;
      slot->terminate_asked_ns = asked;
      slot->terminate_after_batch = newest[slot->index];
      scheduler_.stop_accepting(slot->index);
      continue;
    }
    stop(*slot, cancelled, StopMode::kTerminate);
  }
}

}  // namespace procpool::internal
