#include "lib/worker/task_server.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/common/clock.h"
#include "lib/worker/child_setup.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/protocol.capnp.h"

namespace procpool::internal {
namespace {

// A worker sends finished results early when a batch has run this long since the last send, so
// the parent learns of progress (and loses little if the worker dies) without a write per task.
constexpr int64_t kFlushIntervalNs = 2'000'000;
// The result of a task that took this long is sent at once: a write costs little next to it,
// and a crash of the worker later cannot lose it.
constexpr int64_t kSendAtOnceNs = 200'000;
// The most outcomes one result frame carries (a packed one: results).
constexpr uint32_t kMaxPieceOutcomes = 4096;
constexpr uint32_t kMaxPackedPieceResults = 65536;
// A piece is sent once it holds this many bytes, whatever else says.
constexpr size_t kPieceByteBudget = size_t{1} << 20;
// Packed tasks are claimed in strides sized to take about this long, so a claim (an atomic
// compare-and-swap) costs little per task while a revocation still stops the worker within about
// this time.
constexpr int64_t kClaimStrideNs = 20'000;
constexpr uint32_t kMaxClaimStride = 1024;

size_t frame_bytes(capnp::MessageBuilder& message) {
  return capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word);
}

absl::Status too_big(size_t bytes, size_t limit) {
  return absl::ResourceExhaustedError(absl::StrFormat(
      "the result encodes to a frame of %d bytes, over max_frame_bytes (%d)", bytes, limit));
}

// The bookkeeping around each task of a batch: the control page's stamps, the task's time, and
// whether the results held so far must go out. (One clock read per task: a task's end is the
// next one's start.)
template <int64_t (*kNow)()>
class TaskPacer {
 public:
  TaskPacer(ControlPage& page, uint64_t seq)
      : page_(page), seq_(seq), started_(kNow()), last_send_(started_) {}

  void begin(uint32_t index) {
    page_.batch_seq.store(seq_, std::memory_order_relaxed);
    page_.task_index.store(index, std::memory_order_relaxed);
    page_.started_ns.store(started_, std::memory_order_relaxed);
    page_.running.store(1, std::memory_order_release);
  }

  // Ends the task begun last. True if the results held so far should be sent now.
  bool end() {
    page_.running.store(0, std::memory_order_release);
    // The worker is the only writer: a plain read-modify-write, not a locked one.
    page_.tasks_done.store(page_.tasks_done.load(std::memory_order_relaxed) + 1,
                           std::memory_order_relaxed);
    const int64_t now = kNow();
    const int64_t busy = now - started_;
    started_ = now;
    page_.busy_ns.store(page_.busy_ns.load(std::memory_order_relaxed) + busy,
                        std::memory_order_relaxed);
    unsent_busy_ns_ += busy;
    return now - last_send_ >= kFlushIntervalNs || busy >= kSendAtOnceNs;
  }

  // Time spent on the tasks since the last send; call when sending.
  int64_t take_busy_ns() { return std::exchange(unsent_busy_ns_, 0); }
  // After a send: the time it took is not the next task's.
  void sent() { started_ = last_send_ = kNow(); }

 private:
  ControlPage& page_;
  uint64_t seq_;
  int64_t started_;
  int64_t last_send_;
  int64_t unsent_busy_ns_ = 0;
};

// Claims of one batch, taken before each task (or stride of packed tasks).
class Claims {
 public:
  Claims(ControlPage& page, wire::TaskBatch::Reader batch, uint32_t count)
      : page_(page), slot_(batch.getClaimSlot()), tag_(batch.getClaimTag()) {
    if (page.worker_opens_claims.load(std::memory_order_relaxed) != 0) {
      open_claims_on_arrival(page, slot_, tag_, count);
    }
  }

  // True if task `index` (the next in order) may start.
  bool may_start(uint32_t index, uint32_t stride = 1) {
    if (index < claimed_until_) return true;
    const uint32_t got = claim_tasks(page_, slot_, tag_, index, stride);
    claimed_until_ = index + got;
    return got > 0;
  }

 private:
  ControlPage& page_;
  uint32_t slot_;
  uint16_t tag_;
  uint32_t claimed_until_ = 0;
};

// Runs the tasks of one batch in order, sending their outcomes in one or more frames.
class BatchRunner {
 public:
  BatchRunner(WorkerBody& body, WorkerTransport& transport, ControlPage& page,
              size_t max_frame_bytes)
      : body_(body), transport_(transport), page_(page), max_frame_bytes_(max_frame_bytes),
        piece_budget_(std::min(kPieceByteBudget, max_frame_bytes / 2)) {}

  // False when the parent is gone.
  bool run(wire::TaskBatch::Reader batch) {
    page_.timeout_ns.store(batch.getTimeoutNs(), std::memory_order_relaxed);
    return batch.hasPackedJobs() ? run_packed(batch) : run_listed(batch);
  }

 private:
  bool run_listed(wire::TaskBatch::Reader batch) {
    const auto jobs = batch.getJobs();
    const uint32_t count = jobs.size();
    seq_ = batch.getSeq();
    first_unsent_ = 0;
    Claims claims(page_, batch, count);
    TaskPacer<monotonic_now_ns> pacer(page_, seq_);
    start_listed_piece(count);
    uint32_t i = 0;
    for (; i < count && claims.may_start(i); ++i) {
      pacer.begin(i);
      body_.run(batch, jobs[i], outcomes_[i - first_unsent_]);
      const bool due = pacer.end();
      const uint32_t in_piece = i + 1 - first_unsent_;
      const size_t bytes = frame_bytes(*message_);
      if (bytes > max_frame_bytes_) {
        if (!send_oversized(in_piece, pacer)) return false;
        if (i + 1 < count) start_listed_piece(count);
        continue;
      }
      if (i + 1 == count || in_piece == outcomes_.size() || due || bytes >= piece_budget_) {
        if (!send_listed(in_piece, pacer)) return false;
        if (i + 1 < count) start_listed_piece(count);
      }
    }
    // Taken back before task i: what ran and was not sent goes now.
    if (i < count && i > first_unsent_) return send_listed(i - first_unsent_, pacer);
    return true;
  }

  void start_listed_piece(uint32_t count) {
    const uint32_t entries = std::min(count - first_unsent_, kMaxPieceOutcomes);
    // A first segment sized for small results (the default 8 KiB is zeroed on every piece).
    message_ = std::make_unique<capnp::MallocMessageBuilder>(16 + 6 * entries);
    results_ = message_->initRoot<wire::FromWorker>().initResults();
    results_.setSeq(seq_);
    results_.setStart(first_unsent_);
    outcomes_ = results_.initOutcomes(entries);
  }

  template <typename Pacer>
  bool send_listed(uint32_t in_piece, Pacer& pacer) {
    results_.setCount(in_piece);
    results_.setBusyNs(static_cast<uint64_t>(pacer.take_busy_ns()));
    if (!transport_.send(*message_)) return false;
    first_unsent_ += in_piece;
    pacer.sent();
    return true;
  }

  // The piece outgrew max_frame_bytes with its last outcome: the ones before it go in a frame of
  // their own, then that one alone, or its error if even alone it is too big.
  template <typename Pacer>
  bool send_oversized(uint32_t in_piece, Pacer& pacer) {
    auto copy = [&](uint32_t from, uint32_t n, std::unique_ptr<capnp::MallocMessageBuilder>& out) {
      out = std::make_unique<capnp::MallocMessageBuilder>();
      auto results = out->initRoot<wire::FromWorker>().initResults();
      results.setSeq(seq_);
      results.setStart(first_unsent_ + from);
      results.setCount(n);
      auto listed = results.initOutcomes(n);
      for (uint32_t j = 0; j < n; ++j) listed.setWithCaveats(j, outcomes_[from + j].asReader());
      return results;
    };
    std::unique_ptr<capnp::MallocMessageBuilder> head;
    const uint32_t before = in_piece - 1;
    if (before > 0) {
      copy(0, before, head);
      if (!transport_.send(*head)) return false;
    }
    std::unique_ptr<capnp::MallocMessageBuilder> last;
    auto alone = copy(before, 1, last);
    alone.setBusyNs(static_cast<uint64_t>(pacer.take_busy_ns()));
    if (const size_t bytes = frame_bytes(*last); bytes > max_frame_bytes_) {
      // Its error goes instead, in a builder of its own (this one still holds the value).
      capnp::MallocMessageBuilder small(64);
      auto results = small.initRoot<wire::FromWorker>().initResults();
      results.setSeq(seq_);
      results.setStart(first_unsent_ + before);
      results.setCount(1);
      set_error(results.initOutcomes(1)[0], too_big(bytes, max_frame_bytes_));
      if (!transport_.send(small)) return false;
    } else if (!transport_.send(*last)) {
      return false;
    }
    first_unsent_ += in_piece;
    pacer.sent();
    return true;
  }

  // Scalar jobs and results travel as one packed list each (TaskBatch.packedJobs): only failures
  // get an entry of their own. Tasks are timed with the coarse clock (a few ns to read, a few ms
  // resolution): task timeouts and the send-at-once rule for slow tasks work at that resolution.
  bool run_packed(wire::TaskBatch::Reader batch) {
    const PackedReader jobs(batch.getPackedJobs());
    const uint32_t count = jobs.size();
    seq_ = batch.getSeq();
    first_unsent_ = 0;
    const uint32_t max_entries = static_cast<uint32_t>(std::clamp<size_t>(
        (max_frame_bytes_ - 512) / sizeof(capnp::word), 1, kMaxPackedPieceResults));
    Claims claims(page_, batch, count);
    TaskPacer<coarse_now_ns> pacer(page_, seq_);
    uint32_t stride = 1;
    uint32_t stride_end = 0;
    int64_t stride_started = 0;

    uint32_t entries = 0;
    PackedWriter values;
    errors_.clear();
    auto start_piece = [&] {
      entries = std::min(count - first_unsent_, max_entries);
      message_ = std::make_unique<capnp::MallocMessageBuilder>(32 + entries);
      results_ = message_->initRoot<wire::FromWorker>().initResults();
      results_.setSeq(seq_);
      results_.setStart(first_unsent_);
      values = body_.init_packed_results(results_.initPackedResults(), entries);
      errors_.clear();
    };
    auto send_piece = [&](uint32_t in_piece) {
      results_.setCount(in_piece);
      results_.setBusyNs(static_cast<uint64_t>(pacer.take_busy_ns()));
      if (!errors_.empty()) {
        auto listed = results_.initErrors(static_cast<uint32_t>(errors_.size()));
        for (uint32_t e = 0; e < errors_.size(); ++e) {
          listed[e].setIndex(errors_[e].first);
          status_to_wire(errors_[e].second, listed[e].initError());
        }
      }
      if (!transport_.send(*message_)) return false;
      first_unsent_ += in_piece;
      pacer.sent();
      return true;
    };
    start_piece();

    uint32_t i = 0;
    for (; i < count; ++i) {
      if (i >= stride_end) {
        // Size the next stride from how long the last one took.
        if (stride_end > 0) {
          const int64_t took = monotonic_now_ns() - stride_started;
          if (took < kClaimStrideNs / 2) stride = std::min(stride * 2, kMaxClaimStride);
          if (took > kClaimStrideNs * 2) stride = std::max<uint32_t>(stride / 2, 1);
        }
        if (!claims.may_start(i, stride)) break;
        stride_end = i + stride;
        stride_started = monotonic_now_ns();
      } else if (!claims.may_start(i)) {
        break;
      }
      pacer.begin(i);
      absl::Status ran = body_.run_packed(jobs, i, values, i - first_unsent_);
      if (!ran.ok()) errors_.emplace_back(i - first_unsent_, std::move(ran));
      const bool due = pacer.end();
      const uint32_t in_piece = i + 1 - first_unsent_;
      if (i + 1 == count || in_piece == entries || due) {
        if (!send_piece(in_piece)) return false;
        if (i + 1 < count) start_piece();
      }
    }
    if (i < count && i > first_unsent_) return send_piece(i - first_unsent_);
    return true;
  }

  WorkerBody& body_;
  WorkerTransport& transport_;
  ControlPage& page_;
  const size_t max_frame_bytes_;
  const size_t piece_budget_;
  uint64_t seq_ = 0;
  uint32_t first_unsent_ = 0;
  std::unique_ptr<capnp::MallocMessageBuilder> message_;
  wire::ResultBatch::Builder results_ = nullptr;
  capnp::List<wire::Outcome>::Builder outcomes_ = nullptr;
  std::vector<std::pair<uint32_t, absl::Status>> errors_;
};

bool send_status_frame(WorkerTransport& transport, bool enter_failed, const absl::Status& status) {
  capnp::MallocMessageBuilder message(64);
  auto root = message.initRoot<wire::FromWorker>();
  status_to_wire(status, enter_failed ? root.initEnterFailed() : root.initExited());
  return transport.send(message);
}

}  // namespace

int run_worker(const WorkerBodyFactory& factory, WorkerTransport& transport, ControlPage& page,
               size_t max_frame_bytes) {
  std::unique_ptr<WorkerBody> body = factory();
  absl::Status entered = body->enter();
  if (!entered.ok()) {
    send_status_frame(transport, /*enter_failed=*/true, entered);
    return kWorkerExitEnterFailed;
  }
  {
    capnp::MallocMessageBuilder ready(16);
    ready.initRoot<wire::FromWorker>().setReady();
    if (!transport.send(ready)) return kWorkerExitOk;
  }

  BatchRunner runner(*body, transport, page, max_frame_bytes);
  while (true) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = transport.next_frame();
    // The parent died or dropped us without asking. No hooks: nobody waits for them.
    if (!frame.ok()) {
      return frame.status().code() == absl::StatusCode::kUnavailable ? kWorkerExitOk
                                                                     : kWorkerExitProtocolError;
    }
    bool shutdown = false;
    // The one place the worker parses the parent's bytes: a frame it cannot read means the parent
    // and it disagree, so it stops; the parent sees the exit.
    try {
      capnp::ReaderOptions options;
      options.traversalLimitInWords = std::max<size_t>(max_frame_bytes / sizeof(capnp::word), 1024);
      capnp::FlatArrayMessageReader message(*frame, options);
      auto request = message.getRoot<wire::ToWorker>();
      switch (request.which()) {
        case wire::ToWorker::TASKS:
          if (!runner.run(request.getTasks())) return kWorkerExitOk;  // the parent is gone
          break;
        case wire::ToWorker::SHUTDOWN:
          shutdown = true;
          break;
      }
    } catch (const kj::Exception& e) {
      std::fprintf(stderr, "[procpool worker pid %d] malformed frame from the parent: %s\n",
                   ::getpid(), e.getDescription().cStr());
      return kWorkerExitProtocolError;
    }
    if (shutdown) {
      absl::Status exited = body->exit();
      body.reset();
      send_status_frame(transport, /*enter_failed=*/false, exited);
      return exited.ok() ? kWorkerExitOk : kWorkerExitExitHookFailed;
    }
  }
}

}  // namespace procpool::internal
