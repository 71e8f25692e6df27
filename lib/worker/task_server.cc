#include "lib/worker/task_server.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "capnp/any.h"
#include "capnp/schema.h"
#include "capnp/serialize.h"
#include "kj/debug.h"
#include "kj/exception.h"
#include "lib/common/clock.h"
#include "lib/wire/frame_io.h"
#include "lib/worker/child_setup.h"
#include "lib/worker/task_context.h"
#include "procpool/codec.h"
#include "procpool/internal/blob_region.h"
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
// The most outcomes one result frame carries (a word piece: results).
constexpr uint32_t kMaxPieceOutcomes = 4096;
constexpr uint32_t kMaxWordPieceResults = 65536;
// The largest frame held back to be written with later ones (task_server.h: hold).
constexpr size_t kHoldBytes = size_t{64} << 10;
// A piece is sent once it holds this many bytes, whatever else says.
constexpr size_t kPieceByteBudget = size_t{1} << 20;
// Packed tasks are claimed in strides sized to take about this long, so a claim (an atomic
// compare-and-swap) costs little per task while a revocation still stops the worker within about
// this time.
constexpr int64_t kClaimStrideNs = 20'000;
constexpr uint32_t kMaxClaimStride = 1024;
// Word tasks that take at least this long on average get a clock read and a start stamp each
// (a few ns: a few percent of such a task); quicker ones are timed per stride. The first stride
// after tiny tasks turn slow is timed per stride: it may hold the results of the tasks in it
// until it ends, and the stall rule may see its tasks as started at the stride's start.
constexpr int64_t kPerTaskClockNs = 100;
// The most results a growing frame has room for (WorkerTransport::hold_growing): a timed word
// batch of quick tasks makes a frame per this many tasks, not one per task.
constexpr uint32_t kGrowingResults = 1024;

// Set in a process that user code forked from the worker (a task, a hook, W's constructor): see
// leave_if_forked_by_user_code.
volatile bool forked_by_user_code = false;

// A fork that user code made shares the worker's channel, held-frames area and control page. If
// it returns into this loop instead of calling _exit() or exec() (a child that forgets to, or
// throws), two processes would answer the same tasks and read the same frames: the pool saw
// results for batches the worker was not running and failed innocent tasks kDataLoss. Such a
// process leaves here, before it touches any of them, without flushing the stdio buffers it
// shares with the worker. Called after each return from user code; costs a load.
void leave_if_forked_by_user_code() {
  if (!forked_by_user_code) [[likely]] return;
  std::fprintf(stderr,
               "[procpool] process %d, forked by user code in a worker, returned into the "
               "worker's loop instead of calling _exit(); it exits\n",
               ::getpid());
  ::_exit(kWorkerExitOk);
}

// Where ResultBatch.count lies in the struct's data section, in bytes.
size_t count_field_offset() {
  static const size_t offset = capnp::Schema::from<wire::ResultBatch>()
                                   .getFieldByName("count")
                                   .getProto()
                                   .getSlot()
                                   .getOffset() *
                               sizeof(uint32_t);
  return offset;
}

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

// A worker whose batches do not come through the pool that owns its page (a remote worker) opens
// each batch's claims itself as it reads it (control_page.h). Read from the page once, before any
// of the user's code runs (run_worker): a task that overwrites the page cannot make this worker
// open, and so run, a batch the parent took back before it read it.
bool worker_opens_claims = false;

void open_claims_if_worker_opens(ControlPage& page, wire::TaskBatch::Reader batch, uint32_t count) {
  if (worker_opens_claims) {
    open_claims_on_arrival(page, batch.getClaimSlot(), batch.getClaimTag(), count);
  }
}

// Claims of one batch of listed tasks, taken before each task (word batches claim per stride).
class Claims {
 public:
  Claims(ControlPage& page, wire::TaskBatch::Reader batch, uint32_t count)
      : page_(page), slot_(batch.getClaimSlot()), tag_(batch.getClaimTag()) {
    open_claims_if_worker_opens(page, batch, count);
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
//
// A task of a batch with a timeout may be the one that gets the worker stopped (so may any task
// cancel() or a broken stream stops; those lose only results of that call or results the pool
// cannot trust): before such a task starts, the outcomes of the tasks before it are published
// (Out::kPublish), so that a value once computed reaches the caller whatever ends the worker
// afterwards. Untimed batches keep their results in pieces until a piece is due.
class BatchRunner {
 public:
  // How a piece of results goes out (deliver).
  enum class Out {
    kSend,     // written now
    kMayHold,  // held for one write with the next ones if the next batch is already read
    kPublish,  // made safe from the worker's end now: held in shared memory, or written
  };

  BatchRunner(WorkerBody& body, WorkerTransport& transport, ControlPage& page,
              size_t max_frame_bytes, SharedRegion* region)
      : body_(body), transport_(transport), page_(page), region_(region),
        max_frame_bytes_(max_frame_bytes),
        piece_budget_(std::min(kPieceByteBudget, max_frame_bytes / 2)) {}

  // False when the parent is gone.
  bool run(wire::TaskBatch::Reader batch) {
    page_.timeout_ns.store(batch.getTimeoutNs(), std::memory_order_relaxed);
    set_task_attempt(static_cast<int>(std::min<uint32_t>(batch.getAttempt(), 1u << 30)) + 1);
    return batch.hasWordJobs() ? run_words(batch) : run_listed(batch);
  }

 private:
  bool run_listed(wire::TaskBatch::Reader batch) {
    const auto jobs = batch.getJobs();
    const uint32_t count = jobs.size();
    seq_ = batch.getSeq();
    first_unsent_ = 0;
    timed_ = publishes_each(batch);
    Claims claims(page_, batch, count);
    TaskPacer<monotonic_now_ns> pacer(page_, seq_);
    start_listed_piece(count);
    uint32_t i = 0;
    for (; i < count && claims.may_start(i); ++i) {
      pacer.begin(i);
      const size_t blobs_before = blob_bytes();
      body_.run(batch, jobs[i], outcomes_[i - first_unsent_]);
      leave_if_forked_by_user_code();
      last_blob_bytes_ = blob_bytes() - blobs_before;
      piece_blob_bytes_ += last_blob_bytes_;
      const bool due = pacer.end();
      const uint32_t in_piece = i + 1 - first_unsent_;
      // Results' blobs in the region count as if they were in the frame.
      const size_t bytes = frame_bytes(*message_) + piece_blob_bytes_;
      if (bytes > max_frame_bytes_) {
        if (!send_oversized(in_piece, pacer)) return false;
        if (i + 1 < count) start_listed_piece(count);
        continue;
      }
      if (i + 1 == count || in_piece == outcomes_.size() || due || bytes >= piece_budget_ ||
          timed_) {
        if (!send_listed(in_piece, pacer, piece_out(i + 1 == count, due))) return false;
        if (i + 1 < count) start_listed_piece(count);
      }
    }
    // Taken back before task i: what ran and was not sent goes now.
    if (i < count && i > first_unsent_) return send_listed(i - first_unsent_, pacer);
    return true;
  }

  // Bytes this worker has put in its region so far (0 without one).
  static size_t blob_bytes() {
    const BlobContext* context = current_blob_context();
    return context == nullptr ? 0 : context->region_bytes;
  }

  void start_listed_piece(uint32_t count) {
    piece_blob_bytes_ = 0;
    // A timed batch's pieces hold one outcome each (piece_out).
    const uint32_t entries = timed_ ? 1 : std::min(count - first_unsent_, kMaxPieceOutcomes);
    // A first segment sized for small results (the default 8 KiB is zeroed on every piece).
    message_ = std::make_unique<capnp::MallocMessageBuilder>(16 + 6 * entries);
    // Results' blobs go to the region only from this piece's message (blob_region.h).
    if (BlobContext* context = current_blob_context()) context->message = message_.get();
    results_ = message_->initRoot<wire::FromWorker>().initResults();
    results_.setSeq(seq_);
    results_.setStart(first_unsent_);
    outcomes_ = results_.initOutcomes(entries);
  }

  template <typename Pacer>
  bool send_listed(uint32_t in_piece, Pacer& pacer, Out out = Out::kSend) {
    results_.setCount(in_piece);
    results_.setBusyNs(static_cast<uint64_t>(pacer.take_busy_ns()));
    mark_blobs(results_);
    if (!deliver(*message_, out)) return false;
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
      mark_blobs(results);
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
    if (const size_t bytes = frame_bytes(*last) + last_blob_bytes_; bytes > max_frame_bytes_) {
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

  // Scalar jobs and results travel as one blob of words each (TaskBatch.wordJobs): the body's
  // typed loop runs a stride of tasks per call, reading each job and writing its result in place
  // (in the receive buffer when the transport allows, else in a reused buffer), and the results
  // go back as an external segment over that memory. Per task, the loop stores only the task's
  // index in the control page (crash attribution stays exact); claims, the running flag, the
  // start stamp, the counters and the clock are per stride, whose length adapts to take about
  // kClaimStrideNs. A batch with a timeout stamps every task's start too (coarse clock), so
  // timeouts are measured from the task's own start as before.
  bool run_words(wire::TaskBatch::Reader batch) {
    uint32_t count = 0;
    const uint64_t* jobs = words_of(batch.getWordJobs(), count);
    KJ_REQUIRE(jobs != nullptr || batch.getWordJobs().size() == 0,
               "wordJobs is not a whole number of aligned words");
    seq_ = batch.getSeq();
    first_unsent_ = 0;
    const wire::WordKind kind = batch.getWordKind();
    const wire::WordKind result_kind = body_.result_word_kind();
    uint64_t* results = nullptr;
    if (transport_.frames_writable()) {
      // The frame is this process's own buffer until the next frame is read.
      results = const_cast<uint64_t*>(jobs);
    } else {
      if (scratch_.size() < count) scratch_.resize(count);
      results = scratch_.data();
    }
    const uint32_t max_entries = static_cast<uint32_t>(std::clamp<size_t>(
        (std::max<size_t>(max_frame_bytes_, 2048) - 1024) / sizeof(capnp::word), 1,
        kMaxWordPieceResults));
    const uint32_t claim_slot = batch.getClaimSlot();
    const uint16_t claim_tag = batch.getClaimTag();
    open_claims_if_worker_opens(page_, batch, count);
    timed_ = publishes_each(batch);
    grown_ = 0;
    errors_.clear();
    error_bytes_ = 0;
    int64_t last_send = monotonic_now_ns();
    int64_t unsent_busy = 0;
    page_.batch_seq.store(seq_, std::memory_order_relaxed);

    uint32_t i = 0;
    uint32_t claimed_until = 0;
    while (i < count) {
      if (i >= claimed_until) {
        // A timed batch runs one task per stride: its result goes out before the next starts.
        const uint32_t want =
            timed_ ? 1 : std::min({stride_, count - i, first_unsent_ + max_entries - i});
        const uint32_t got = claim_tasks(page_, claim_slot, claim_tag, i, want);
        if (got == 0) break;  // the parent took the rest back
        claimed_until = i + got;
      }
      // Tasks that take a while get each its own stamp and clock read (cheap next to them), so a
      // slow one's result, and those before it, go out as soon as it ends; tiny ones only their
      // index (see WordStamps).
      const bool per_task = timed_ || per_task_clock_;
      const int64_t start = monotonic_now_ns();
      page_.task_index.store(i, std::memory_order_relaxed);
      page_.started_ns.store(start, std::memory_order_relaxed);
      page_.running.store(1, std::memory_order_release);
      const WordStamps stamps{&page_.task_index, per_task ? &page_.started_ns : nullptr,
                              coarse_now_ns, per_task ? coarse_now_ns() : 0, kSendAtOnceNs};
      const size_t errors_before = errors_.size();
      const uint32_t ran =
          body_.run_words(jobs, kind, results, i, claimed_until, stamps, errors_);
      leave_if_forked_by_user_code();
      page_.running.store(0, std::memory_order_release);
      const int64_t end = monotonic_now_ns();
      const int64_t took = end - start;
      const uint32_t n = ran - i;
      const bool cut = ran < claimed_until;
      i = ran;
      // The worker is the only writer of these: plain read-modify-writes, not locked ones.
      page_.tasks_done.store(page_.tasks_done.load(std::memory_order_relaxed) + n,
                             std::memory_order_relaxed);
      page_.busy_ns.store(page_.busy_ns.load(std::memory_order_relaxed) + took,
                          std::memory_order_relaxed);
      unsent_busy += took;
      for (size_t e = errors_before; e < errors_.size(); ++e) {
        error_bytes_ += errors_[e].second.message().size() + 16;
      }
      if (n > 0) per_task_clock_ = took / n >= kPerTaskClockNs;
      if (took < kClaimStrideNs / 2) {
        stride_ = std::min(stride_ * 2, kMaxClaimStride);
      } else if (took > kClaimStrideNs * 2) {
        // In proportion, at least halved: one slow stride brings it down at once.
        stride_ = static_cast<uint32_t>(std::clamp<int64_t>(int64_t{stride_} * kClaimStrideNs / took,
                                                            1, std::max<uint32_t>(stride_ / 2, 1)));
      }
      const uint32_t in_piece = i - first_unsent_;
      if (i == count || in_piece == max_entries || end - last_send >= kFlushIntervalNs ||
          took >= kSendAtOnceNs || cut || error_bytes_ >= piece_budget_ || timed_) {
        const Out out = piece_out(i == count, took >= kSendAtOnceNs ||
                                                  (i < count && end - last_send >= kFlushIntervalNs));
        if (out == Out::kPublish && errors_.empty()) {
          if (!publish_words(results, result_kind, i, count, max_entries, unsent_busy)) {
            return false;
          }
        } else {
          close_growing();
          const uint32_t n = i - first_unsent_;
          if (n > 0 && !send_words(results, result_kind, n, unsent_busy, out)) return false;
          unsent_busy = 0;
        }
        last_send = monotonic_now_ns();
      }
    }
    // Taken back before task i: what ran and was not sent goes now.
    close_growing();
    if (i > first_unsent_) return send_words(results, result_kind, i - first_unsent_, unsent_busy);
    return true;
  }

  // Makes the results of tasks [first_unsent_, i) safe before the next task starts (Out::kPublish)
  // at the cost of a few stores each: they grow the frame held last, in place, or begin a new
  // growing frame with room for the rest of the batch (up to kGrowingResults). Where nothing can
  // be held (a remote worker) they are sent. `busy_ns` goes with the next frame made.
  bool publish_words(const uint64_t* results, wire::WordKind kind, uint32_t i, uint32_t count,
                     uint32_t max_entries, int64_t& busy_ns) {
    uint32_t n = i - first_unsent_;
    if (grown_ > 0) {
      if (n <= growing_room_ &&
          transport_.grow(n, results + first_unsent_ + grown_, grown_, n - grown_)) {
        grown_ = n;
        return true;
      }
      close_growing();  // the parent has what it counted, or will
      n = i - first_unsent_;
    }
    if (n == 0) return true;
    if (!can_grow_) {
      const bool sent = send_words(results, kind, n, busy_ns, Out::kSend);
      busy_ns = 0;
      return sent;
    }
    const uint32_t room = std::max(n, std::min({kGrowingResults, count - first_unsent_, max_entries}));
    capnp::MallocMessageBuilder message(room + 32);
    auto piece = init_word_piece(message, kind, n, busy_ns);
    auto words = piece.initWordResults(size_t{room} * sizeof(uint64_t));
    std::memcpy(words.begin(), results + first_unsent_, size_t{n} * sizeof(uint64_t));
    const kj::ArrayPtr<kj::byte> fields = capnp::toAny(piece).getDataSection();
    if (fields.size() >= count_field_offset() + sizeof(uint32_t) &&
        transport_.hold_growing(message, fields.begin() + count_field_offset(),
                                reinterpret_cast<const uint64_t*>(words.begin()), room)) {
      grown_ = n;
      growing_room_ = room;
      busy_ns = 0;
      return true;
    }
    can_grow_ = false;  // nowhere to hold it: from now on each result is sent
    const bool sent = send_words(results, kind, n, busy_ns, Out::kSend);
    busy_ns = 0;
    return sent;
  }

  // A word-results piece for tasks [first_unsent_, first_unsent_ + n), its words left to the caller.
  wire::ResultBatch::Builder init_word_piece(capnp::MessageBuilder& message, wire::WordKind kind,
                                             uint32_t n, int64_t busy_ns) {
    auto piece = message.initRoot<wire::FromWorker>().initResults();
    piece.setSeq(seq_);
    piece.setStart(first_unsent_);
    piece.setCount(n);
    piece.setBusyNs(static_cast<uint64_t>(busy_ns));
    piece.setWordKind(kind);
    return piece;
  }

  // The growing frame takes no more results: those it counts are sent.
  void close_growing() {
    first_unsent_ += grown_;
    grown_ = 0;
  }

  // Sends the results of tasks [first_unsent_, first_unsent_ + n): their words in place (an
  // external segment: the kernel copies them from `results`), and the failures among them.
  bool send_words(const uint64_t* results, wire::WordKind kind, uint32_t n, int64_t busy_ns,
                  Out out = Out::kSend) {
    capnp::MallocMessageBuilder message(64);
    auto piece = init_word_piece(message, kind, n, busy_ns);
    piece.adoptWordResults(message.getOrphanage().referenceExternalData(capnp::Data::Reader(
        reinterpret_cast<const kj::byte*>(results + first_unsent_), size_t{n} * sizeof(uint64_t))));
    if (!errors_.empty()) {
      auto listed = piece.initErrors(static_cast<uint32_t>(errors_.size()));
      for (uint32_t e = 0; e < errors_.size(); ++e) {
        listed[e].setIndex(errors_[e].first - first_unsent_);
        status_to_wire(errors_[e].second, listed[e].initError());
      }
    }
    if (!deliver(message, out)) return false;
    first_unsent_ += n;
    errors_.clear();
    error_bytes_ = 0;
    return true;
  }

  // How a piece goes out: `last` of its batch; `due`: written now anyway (a slow task's, or
  // the flush interval passed). The last of a quick batch may be held; in a timed batch, one
  // that another task follows is published.
  Out piece_out(bool last, bool due) const {
    if (due) return Out::kSend;
    if (last) return Out::kMayHold;
    return timed_ ? Out::kPublish : Out::kSend;
  }

  // Sends a piece of results. kMayHold: the last piece of a quick batch may instead be held, to go
  // out in one write with the next ones, while the next batch is already read (the worker will
  // not wait for it) and no held result is older than kFlushIntervalNs. Fewer writes, and fewer
  // wake-ups of the parent, when many small batches are queued at the worker. kPublish: held if
  // the transport can hold it (shared memory, where the parent takes it while the worker runs a
  // long task and finds it if the worker dies), else written now.
  bool deliver(capnp::MessageBuilder& message, Out out) {
    if (out == Out::kPublish) return transport_.hold(message);
    if (out == Out::kMayHold && transport_.frame_buffered() && frame_bytes(message) <= kHoldBytes) {
      const int64_t since = transport_.held_since_ns();
      if (since == 0 || monotonic_now_ns() - since < kFlushIntervalNs) {
        return transport_.hold(message);
      }
    }
    return transport_.send(message);
  }

  // Every results frame says where the blobs written so far end (ResultBatch.blobsEnd): the
  // parent gives that much of the result area back once it has read the frame.
  void mark_blobs(wire::ResultBatch::Builder results) {
    if (region_ != nullptr) results.setBlobsEnd(region_->results_end());
  }

  WorkerBody& body_;
  WorkerTransport& transport_;
  ControlPage& page_;
  SharedRegion* const region_;
  const size_t max_frame_bytes_;
  const size_t piece_budget_;
  uint64_t seq_ = 0;
  uint32_t first_unsent_ = 0;
  // Each task's outcome is published before the next starts: the batch has a task timeout or a
  // soft timeout, or asks so (TaskBatch.publishEach).
  static bool publishes_each(wire::TaskBatch::Reader batch) {
    return batch.getTimeoutNs() != 0 || batch.getSoftTimeoutNs() != 0 || batch.getPublishEach();
  }
  bool timed_ = false;  // publishes_each(batch)
  uint32_t grown_ = 0;         // results from first_unsent_ in the growing frame held last
  uint32_t growing_room_ = 0;  // the room it has
  bool can_grow_ = true;       // false once the transport could not hold a growing frame
  std::unique_ptr<capnp::MallocMessageBuilder> message_;
  wire::ResultBatch::Builder results_ = nullptr;
  capnp::List<wire::Outcome>::Builder outcomes_ = nullptr;
  WordErrors errors_;
  size_t error_bytes_ = 0;             // of the messages in errors_
  size_t piece_blob_bytes_ = 0;        // the piece's results' blobs in the region
  size_t last_blob_bytes_ = 0;         // the last task's
  std::vector<uint64_t> scratch_;      // results, when the frame cannot be written in place
  uint32_t stride_ = 1;                // tasks per claim; kept across batches
  bool per_task_clock_ = true;         // the last stride's tasks took kPerTaskClockNs or more
};

bool send_status_frame(WorkerTransport& transport, bool enter_failed, const absl::Status& status) {
  capnp::MallocMessageBuilder message(64);
  auto root = message.initRoot<wire::FromWorker>();
  status_to_wire(status, enter_failed ? root.initEnterFailed() : root.initExited());
  return transport.send(message);
}

}  // namespace

namespace {

// Where procpool::log sends, while run_worker runs (one worker per process). Set before any code
// of the user's runs, so before any thread that reads it is started; read-only after that.
struct LogChannel {
  WorkerTransport* transport = nullptr;
  ControlPage* page = nullptr;
  size_t max_message_bytes = 0;
  pid_t pid = 0;
  std::thread::id task_thread;  // the thread that runs run_worker and uses the transport
};
LogChannel log_channel;

}  // namespace

bool send_worker_log(int severity, std::string_view message) {
  const LogChannel& channel = log_channel;
  if (channel.transport == nullptr || channel.pid != ::getpid()) return false;
  thread_local bool sending = false;
  if (sending) return true;
  sending = true;
  auto frame = std::make_unique<capnp::MallocMessageBuilder>(64 + message.size() / sizeof(capnp::word));
  auto log = frame->initRoot<wire::FromWorker>().initLog();
  log.setSeverity(static_cast<uint8_t>(severity));
  message = message.substr(0, channel.max_message_bytes);
  // Copied, not wrapped in a Text::Reader: a view need not end at a NUL (a piece of a longer
  // string, a message cut above), which a Reader requires (KJ checks it, throwing, in builds
  // without optimisation).
  capnp::Text::Builder text = log.initMessage(static_cast<unsigned int>(message.size()));
  std::copy(message.begin(), message.end(), text.begin());
  const ControlPage& page = *channel.page;
  log.setRunning(page.running.load(std::memory_order_acquire) != 0);
  log.setBatchSeq(page.batch_seq.load(std::memory_order_relaxed));
  log.setTaskIndex(page.task_index.load(std::memory_order_relaxed));
  // Only the task thread writes to the transport; another thread's record waits for it there.
  bool taken = true;
  if (std::this_thread::get_id() == channel.task_thread) {
    (void)channel.transport->send(*frame);
  } else {
    taken = channel.transport->post(std::move(frame));
  }
  sending = false;
  return taken;
}

int run_worker(const WorkerBodyFactory& factory, WorkerTransport& transport, ControlPage& page,
               size_t max_frame_bytes, SharedRegion* region, const absl::Status& refused) {
  // procpool::log from here on (W's constructor included) goes to the pool. The frame's other
  // fields and its framing take well under 1 KiB.
  log_channel = LogChannel{.transport = &transport,
                           .page = &page,
                           .max_message_bytes = std::min<size_t>(
                               size_t{64} << 10, max_frame_bytes > 1024 ? max_frame_bytes - 1024 : 0),
                           .pid = ::getpid(),
                           .task_thread = std::this_thread::get_id()};
  // Jobs' blobs are read where the parent left them (a Bytes job views them there: its bytes
  // stay put until the batch's results are in); results' blobs are written to the results area.
  BlobContext blobs{.region = region != nullptr ? &region->worker() : nullptr,
                    .views = true,
                    .max_blob_bytes = max_frame_bytes};
  BlobScope blob_scope(&blobs);
  bind_task_page(&page);  // this_task (this_worker.h) reads the running task's stamps there
  worker_opens_claims = page.worker_opens_claims.load(std::memory_order_relaxed) != 0;
  // This process is the worker (a pool made inside a worker forks workers of its own).
  forked_by_user_code = false;
  static const bool watching_forks =
      ::pthread_atfork(nullptr, nullptr, [] { forked_by_user_code = true; }) == 0;
  (void)watching_forks;
  if (!refused.ok()) {
    send_status_frame(transport, /*enter_failed=*/true, refused);
    return kWorkerExitEnterFailed;
  }
  std::unique_ptr<WorkerBody> body = factory();
  absl::Status entered = body->enter();
  leave_if_forked_by_user_code();
  if (!entered.ok()) {
    send_status_frame(transport, /*enter_failed=*/true, entered);
    return kWorkerExitEnterFailed;
  }
  {
    capnp::MallocMessageBuilder ready(16);
    ready.initRoot<wire::FromWorker>().setReady();
    if (!transport.send(ready)) return kWorkerExitOk;
  }

  BatchRunner runner(*body, transport, page, max_frame_bytes, region);
  while (true) {
    // Results held for one write go out before the worker would wait for the parent.
    if (!transport.frame_buffered() && !transport.flush()) return kWorkerExitOk;
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = transport.next_frame();
    // The parent died or dropped us without asking. No hooks: nobody waits for them.
    if (!frame.ok()) {
      return frame.status().code() == absl::StatusCode::kUnavailable ? kWorkerExitOk
                                                                     : kWorkerExitProtocolError;
    }
    bool shutdown = false;
    bool parent_gone = false;
    // The one place the worker parses the parent's bytes: a frame it cannot read means the parent
    // and it disagree, so it stops; the parent sees the exit.
    const absl::Status parsed = guarded("malformed frame from the parent", [&]() -> absl::Status {
      capnp::FlatArrayMessageReader message(*frame, frame_reader_options(max_frame_bytes));
      blobs.frame = *frame;  // Bytes jobs view only what lies in it (or in the region)
      auto request = message.getRoot<wire::ToWorker>();
      switch (request.which()) {
        case wire::ToWorker::TASKS:
          parent_gone = !runner.run(request.getTasks());
          if (!parent_gone) transport.expect_next_frame_soon(request.getTasks().getAwaited());
          break;
        case wire::ToWorker::SHUTDOWN:
          shutdown = true;
          break;
        default:
          // The union also carries what a pool says to a remote host (lib/link/relay.cc answers
          // it there); a parent never sends it to a worker, and one that arrives changes nothing.
          break;
      }
      return absl::OkStatus();
    });
    if (!parsed.ok()) {
      std::fprintf(stderr, "[procpool worker pid %d] %.*s\n", ::getpid(),
                   static_cast<int>(parsed.message().size()), parsed.message().data());
      return kWorkerExitProtocolError;
    }
    if (parent_gone) return kWorkerExitOk;
    if (shutdown) {
      absl::Status exited = body->exit();
      body.reset();
      leave_if_forked_by_user_code();
      send_status_frame(transport, /*enter_failed=*/false, exited);
      return exited.ok() ? kWorkerExitOk : kWorkerExitExitHookFailed;
    }
  }
}

}  // namespace procpool::internal
