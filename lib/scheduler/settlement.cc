// Scheduler: what becomes of tasks a worker cannot deliver. A worker that is lost (it died, was
// stopped for a timeout or a broken stream) leaves tasks in three states, told apart by its last
// progress: finished but unreported (their results died with it), the one it was running, and
// not started. Tasks taken back by a revoke are exactly the unstarted ones.
//
// Its last progress is its own record (its control page), which a task with a wild pointer may
// have overwritten before it killed the worker. A record that places a task running, or tasks
// finished, costs those tasks an attempt each (bounded by `retries`); one that places none would
// requeue everything as unstarted, the killer included, without end. So a worker lost with no task
// placed counts against the first task it held without an outcome (TaskRange::unplaced_losses):
// after kMaxUnplacedLosses of them, that task is deemed to have run and ended them. The tasks
// behind it in its batch run again publishing each outcome before the next task starts
// (TaskRange::publish_each), so that the one among them that ended the worker, if it ends the
// next, is first in line then: a killer anywhere in a large batch costs a few workers, not one
// per task before it.

#include <algorithm>
#include <cstddef>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "lib/common/clock.h"
#include "lib/scheduler/scheduler.h"
#include "procpool/internal/reworded.h"

namespace procpool::internal {

void Scheduler::fail(const TaskRange& range, size_t first, size_t count,
                     const absl::Status& status) {
  for (size_t i = first; i < first + count; ++i) range.call->on_error(i, status);
  tasks_failed_ += static_cast<int64_t>(count);
}

void Scheduler::fail_pending(const absl::Status& status) {
  while (!pending_.empty()) {
    TaskRange range = std::move(pending_.front());
    pending_.pop_front();
    fail(range, range.first, range.count, status);
  }
  std::vector<DelayedRetry> delayed = std::move(delayed_);
  delayed_.clear();
  for (const DelayedRetry& waiting : delayed) {
    fail(waiting.tasks, waiting.tasks.first, waiting.tasks.count, status);
  }
}

bool Scheduler::may_retry(const TaskRange& tasks, const absl::Status& failure,
                          bool by_default) const {
  const CallSettings& settings = tasks.call->settings();
  if (tasks.attempt >= settings.retries || tasks.call->cancelled || abandoned_) return false;
  if (settings.retry_on.empty()) return by_default;
  return std::find(settings.retry_on.begin(), settings.retry_on.end(), failure.code()) !=
         settings.retry_on.end();
}

void Scheduler::retry(TaskRange tasks) {
  const RetryBackoff& backoff = tasks.call->settings().retry_backoff;
  if (backoff.initial <= absl::ZeroDuration()) {
    requeue_front({std::move(tasks)});
    return;
  }
  // initial x multiplier^(retry - 1), at most max (options_check.cc bounds every term), then
  // spread by up to +-jitter of itself (retries of tasks that failed together do not come back
  // together), and at most max again: no wait is longer than max.
  double delay_ns = static_cast<double>(to_ns(backoff.initial));
  for (int i = 1; i < tasks.attempt && delay_ns < static_cast<double>(to_ns(backoff.max)); ++i) {
    delay_ns *= backoff.multiplier;
  }
  delay_ns = std::min(delay_ns, static_cast<double>(to_ns(backoff.max)));
  jitter_state_ ^= jitter_state_ << 13;
  jitter_state_ ^= jitter_state_ >> 7;
  jitter_state_ ^= jitter_state_ << 17;
  const double unit = static_cast<double>(jitter_state_ >> 11) / static_cast<double>(1ull << 53);
  delay_ns *= 1 + backoff.jitter * (2 * unit - 1);
  delay_ns = std::min(delay_ns, static_cast<double>(to_ns(backoff.max)));
  delayed_.push_back(
      DelayedRetry{monotonic_now_ns() + static_cast<int64_t>(std::max(delay_ns, 0.0)),
                   std::move(tasks)});
}

void Scheduler::requeue_front(std::vector<TaskRange> ranges) {
  for (auto it = ranges.rbegin(); it != ranges.rend(); ++it) {
    if (it->count == 0) continue;
    // A cancelled call has its outcome: its tasks are never queued again.
    if (it->call->cancelled) {
      fail(*it, it->first, it->count, absl::CancelledError("cancelled before it started"));
    } else {
      pending_.push_front(std::move(*it));
    }
  }
}

void Scheduler::take_back(int slot, Batch& batch, TakeBack how, const absl::Status& status) {
  batch.take_back = how;
  batch.take_back_status = status;
  const uint32_t claim_slot = batch.claim_slot;
  const uint16_t tag = batch.claim_tag;
  // The answer may come during this call, and settle and erase `batch`: do not touch it after.
  workers_[slot].port->revoke(claim_slot, tag);
}

void Scheduler::take_back_where(TakeBack how, const absl::Status& status,
                                absl::FunctionRef<bool(int slot, const Batch& batch)> which) {
  // Collected first, then each found again by its number: a revoke may be answered within
  // take_back, and settle and erase its batch (or others of its worker).
  std::vector<std::pair<int, uint64_t>> targets;
  for (int slot = 0; slot < static_cast<int>(workers_.size()); ++slot) {
    for (const Batch& batch : workers_[slot].batches) {
      if (batch.take_back == TakeBack::kNone && which(slot, batch)) {
        targets.emplace_back(slot, batch.seq);
      }
    }
  }
  for (const auto& [slot, seq] : targets) {
    for (Batch& batch : workers_[slot].batches) {
      if (batch.seq == seq) {
        take_back(slot, batch, how, status);
        break;
      }
    }
  }
}

void Scheduler::take_back_unstarted(int slot) {
  take_back_where(TakeBack::kRequeue, absl::OkStatus(),
                  [slot](int at, const Batch&) { return at == slot; });
}

void Scheduler::settle_taken_back(Worker& /*worker*/, Batch& batch, uint32_t claimed) {
  claimed = std::clamp(claimed, batch.reported, batch.limit);
  if (claimed < batch.limit) {
    TaskRange rest{batch.tasks.call, batch.tasks.first + claimed, batch.limit - claimed,
                   batch.tasks.attempt, batch.tasks.number + claimed,
                   claimed == 0 ? batch.tasks.unplaced_losses : 0};
    if (batch.take_back == TakeBack::kFail) {
      fail(rest, rest.first, rest.count, batch.take_back_status);
    } else {
      requeue_front({std::move(rest)});
    }
  }
  batch.limit = claimed;
  batch.take_back = TakeBack::kNone;
}

void Scheduler::on_worker_lost(int slot, const LostWorker& how) {
  Worker& worker = workers_[slot];
  const WorkerProgress& last = how.last;
  // The batch it was on: batches before it finished (their results may have been on the way),
  // batches after it never started (if its progress is exact; otherwise they may have).
  size_t current = worker.batches.size();
  for (size_t b = 0; b < worker.batches.size(); ++b) {
    if (worker.batches[b].seq == last.batch_seq) current = b;
  }
  const absl::StatusCode lost_code =
      how.corrupted ? absl::StatusCode::kDataLoss : absl::StatusCode::kAborted;
  const absl::Status lost_result = absl::Status(
      lost_code, absl::StrCat(how.ended, " after this task finished but before its result was sent"));
  std::vector<TaskRange> requeue;
  // Tasks [from, to) of `batch` that ran (or were running): run again if the call allows (and,
  // for the task running when the pool stopped the worker on purpose, it was not that task's own
  // doing), else fail with `failure`. The task its stream broke on fails alone with kDataLoss:
  // nothing of its doing reaches its chunk-mates.
  auto settle_ran = [&](const Batch& batch, uint32_t from, uint32_t to, const absl::Status& failure,
                        bool retry_allowed) {
    const TaskRange& tasks = batch.tasks;
    for (uint32_t p = from; p < to;) {
      if (how.blamed_task && how.blamed_task->first == batch.seq && how.blamed_task->second == p) {
        fail(tasks, tasks.first + p, 1, how.blamed_failure);
        ++p;
        continue;
      }
      uint32_t q = p + 1;
      while (q < to && !(how.blamed_task && how.blamed_task->first == batch.seq &&
                         how.blamed_task->second == q)) {
        ++q;
      }
      if (may_retry(tasks, failure, retry_allowed)) {
        TaskRange again{tasks.call, tasks.first + p, q - p, tasks.attempt + 1,
                        tasks.number + p};
        if (tasks.call->settings().retry_backoff.initial > absl::ZeroDuration()) {
          retry(std::move(again));
        } else {
          requeue.push_back(std::move(again));
        }
      } else {
        fail(tasks, tasks.first + p, q - p, failure);
      }
      p = q;
    }
  };
  // Late progress (TCP): tasks after the last one the worker told of may have started.
  const absl::Status maybe_ran = absl::Status(
      lost_code, absl::StrCat(how.ended, "; this task may have started before, its outcome is unknown"));
  const bool known = current < worker.batches.size();
  // Whether its record placed a task running or tasks finished (or its stream broke on one):
  // those answer for the loss. If none did, the first task requeued unstarted below is the one
  // the worker was most likely on: see TaskRange::unplaced_losses.
  bool placed = false;
  struct FirstUnstarted {
    size_t requeued;  // its range's index in `requeue`
    size_t batch;
    uint32_t index;   // in that batch
  };
  std::optional<FirstUnstarted> first_unstarted;
  for (size_t b = 0; b < worker.batches.size(); ++b) {
    const Batch& batch = worker.batches[b];
    const uint32_t end = batch.limit;  // tasks past it were settled when taken back
    uint32_t finished = batch.reported;
    std::optional<uint32_t> running;
    if (known && b < current) {
      finished = end;
    } else if (b == current) {
      const uint32_t started = last.task_index;
      finished = std::max(batch.reported, std::min(last.running ? started : started + 1, end));
      if (last.running && started >= batch.reported && started < end) running = started;
    }
    if (running && *running < finished) running.reset();
    // (Finished tasks it placed count too: they answer for the loss, an attempt each.)
    if (running || finished > batch.reported ||
        (how.blamed_task && how.blamed_task->first == batch.seq &&
         how.blamed_task->second >= batch.reported && how.blamed_task->second < end)) {
      placed = true;
    }
    // Finished tasks the pool had asked to stop report why they were asked, as when their
    // results arrive (a kill at a soft timeout without cancel_grace may land just after the
    // task, seeing the request, returned); the others lost their results with the worker.
    uint32_t stop_from = finished;
    uint32_t stop_to = finished;
    if (worker.stop && worker.stop->seq == batch.seq) {
      stop_from = std::clamp(worker.stop->from, batch.reported, finished);
      stop_to = std::clamp(worker.stop->to, stop_from, finished);
    }
    settle_ran(batch, batch.reported, stop_from, lost_result, /*retry_allowed=*/true);
    settle_ran(batch, stop_from, stop_to, worker.stop ? worker.stop->reason : lost_result,
               /*retry_allowed=*/false);
    settle_ran(batch, stop_to, finished, lost_result, /*retry_allowed=*/true);
    uint32_t not_started = finished;
    if (running) {
      settle_ran(batch, *running, *running + 1, how.running_failure, how.retry_allowed);
      not_started = *running + 1;
    }
    // Inexact progress: the rest of the batch it was on, and every batch after it (or every batch,
    // if it told of none), may have started meanwhile.
    const bool maybe_started = !last.exact && (b == current || !known || b > current);
    if (maybe_started) {
      settle_ran(batch, not_started, end, maybe_ran, /*retry_allowed=*/true);
      continue;
    }
    if (not_started < end) {
      if (!first_unstarted) {
        first_unstarted = FirstUnstarted{requeue.size(), b, not_started};
      }
      requeue.push_back(TaskRange{batch.tasks.call, batch.tasks.first + not_started,
                                  end - not_started, batch.tasks.attempt,
                                  batch.tasks.number + not_started,
                                  not_started == 0 ? batch.tasks.unplaced_losses : 0,
                                  batch.tasks.publish_each});
    }
  }
  if (!placed && first_unstarted) {
    // One task of the requeued range at its head gets the loss: alone in its range (and the
    // batch sent from it), so the count follows it and no other. The rest of the range ran
    // behind it, perhaps the task that ended the worker among them, their outcomes lost with the
    // record: they run again publishing each outcome before the next task starts, so that if one
    // of them ends a worker again, it is first in line then.
    TaskRange& range = requeue[first_unstarted->requeued];
    TaskRange head{range.call, range.first, 1, range.attempt, range.number,
                   range.unplaced_losses + 1};
    ++range.first;
    ++range.number;
    --range.count;
    range.unplaced_losses = 0;
    range.publish_each = true;
    if (head.unplaced_losses >= kMaxUnplacedLosses) {
      // Deemed to have run, and ended them: it fails (or runs again under the call's retries)
      // like a task its worker died running.
      const absl::Status& cause = how.running_failure;
      const absl::Status failure = reworded(
          cause,
          absl::StrCat(cause.message(), "; its worker's record of the task it ran placed none (it "
                       "was overwritten, perhaps by a task), and this task was the first without "
                       "an outcome at the ",
                       kMaxUnplacedLosses, " workers so lost: taken as the task that ended them"));
      const Batch& batch = worker.batches[first_unstarted->batch];
      settle_ran(batch, first_unstarted->index, first_unstarted->index + 1, failure,
                 how.retry_allowed);
    } else {
      requeue.insert(requeue.begin() + static_cast<ptrdiff_t>(first_unstarted->requeued),
                     std::move(head));
    }
  }
  worker.batches.clear();
  worker.stop.reset();
  worker.check_at_ns = INT64_MIN;
  worker.claim_slots_used = 0;
  worker.blob_bytes = 0;
  worker.port = nullptr;
  worker.accepting = false;
  requeue_front(std::move(requeue));
}

}  // namespace procpool::internal
