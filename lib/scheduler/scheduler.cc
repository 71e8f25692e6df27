// Scheduler: calls, dispatch, results and deadlines (scheduler.h). Batches are cut in
// batch_encoder.cc; what a lost worker or a take-back leaves behind is settled in settlement.cc.

#include "lib/scheduler/scheduler.h"

#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lib/common/clock.h"
#include "lib/wire/shared_region.h"
#include "procpool/internal/blob_region.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {
namespace {

// The most a call's observed busy time counts (as to_ns saturates durations: 73 years).
constexpr int64_t kMaxObservedNs = INT64_MAX / 4;

}  // namespace

namespace {

// A seed for the backoff's jitter that differs between pools and between runs: the point of
// jitter is that clients retrying against the same failing service do not come back in step.
uint64_t jitter_seed() {
  uint64_t seed = 0;
  if (::getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != static_cast<ssize_t>(sizeof(seed))) {
    static std::atomic<uint64_t> pools{0};
    seed = static_cast<uint64_t>(monotonic_now_ns()) ^ (static_cast<uint64_t>(::getpid()) << 32) ^
           (pools.fetch_add(1, std::memory_order_relaxed) * 0x9e3779b97f4a7c15);
  }
  return seed != 0 ? seed : 0x9e3779b97f4a7c15;  // xorshift never leaves 0
}

}  // namespace

Scheduler::Scheduler(Config config)
    : config_(config), workers_(config.workers), jitter_state_(jitter_seed()) {}
Scheduler::~Scheduler() = default;

void Scheduler::submit(std::shared_ptr<Call> call, size_t first, size_t count) {
  pending_.push_back(
      TaskRange{std::move(call), first, count, 0, static_cast<uint64_t>(tasks_submitted_)});
  tasks_submitted_ += static_cast<int64_t>(count);
}

bool Scheduler::work_outstanding() const {
  if (has_pending()) return true;
  for (const Worker& worker : workers_) {
    if (!worker.batches.empty()) return true;
  }
  return false;
}

void Scheduler::cancel(const Call* call, const absl::Status& status) {
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->call.get() == call) {
      TaskRange range = std::move(*it);
      it = pending_.erase(it);
      fail(range, range.first, range.count, status);
    } else {
      ++it;
    }
  }
  for (auto it = delayed_.begin(); it != delayed_.end();) {
    if (it->tasks.call.get() == call) {
      TaskRange range = std::move(it->tasks);
      it = delayed_.erase(it);
      fail(range, range.first, range.count, status);
    } else {
      ++it;
    }
  }
  // Batches already at workers: take back what has not started.
  take_back_where(TakeBack::kFail, status,
                  [call](int, const Batch& batch) { return batch.tasks.call.get() == call; });
}

void Scheduler::cancel_all(const absl::Status& status) {
  fail_pending(status);
  take_back_where(TakeBack::kFail, status, [](int, const Batch&) { return true; });
}

void Scheduler::stop_running(const Call* call, const absl::Status& reason) {
  const bool grace = config_.cancel_grace > absl::ZeroDuration();
  const int64_t now = monotonic_now_ns();
  const int64_t kill_at = grace ? now + to_ns(config_.cancel_grace) : now;
  for (Worker& worker : workers_) {
    if (worker.port == nullptr || worker.batches.empty()) continue;
    const WorkerProgress progress = worker.port->progress();
    const Batch* running = nullptr;
    for (const Batch& batch : worker.batches) {
      if (progress.running && batch.seq == progress.batch_seq && batch.tasks.call.get() == call &&
          progress.task_index >= batch.reported && progress.task_index < batch.limit) {
        running = &batch;
        break;
      }
    }
    if (running != nullptr && (progress.exact || !grace)) {
      if (grace) {
        // The rest of the batch too: its worker may have claimed more than the one it runs.
        request_stop(worker, *running, progress.task_index, running->limit, reason, kill_at);
      } else {
        worker.port->stop(reason);
      }
      continue;
    }
    if (progress.exact) continue;
    // Progress that comes late (TCP) may not show the task begun yet: the stop covers the front
    // batch from its first task not known to be done, and the kill waits for progress that shows
    // one of them running past the grace, or at once without one (check_worker, which allows for
    // the report's lag). Only with a grace is the worker asked to stop them.
    const Batch& front = worker.batches.front();
    if (front.tasks.call.get() != call || front.reported >= front.limit) continue;
    const uint32_t from =
        progress.batch_seq == front.seq ? std::max(front.reported, progress.task_index)
                                        : front.reported;
    if (from >= front.limit) continue;
    request_stop(worker, front, from, front.limit, reason, kill_at, /*ask_worker=*/grace);
  }
}

void Scheduler::ask_to_stop(const Call* call, const absl::Status& reason) {
  for (Worker& worker : workers_) {
    if (worker.port == nullptr || worker.batches.empty()) continue;
    const Batch& front = worker.batches.front();
    if (call != nullptr && front.tasks.call.get() != call) continue;
    // From the task it runs (or the next, between tasks); what it reported or finished keeps its
    // outcome. Later batches were taken back, or run tasks of other calls.
    const WorkerProgress progress = worker.port->progress();
    uint32_t from = front.reported;
    if (progress.batch_seq == front.seq) {
      from = std::max(from, progress.task_index + (progress.running ? 0 : 1));
    }
    if (from >= front.limit) continue;
    request_stop(worker, front, from, front.limit, reason, INT64_MAX);
  }
}

void Scheduler::request_stop(Worker& worker, const Batch& batch, uint32_t from, uint32_t to,
                             const absl::Status& reason, int64_t kill_at_ns, bool ask_worker) {
  if (worker.stop && worker.stop->seq == batch.seq) {
    // Asked again (a cancel after a soft timeout): the first reason stands for the tasks it
    // named, the range grows, the earlier deadline holds.
    worker.stop->from = std::min(worker.stop->from, from);
    worker.stop->to = std::max(worker.stop->to, to);
    worker.stop->kill_at_ns = std::min(worker.stop->kill_at_ns, kill_at_ns);
  } else {
    worker.stop = Worker::StopRequest{batch.seq, from, to, reason, kill_at_ns};
  }
  worker.check_at_ns = INT64_MIN;
  if (ask_worker) worker.port->request_stop(batch.seq, worker.stop->from, worker.stop->to);
}

const absl::Status* Scheduler::stopped_outcome(const Worker& worker, const Batch& batch,
                                               uint32_t index) const {
  if (!worker.stop || worker.stop->seq != batch.seq || index < worker.stop->from ||
      index >= worker.stop->to) {
    return nullptr;
  }
  return &worker.stop->reason;
}

void Scheduler::abandon_all(const absl::Status& status) {
  abandoned_ = true;
  fail_pending(status);
  for (Worker& worker : workers_) {
    for (Batch& batch : worker.batches) {
      if (batch.limit > batch.reported) {
        fail(batch.tasks, batch.tasks.first + batch.reported, batch.limit - batch.reported, status);
      }
    }
    worker.batches.clear();
    worker.stop.reset();
    worker.claim_slots_used = 0;
    worker.blob_bytes = 0;
  }
}

void Scheduler::attach(int slot, WorkerPort* port) {
  Worker& worker = workers_[slot];
  worker = Worker();
  worker.port = port;
  worker.accepting = !abandoned_;
}

void Scheduler::add_slot() { workers_.emplace_back(); }

size_t Scheduler::queued_tasks() const {
  size_t count = 0;
  for (const TaskRange& range : pending_) count += range.count;
  return count;
}

void Scheduler::stop_accepting(int slot) { workers_[slot].accepting = false; }
bool Scheduler::accepting(int slot) const { return workers_[slot].accepting; }

void Scheduler::accept_again(int slot) {
  Worker& worker = workers_[slot];
  worker.accepting = worker.port != nullptr && !abandoned_;
}

bool Scheduler::idle(int slot) const { return workers_[slot].batches.empty(); }

uint64_t Scheduler::newest_batch(int slot) const {
  const Worker& worker = workers_[slot];
  return worker.batches.empty() ? 0 : worker.batches.back().seq;
}

bool Scheduler::quota_used(int slot) const {
  return config_.max_tasks_per_worker > 0 &&
         workers_[slot].tasks_assigned >= config_.max_tasks_per_worker;
}

void Scheduler::dispatch() {
  std::vector<char> touched(workers_.size(), 0);
  bool any = false;
  while (!pending_.empty()) {
    const int slot = pick_worker();
    if (slot < 0) break;
    send_batch(slot);
    touched[slot] = 1;
    any = true;
  }
  if (!any) return;
  // One write per worker for all it was given.
  for (size_t slot = 0; slot < workers_.size(); ++slot) {
    if (touched[slot] && workers_[slot].port != nullptr) workers_[slot].port->flush();
  }
}

std::optional<int> Scheduler::dispatch_to_idle(std::shared_ptr<Call> call) {
  if (!pending_.empty()) return std::nullopt;
  for (int slot = 0; slot < static_cast<int>(workers_.size()); ++slot) {
    const Worker& worker = workers_[slot];
    if (!worker.accepting || !worker.batches.empty() || worker.suspect || quota_used(slot)) continue;
    submit(std::move(call), 0, 1);
    send_batch(slot, /*awaited=*/true);
    workers_[slot].port->flush();
    return slot;
  }
  return std::nullopt;
}

absl::Status Scheduler::on_results(int slot, wire::ResultBatch::Reader results, bool recovered) {
  Worker& worker = workers_[slot];
  worker.check_at_ns = INT64_MIN;
  if (recovered && (worker.batches.empty() || results.getSeq() < worker.batches.front().seq ||
                    (results.getSeq() == worker.batches.front().seq &&
                     results.getStart() < worker.batches.front().reported))) {
    return absl::OkStatus();  // came through the channel already
  }
  if (worker.port == nullptr) {
    // Not attached: it never said it was ready, and was given nothing.
    return absl::DataLossError("reported results before it was ready");
  }
  if (worker.batches.empty() || worker.batches.front().seq != results.getSeq()) {
    // After terminate() the batches were settled already: late results are dropped.
    if (abandoned_) return absl::OkStatus();
    return absl::DataLossError(
        absl::StrCat(worker.port->name(), " reported results for a batch it was not running"));
  }
  Batch& batch = worker.batches.front();
  Call& call = *batch.tasks.call;
  const uint32_t count = results.getCount();
  if (results.getStart() != batch.reported || uint64_t{batch.reported} + count > batch.limit) {
    return absl::DataLossError(absl::StrCat(worker.port->name(), " reported results out of order"));
  }
  // A task counts as reported once its outcome is delivered, never before: whatever this frame
  // cannot deliver (it is refused, or a read of it throws kj::Exception midway, which breaks the
  // worker's stream) is settled with the rest of the batch when the worker is lost.
  worker.suspect = false;
  // Blobs of the results are read from the worker's region (copied out as they are decoded),
  // then its area is given back up to where this frame's blobs end.
  SharedRegion* const region = worker.port->shared_region();
  BlobContext blobs{.region = region != nullptr ? &region->parent() : nullptr,
                    .max_blob_bytes = config_.max_frame_bytes};
  BlobScope blob_scope(&blobs);
  absl::Status delivered = results.hasWordResults() ? deliver_word_results(worker, batch, results)
                                                    : deliver_outcomes(worker, batch, results);
  if (!delivered.ok()) return delivered;
  // The worker's own account of the time these took, which it cannot have spent before the batch
  // was sent: clamped to that, so that a worker claiming years (a bug, or a hostile host) cannot
  // raise the call's mean and with it switch off the stall rule for the call's every worker;
  // and, as every time it writes, so that sums and the multiple of the mean cannot overflow.
  const int64_t since_sent = std::clamp<int64_t>(monotonic_now_ns() - batch.sent_ns, 0, kMaxObservedNs);
  const auto busy_ns = static_cast<int64_t>(
      std::min<uint64_t>(results.getBusyNs(), static_cast<uint64_t>(since_sent)));
  call.observed_tasks += count;
  call.observed_busy_ns = std::min(call.observed_busy_ns + busy_ns, kMaxObservedNs);
  run_time_.add(count, absl::Nanoseconds(busy_ns));
  if (region != nullptr) region->release_results(results.getBlobsEnd());
  if (batch.reported == batch.limit && batch.take_back == TakeBack::kNone) {
    erase_batch(worker, 0);
  }
  return absl::OkStatus();
}

absl::Status Scheduler::deliver_word_results(Worker& worker, Batch& batch,
                                             wire::ResultBatch::Reader results) {
  Call& call = *batch.tasks.call;
  const uint32_t count = results.getCount();
  if (!call.packs_jobs()) {
    // Its tasks would be counted and never settled: the call has no word form of its results.
    return absl::DataLossError(absl::StrCat(
        worker.port->name(), " sent word results for a batch whose jobs were not sent as words"));
  }
  uint32_t word_count = 0;
  const uint64_t* const words = words_of(results.getWordResults(), word_count);
  if (words == nullptr && count > 0) {
    return absl::DataLossError(
        absl::StrCat(worker.port->name(), " sent results that are not whole aligned words"));
  }
  if (count > word_count) {
    return absl::DataLossError(absl::StrCat(worker.port->name(), " reported results out of order"));
  }
  // The call settles the whole piece at once: everything of it that may throw is read here
  // first, so that it gets all of the piece or none.
  std::vector<WordFailure> failures;
  const auto errors = results.getErrors();
  failures.reserve(errors.size());
  for (const wire::TaskError::Reader error : errors) {
    const uint32_t index = error.getIndex();
    if (index >= count || (!failures.empty() && index <= failures.back().index)) {
      return absl::DataLossError(absl::StrCat(
          worker.port->name(), " sent word results whose failed tasks are out of order"));
    }
    absl::Status status = status_from_wire(error.getError());
    if (status.ok()) status = absl::UnknownError("the task failed without a status");
    failures.push_back(WordFailure{index, std::move(status)});
  }
  if (count == 0) return absl::OkStatus();
  // Tasks asked to stop report why, whatever they returned.
  if (worker.stop && worker.stop->seq == batch.seq) {
    std::vector<WordFailure> merged;
    size_t next_failure = 0;
    for (uint32_t i = 0; i < count; ++i) {
      const bool failed = next_failure < failures.size() && failures[next_failure].index == i;
      if (const absl::Status* stopped = stopped_outcome(worker, batch, batch.reported + i)) {
        merged.push_back(WordFailure{i, *stopped});
      } else if (failed) {
        merged.push_back(std::move(failures[next_failure]));
      }
      if (failed) ++next_failure;
    }
    failures = std::move(merged);
  }
  // Failures that retry_on sends back leave the piece: the call gets the rest, in runs between
  // them, each run's failures counted from its start.
  const size_t first = batch.tasks.first + batch.reported;
  uint32_t run_start = 0;
  size_t run_failures = 0;  // failures[run_failures..] lie at or after run_start
  std::vector<WordFailure> in_run;
  auto deliver_run = [&](uint32_t end) {
    if (end <= run_start) return;
    in_run.clear();
    for (; run_failures < failures.size() && failures[run_failures].index < end; ++run_failures) {
      in_run.push_back(WordFailure{failures[run_failures].index - run_start,
                                   failures[run_failures].status});
    }
    const uint32_t n = end - run_start;
    const size_t values = call.on_word_results(first + run_start, n, words + run_start,
                                               results.getWordKind(), in_run);
    tasks_done_ += static_cast<int64_t>(values);
    tasks_failed_ += static_cast<int64_t>(n - values);
  };
  if (!batch.tasks.call->settings().retry_on.empty()) {
    for (size_t f = 0; f < failures.size(); ++f) {
      if (!may_retry(batch.tasks, failures[f].status, /*by_default=*/false)) continue;
      const uint32_t at = failures[f].index;
      deliver_run(at);
      run_failures = f + 1;
      run_start = at + 1;
      retry(TaskRange{batch.tasks.call, first + at, 1, batch.tasks.attempt + 1,
                      batch.tasks.number + batch.reported + at});
    }
  }
  deliver_run(count);
  batch.reported += count;
  return absl::OkStatus();
}

absl::Status Scheduler::deliver_outcomes(Worker& worker, Batch& batch,
                                         wire::ResultBatch::Reader results) {
  Call& call = *batch.tasks.call;
  const uint32_t count = results.getCount();
  const auto listed = results.getOutcomes();
  if (count > listed.size()) {
    return absl::DataLossError(absl::StrCat(worker.port->name(), " reported results out of order"));
  }
  for (uint32_t i = 0; i < count; ++i) {
    const wire::Outcome::Reader outcome = listed[i];
    const size_t index = batch.tasks.first + batch.reported;
    // Asked to stop: whatever it returned, it reports why it was asked (its worker lives on),
    // and a soft timeout listed in retry_on runs it again, as the word path and a kill at the
    // soft timeout (no cancel_grace) do.
    if (const absl::Status* stopped = stopped_outcome(worker, batch, batch.reported)) {
      if (may_retry(batch.tasks, *stopped, /*by_default=*/false)) {
        retry(TaskRange{batch.tasks.call, index, 1, batch.tasks.attempt + 1,
                        batch.tasks.number + (index - batch.tasks.first)});
      } else {
        call.on_error(index, *stopped);
        ++tasks_failed_;
      }
      ++batch.reported;
      continue;
    }
    // Each outcome is read whole before it is delivered (a bad pointer throws here).
    switch (outcome.which()) {
      case wire::Outcome::OK: {
        const wire::Value::Reader value = outcome.getOk();
        if (call.on_value(index, value)) {
          ++tasks_done_;
        } else {
          ++tasks_failed_;
        }
        break;
      }
      case wire::Outcome::ERROR: {
        absl::Status status = status_from_wire(outcome.getError());
        if (status.ok()) status = absl::UnknownError("the task failed without a status");
        if (may_retry(batch.tasks, status, /*by_default=*/false)) {
          retry(TaskRange{batch.tasks.call, index, 1, batch.tasks.attempt + 1,
                          batch.tasks.number + (index - batch.tasks.first)});
          break;
        }
        call.on_error(index, std::move(status));
        ++tasks_failed_;
        break;
      }
      default:
        return absl::DataLossError(
            absl::StrCat(worker.port->name(), " sent an outcome of no known kind"));
    }
    ++batch.reported;
  }
  return absl::OkStatus();
}

void Scheduler::on_revoked(int slot, uint32_t claim_slot, uint16_t tag, uint32_t claimed) {
  Worker& worker = workers_[slot];
  worker.check_at_ns = INT64_MIN;
  for (size_t i = 0; i < worker.batches.size(); ++i) {
    Batch& batch = worker.batches[i];
    if (batch.claim_slot != claim_slot || batch.claim_tag != tag) continue;
    // Only an answer to a revoke in flight counts: a remote host's word alone (it would hand back
    // tasks its worker runs, for another to run them again) takes nothing back.
    if (batch.take_back == TakeBack::kNone) return;
    settle_taken_back(worker, batch, claimed);
    if (batch.reported >= batch.limit) erase_batch(worker, i);
    return;
  }
}

void Scheduler::erase_batch(Worker& worker, size_t index) {
  worker.check_at_ns = INT64_MIN;
  if (worker.stop && worker.stop->seq == worker.batches[index].seq) {
    // Its tasks are settled: the request is withdrawn (the worker's page forgets it).
    worker.stop.reset();
    if (worker.port != nullptr) worker.port->request_stop(0, 0, 0);
  }
  worker.claim_slots_used &= ~(ClaimMask{1} << worker.batches[index].claim_slot);
  worker.blob_bytes -= worker.batches[index].blob_bytes;
  // The worker has no further use for the blobs of the batch's jobs.
  if (worker.port != nullptr) {
    if (SharedRegion* region = worker.port->shared_region()) {
      region->release_batch(worker.batches[index].seq);
    }
  }
  const Batch& done = worker.batches[index];
  worker.recent_batches[worker.recent_next++ % kRecentBatches] = {done.seq, done.tasks.number,
                                                                  done.tasks.count};
  worker.batches.erase(worker.batches.begin() + static_cast<ptrdiff_t>(index));
  if (index == 0 && !worker.batches.empty()) {
    worker.batches.front().front_since_ns = monotonic_now_ns();
    worker.stall_taken_back = false;
  }
}

std::optional<uint64_t> Scheduler::current_task(int slot) const {
  const Worker& worker = workers_[slot];
  if (worker.batches.empty() || worker.port == nullptr) return std::nullopt;
  const WorkerProgress progress = worker.port->progress();
  const Batch& front = worker.batches.front();
  if (!progress.running || progress.batch_seq != front.seq) return std::nullopt;
  return front.tasks.number + progress.task_index;
}

std::optional<uint64_t> Scheduler::task_number(int slot, uint64_t seq, uint32_t index) const {
  if (slot < 0 || slot >= static_cast<int>(workers_.size())) return std::nullopt;
  for (const Batch& batch : workers_[slot].batches) {
    if (batch.seq == seq && index < batch.tasks.count) return batch.tasks.number + index;
  }
  for (const Worker::RecentBatch& batch : workers_[slot].recent_batches) {
    if (batch.seq == seq && index < batch.count) return batch.number + index;
  }
  return std::nullopt;
}

std::optional<absl::Status> Scheduler::host_timeout_failure(int slot, uint64_t seq, uint32_t index,
                                                            absl::string_view worker) const {
  if (slot < 0 || slot >= static_cast<int>(workers_.size())) return std::nullopt;
  for (const Batch& batch : workers_[slot].batches) {
    if (batch.seq != seq || index >= batch.limit || batch.timeout == absl::InfiniteDuration()) {
      continue;
    }
    return timeout_failure(batch, index, absl::StrCat(worker, " was stopped by its host's watchdog"));
  }
  return std::nullopt;
}

absl::Status Scheduler::timeout_failure(const Batch& batch, uint32_t index, absl::string_view stopped) {
  return absl::DeadlineExceededError(absl::StrFormat("task %d of its call ran past its timeout of %s; %s",
                                                     batch.tasks.first + index,
                                                     absl::FormatDuration(batch.timeout), stopped));
}

int64_t Scheduler::check(int64_t now_ns) {
  int64_t next = INT64_MAX;
  // Retries whose backoff ended go to the front of the queue, in the order they failed.
  std::vector<TaskRange> due;
  for (auto it = delayed_.begin(); it != delayed_.end();) {
    if (it->ready_ns <= now_ns) {
      due.push_back(std::move(it->tasks));
      it = delayed_.erase(it);
    } else {
      next = std::min(next, it->ready_ns);
      ++it;
    }
  }
  if (!due.empty()) requeue_front(std::move(due));
  for (int slot = 0; slot < static_cast<int>(workers_.size()); ++slot) {
    Worker& worker = workers_[slot];
    if (worker.port == nullptr || worker.batches.empty()) continue;
    if (worker.check_at_ns <= now_ns) {
      int64_t worker_next = now_ns + kWorkerRecheckNs;
      worker.check_at_ns = INT64_MAX;
      check_worker(slot, now_ns, worker_next);
      // (Still INT64_MIN if the look itself changed its batches: looked at again at once.)
      worker.check_at_ns = std::min(worker.check_at_ns, worker_next);
    }
    next = std::min(next, std::max(worker.check_at_ns, now_ns));
  }
  return next;
}

void Scheduler::check_worker(int slot, int64_t now, int64_t& next) {
  Worker& worker = workers_[slot];
  const Batch& front = worker.batches.front();
  WorkerProgress progress = worker.port->progress();
  // Its start, as first seen (Worker::seen_start). (`now` was read before the record: a task may
  // have begun since, so the clock is read again before a start after it is doubted.)
  int64_t start = progress.started_ns;
  if (start > now) start = std::min(start, monotonic_now_ns());
  Worker::SeenStart& seen = worker.seen_start;
  if (seen.seq == progress.batch_seq && seen.index == progress.task_index) {
    start = std::min(start, seen.start_ns);
  }
  seen = Worker::SeenStart{progress.batch_seq, progress.task_index, start};
  progress.started_ns = start;
  const bool on_front = progress.batch_seq == front.seq;
  const bool running = on_front && progress.running;
  // A worker sends a task's outcome only after the task ended. One whose exact progress says it
  // still runs a task it reported (of the front batch, or of one reported whole) lied in that
  // report, and is out of every rule below (the batch it runs is no longer here): it goes.
  if (progress.exact && progress.running &&
      (progress.batch_seq < front.seq || (on_front && progress.task_index < front.reported))) {
    worker.port->stop(absl::DataLossError(absl::StrFormat(
        "%s reported the outcome of a task it had not finished (batch %d, task %d); it was "
        "stopped",
        worker.port->name(), progress.batch_seq, progress.task_index)));
    return;
  }
  // Since when the worker has not started a task: its running task's start, or (between tasks or
  // before its first) the later of that and when the front batch became its front.
  const int64_t waiting_since =
      running ? progress.started_ns
              : std::max(front.front_since_ns, on_front ? progress.started_ns : int64_t{0});
  // Every deadline below counts from that report. One learnt late (a remote worker's) may show a
  // task the worker left since: only once it is older than the lag may a deadline fall.
  const int64_t lag = progress.exact ? 0 : kInexactProgressLagNs;

  // Soft timeouts: the task is asked to stop, and gets cancel_grace to do so.
  if (running && front.soft_timeout != absl::InfiniteDuration()) {
    const bool asked = worker.stop && worker.stop->seq == front.seq &&
                       progress.task_index >= worker.stop->from &&
                       progress.task_index < worker.stop->to;
    const int64_t soft_deadline =
        progress.started_ns + to_ns(front.soft_timeout) + coarse_clock_slack_ns() + lag;
    if (asked) {
      // Already asked (for this or another reason).
    } else if (now >= soft_deadline) {
      request_stop(worker, front, progress.task_index, progress.task_index + 1,
                   absl::DeadlineExceededError(absl::StrFormat(
                       "task %d of its call ran past its soft_timeout of %s and was asked to stop",
                       front.tasks.first + progress.task_index,
                       absl::FormatDuration(front.soft_timeout))),
                   now + to_ns(config_.cancel_grace));
    } else {
      next = std::min(next, soft_deadline);
    }
  }
  // A task asked to stop that still runs when its grace ends: its worker goes.
  if (running && worker.stop && worker.stop->seq == front.seq &&
      progress.task_index >= worker.stop->from && progress.task_index < worker.stop->to &&
      worker.stop->kill_at_ns != INT64_MAX) {
    const int64_t kill_at = worker.stop->kill_at_ns + lag;
    if (now >= kill_at) {
      worker.port->stop(worker.stop->reason);
      return;
    }
    next = std::min(next, kill_at);
  }

  // Task timeouts.
  if (front.timeout != absl::InfiniteDuration()) {
    if (running) {
      // Packed tasks are stamped with the coarse clock, which runs behind by up to its
      // resolution: never kill a task before its time.
      const int64_t deadline =
          progress.started_ns + to_ns(front.timeout) + coarse_clock_slack_ns() + lag;
      if (now >= deadline) {
        worker.port->stop(timeout_failure(front, progress.task_index,
                                          absl::StrCat(worker.port->name(), " was stopped")));
        return;
      }
      next = std::min(next, deadline);
    } else {
      // Not started yet, or between tasks. A worker that stays so past the timeout (and the
      // grace) is stuck or stopped: it holds tasks it will never run, so it goes too.
      const int64_t stuck_since =
          worker.suspect ? std::min(waiting_since, worker.suspect_since_ns) : waiting_since;
      const int64_t deadline =
          stuck_since + to_ns(front.timeout) + to_ns(config_.kill_grace) + lag;
      if (now >= deadline) {
        worker.port->stop(absl::DeadlineExceededError(absl::StrFormat(
            "%s did not start its next task within the task timeout of %s; it is stuck or "
            "stopped and was stopped",
            worker.port->name(), absl::FormatDuration(front.timeout))));
        return;
      }
      next = std::min(next, std::min(deadline, now + 1'000'000));
    }
  }

  // The stall rule (scheduler.h).
  if (worker.stall_taken_back) return;
  const Call& call = *front.tasks.call;
  const int64_t mean = call.observed_tasks > 0 ? call.observed_busy_ns / call.observed_tasks : 0;
  const int64_t threshold =
      std::max(kStallFloorNs, kStallFactor * std::min(mean, kMaxObservedNs / kStallFactor));
  const int64_t stall_at = waiting_since + threshold + lag;
  if (now < stall_at) {
    next = std::min(next, stall_at);
    return;
  }
  worker.stall_taken_back = true;
  if (!worker.suspect) worker.suspect_since_ns = waiting_since;
  worker.suspect = true;
  take_back_unstarted(slot);
}

}  // namespace procpool::internal
