// Scheduler: choosing a worker for the next batch, and cutting and encoding that batch.

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "capnp/serialize.h"
#include "lib/common/clock.h"
#include "lib/scheduler/scheduler.h"
#include "lib/wire/control_page.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/shared_region.h"
#include "procpool/internal/blob_region.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {
namespace {

// A worker whose call's tasks are short (under kShortTaskNs on average, where the round trip
// between batches would be a real share of the time) gets more batches queued in its socket so it
// never sleeps between them: as many as it works through in about kQueuedWorkNs, and none behind
// a task that has already run longer than kLongRunningNs. Longer tasks are never queued behind a
// running one: queued work is work an idle worker could not take.
constexpr int64_t kShortTaskNs = 100'000;
constexpr int64_t kQueuedWorkNs = 5'000'000;
constexpr int64_t kLongRunningNs = 1'000'000;
// A batch stops growing past this many bytes of encoded jobs, however large its chunksize.
constexpr size_t kBatchByteBudget = size_t{1} << 20;
// ... or past this many bytes of blobs put in the worker's shared region.
constexpr size_t kBatchBlobBudget = size_t{16} << 20;
// First segments of this many words or more come from the SegmentPool.
constexpr size_t kPooledSegmentWords = 4096;
// No batch is queued behind others at a worker that holds this many bytes of blobs already.
constexpr size_t kQueuedBlobBudget = size_t{16} << 20;

}  // namespace

int Scheduler::pick_worker() {
  const Call& next = *pending_.front().call;
  size_t depth = 1;  // until the call's tasks have been timed, and for long ones
  const int64_t task_ns =
      next.observed_tasks > 0 ? next.observed_busy_ns / next.observed_tasks : kShortTaskNs;
  if (task_ns < kShortTaskNs) {
    // A batch is chunksize tasks, or fewer where a byte budget cut it: as the last one was.
    size_t batch_tasks = std::max<size_t>(1, next.settings().chunksize);
    if (next.last_batch_tasks > 0) batch_tasks = std::min(batch_tasks, next.last_batch_tasks);
    const int64_t batch_ns = task_ns * static_cast<int64_t>(batch_tasks);
    depth = batch_ns <= 0 ? config_.max_batches_per_worker
                          : std::clamp<size_t>(1 + kQueuedWorkNs / batch_ns, 1,
                                               config_.max_batches_per_worker);
  }
  depth = std::min(depth, config_.max_batches_per_worker);
  const int64_t now = depth > 1 ? monotonic_now_ns() : 0;
  int best = -1;
  int suspect = -1;  // a worker whose work was taken back for stalling: only if no other can
  for (int slot = 0; slot < static_cast<int>(workers_.size()); ++slot) {
    const Worker& worker = workers_[slot];
    if (!worker.accepting) continue;
    if (config_.max_tasks_per_worker > 0 && worker.tasks_assigned >= config_.max_tasks_per_worker) {
      continue;
    }
    // The claim slot the next batch would take must be free (a batch taken back whole may leave
    // gaps: slots are the batch's number mod kClaimSlots).
    const ClaimMask next_slot = ClaimMask{1} << (worker.batches_sent % ControlPage::kClaimSlots);
    if (worker.claim_slots_used & next_slot) continue;
    if (worker.suspect) {
      if (worker.batches.empty()) suspect = slot;
      continue;
    }
    if (worker.batches.empty()) return slot;
    if (worker.batches.size() >= depth) continue;
    // Large payloads are not queued deep: what waits in a worker's shared region waits in memory
    // (and a region that stays small stays in memory: shared_region.h).
    if (worker.blob_bytes >= kQueuedBlobBudget) continue;
    if (best >= 0 && workers_[best].batches.size() <= worker.batches.size()) continue;
    const WorkerProgress progress = worker.port->progress();
    const bool running_long = progress.running && now - progress.started_ns > kLongRunningNs;
    if (!running_long) best = slot;
  }
  return best >= 0 ? best : suspect;
}

// send_batch in four steps: how many tasks to try (batch_size), the frame built for as many as
// fit the limits (build_batch), the queue advanced past them (and past a job that cannot be
// sent, which fails alone), and the batch handed to the worker (hand_over).
void Scheduler::send_batch(int slot, bool awaited) {
  Worker& worker = workers_[slot];
  TaskRange& range = pending_.front();
  size_t job_words = 8;
  const size_t want = batch_size(worker, range, job_words);
  BatchFrame frame = build_batch(worker, range, awaited, want, job_words);

  if (frame.unencodable) {
    // It fails alone; the batch ends before it.
    range.call->on_error(range.first + frame.taken, *frame.unencodable);
    ++tasks_failed_;
  }
  if (frame.taken > 0) range.call->last_batch_tasks = frame.taken;
  TaskRange sent{range.call, range.first, frame.taken, range.attempt, range.number,
                 range.unplaced_losses, range.publish_each};
  const size_t consumed = frame.taken + (frame.unencodable ? 1 : 0);
  range.first += consumed;
  range.number += consumed;
  range.count -= consumed;
  range.unplaced_losses = 0;  // it counts for task `first` only
  if (range.count == 0) pending_.pop_front();  // `range` is gone
  if (frame.taken == 0) {
    if (SharedRegion* region = frame.region) region->release_batch(frame.seq);
    return;
  }
  hand_over(worker, std::move(sent), std::move(frame));
}

size_t Scheduler::batch_size(const Worker& worker, const TaskRange& range, size_t& job_words) {
  size_t want = std::min(range.count, std::max<size_t>(1, range.call->settings().chunksize));
  want = std::min<size_t>(want, ControlPage::kMaxBatchTasks);
  if (config_.max_tasks_per_worker > 0) {
    want = std::min<size_t>(want, config_.max_tasks_per_worker - worker.tasks_assigned);
  }

  // Size the batch before building it (shrinking a Cap'n Proto list in place is slow): from one
  // job's encoded size, as many as fit the byte budget. One task needs no sizing.
  const bool packed = range.call->packs_jobs();
  const bool borrow = packed && worker.port->can_borrow();
  // Blobs (large byte strings) of the jobs go to the worker's shared region where it has one.
  SharedRegion* const region = packed ? nullptr : worker.port->shared_region();
  job_words = 8;
  const size_t budget = std::min(kBatchByteBudget, config_.max_frame_bytes / 2);
  if (packed) {
    want = std::clamp<size_t>(budget / sizeof(capnp::word), 1, want);
    job_words = borrow ? 0 : 1;  // borrowed words are not in the builder's segments
  } else if (want > 1) {
    // Sized, not built: the blobs of the job are counted, never copied (blob_region.h).
    capnp::MallocMessageBuilder probe(64);
    BlobContext sizing{.message = &probe,
                       .region = region != nullptr ? &region->parent() : nullptr,
                       .sizing = true};
    BlobScope scope(&sizing);
    try {
      range.call->encode_job(range.first, probe.initRoot<wire::Value>());
      job_words = probe.sizeInWords() + sizing.sized_bytes / sizeof(capnp::word);
      want = std::clamp<size_t>(budget / (job_words * sizeof(capnp::word)), 1, want);
    } catch (...) {
      want = 1;  // the build below reports it
    }
  }
  return want;
}

Scheduler::BatchFrame Scheduler::build_batch(Worker& worker, const TaskRange& range, bool awaited,
                                             size_t want, size_t job_words) {
  const bool packed = range.call->packs_jobs();
  const bool borrow = packed && worker.port->can_borrow();
  SharedRegion* const region = packed ? nullptr : worker.port->shared_region();
  BatchFrame frame;
  frame.region = region;
  const uint64_t seq = frame.seq = next_seq_++;
  const uint32_t claim_slot = frame.claim_slot =
      static_cast<uint32_t>(worker.batches_sent % ControlPage::kClaimSlots);
  const uint16_t claim_tag = frame.claim_tag = static_cast<uint16_t>(worker.batches_sent);
  const CallSettings& settings = range.call->settings();
  const absl::Duration timeout = frame.timeout =
      settings.has_task_timeout ? settings.task_timeout : config_.task_timeout;
  std::unique_ptr<capnp::MallocMessageBuilder>& message = frame.message;
  size_t& taken = frame.taken;
  std::optional<absl::Status>& unencodable = frame.unencodable;  // the job right after the batch
  BlobContext blobs{.region = region != nullptr ? &region->parent() : nullptr};
  BlobScope blob_scope(&blobs);
  if (region != nullptr) region->begin_batch(seq);
  while (true) {
    // A first segment the batch fits in: the default (8 KiB, zeroed) costs a small task dearly.
    const auto first_segment =
        static_cast<unsigned>(std::min<size_t>(24 + want * job_words, size_t{1} << 20));
    if (borrow) {
      // The frame references the call's jobs in place; the frame keeps the call (and so jobs it
      // owns) alive, and PoolCore::release_borrowed copies what is unsent before a caller's
      // array goes away.
      message = std::make_unique<BorrowingMessageBuilder>(first_segment, range.call.get(),
                                                          range.call);
    } else if (first_segment >= kPooledSegmentWords) {
      // Large: in a reused, already faulted-in buffer (frame_io.h, SegmentPool).
      message = std::make_unique<PooledMessageBuilder>(segment_pool_,
                                                       segment_pool_->take(first_segment));
    } else {
      message = std::make_unique<capnp::MallocMessageBuilder>(first_segment);
    }
    blobs.message = message.get();  // the region is for this message's jobs only
    auto tasks = message->initRoot<wire::ToWorker>().initTasks();
    // A timeout makes the worker stamp every task's start; a remote worker's relay watches it.
    if (timeout != absl::InfiniteDuration()) tasks.setTimeoutNs(to_ns(timeout));
    if (settings.soft_timeout != absl::InfiniteDuration()) {
      tasks.setSoftTimeoutNs(to_ns(settings.soft_timeout));
    }
    tasks.setAttempt(static_cast<uint32_t>(range.attempt));
    if (range.publish_each) tasks.setPublishEach(true);
    tasks.setAwaited(awaited);
    tasks.setSeq(seq);
    tasks.setClaimSlot(claim_slot);
    tasks.setClaimTag(claim_tag);
    tasks.setTrampoline(range.call->settings().trampoline);
    tasks.setFunction(range.call->settings().function);
    taken = 0;
    bool failed_here = false;
    if (packed) {
      range.call->encode_job_words(range.first, want, tasks, message->getOrphanage(), borrow);
      taken = want;
    }
    auto jobs = tasks.initJobs(packed ? 0 : static_cast<unsigned>(want));
    while (taken < want) {
      if (taken > 0 && blobs.region_bytes >= kBatchBlobBudget) {
        // Enough in the region for one batch: the rest go in the next (it may be another
        // worker's). Rebuilt with fewer jobs, as for a frame over the limit.
        break;
      }
      try {
        range.call->encode_job(range.first + taken, jobs[taken]);
      } catch (...) {
        unencodable = absl::InvalidArgumentError(
            absl::StrCat("could not encode the job: ", describe_current_exception()));
        failed_here = true;
        break;
      }
      ++taken;
    }
    // Every rebuild starts from an empty region share: the blobs are put again as the jobs are
    // encoded again.
    const auto start_over = [&] {
      if (region != nullptr) region->release_batch(seq);
      blobs.region_bytes = 0;
    };
    if (failed_here) {
      if (taken == 0) break;
      want = taken;  // build again without it (and what follows); it fails alone below
      start_over();
      continue;
    }
    if (taken < want) {
      want = taken;  // cut at the blob budget: build again with the jobs that fit
      unencodable.reset();  // no longer right after the batch: a later batch meets it again
      start_over();
      continue;
    }
    // A frame the worker would refuse: send fewer jobs, or fail a job too big on its own. Blobs in
    // the region count as if they were in the frame.
    const size_t frame_bytes =
        capnp::computeSerializedSizeInWords(*message) * sizeof(capnp::word) + blobs.region_bytes;
    if (frame_bytes <= config_.max_frame_bytes) break;
    if (want == 1) {
      taken = 0;
      unencodable = absl::ResourceExhaustedError(absl::StrFormat(
          "the job encodes to a frame of %d bytes, over max_frame_bytes (%d)", frame_bytes,
          config_.max_frame_bytes));
      break;
    }
    want = want / 2;
    unencodable.reset();  // no longer right after the batch: a later batch meets it again
    start_over();
  }
  frame.blob_bytes = blobs.region_bytes;
  return frame;
}

void Scheduler::hand_over(Worker& worker, TaskRange sent, BatchFrame frame) {
  Batch batch;
  batch.seq = frame.seq;
  batch.claim_slot = frame.claim_slot;
  batch.claim_tag = frame.claim_tag;
  batch.tasks = std::move(sent);
  batch.limit = static_cast<uint32_t>(frame.taken);
  batch.timeout = frame.timeout;
  batch.soft_timeout = batch.tasks.call->settings().soft_timeout;
  batch.blob_bytes = frame.blob_bytes;
  worker.blob_bytes += batch.blob_bytes;
  batch.sent_ns = monotonic_now_ns();
  if (worker.batches.empty()) {
    batch.front_since_ns = batch.sent_ns;
    worker.stall_taken_back = false;
  }
  ++worker.batches_sent;
  worker.claim_slots_used |= ClaimMask{1} << frame.claim_slot;
  worker.tasks_assigned += static_cast<int64_t>(frame.taken);
  worker.port->open_claims(frame.claim_slot, frame.claim_tag, batch.limit);
  worker.batches.push_back(std::move(batch));
  worker.check_at_ns = INT64_MIN;
  const bool large = dynamic_cast<const PooledMessageBuilder*>(frame.message.get()) != nullptr;
  worker.port->send(std::move(frame.message));  // dispatch() flushes
  // A large frame goes out now: its buffer returns to the pool as soon as the socket has taken it,
  // for the next batch of this dispatch (a write per megabyte costs nothing).
  if (large) worker.port->flush();
}

}  // namespace procpool::internal
