// Scheduler: which task runs where and when, and what becomes of each task's outcome.
//
// It knows calls, batches, pacing, ordering, retries, cancellation and the order of shutdown; it
// reaches workers only through WorkerPort (a narrow view of a WorkerLink), and knows nothing of
// how a worker is made, what process it is, or how it is stopped.
//
// The path of a task: submit() queues it in `pending_`, as a range of a call's indices;
// dispatch() cuts the front range into a batch for a worker that can take one (pick_worker),
// encodes it (batch_encoder.cc), opens its claims and sends it; the worker's results come back to
// on_results(), which hands each outcome to its call. A task leaves the scheduler with exactly one
// outcome: a value, its own error, or the failure of what ran it (settlement.cc: the worker died,
// timed out, or its stream broke), unless it had not started: then it goes back to the front of
// the queue (a worker's death, a stalled worker's queue taken back) or fails kCancelled (its call
// was cancelled). "Had not started" is exact: the worker claims every task before it starts it,
// and the scheduler takes tasks back with the same claims (control_page.h).
//
// Threads: not thread-safe; the pool calls it with its lock held. The Call callbacks it makes run
// with that lock held too (call.h).

#ifndef PROCPOOL_LIB_SCHEDULER_SCHEDULER_H_
#define PROCPOOL_LIB_SCHEDULER_SCHEDULER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "lib/link/worker_link.h"
#include "lib/wire/control_page.h"
#include "lib/wire/frame_io.h"
#include "procpool/internal/call.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/pool_stats.h"

namespace procpool::internal {

// What the scheduler may do with a worker.
class WorkerPort {
 public:
  virtual ~WorkerPort() = default;
  virtual const std::string& name() const = 0;
  // Queues a frame; flush() writes what was queued (one write for several batches).
  virtual void send(std::unique_ptr<capnp::MessageBuilder> frame) = 0;
  virtual void flush() = 0;
  // Frames may reference memory a call lends (WorkerLink::can_borrow).
  virtual bool can_borrow() const { return false; }
  // The worker's blob region, if any (WorkerLink::shared_region).
  virtual SharedRegion* shared_region() { return nullptr; }
  virtual WorkerProgress progress() const = 0;
  virtual void open_claims(uint32_t slot, uint16_t tag, uint32_t count) = 0;
  // The answer comes to Scheduler::on_revoked, during the call or later.
  virtual void revoke(uint32_t slot, uint16_t tag) = 0;
  // Have the worker stopped: the task it runs fails with `reason` (settled by on_worker_lost).
  virtual void stop(absl::Status reason) = 0;
  // Ask tasks [from, to) of batch `seq` to stop (WorkerLink::request_stop; seq 0 withdraws).
  virtual void request_stop(uint64_t /*seq*/, uint32_t /*from*/, uint32_t /*to*/) {}
};

// How a worker was lost, for settling what it held.
struct LostWorker {
  // How it ended, for messages: in the words of its link ("worker 1 (...) was killed by ..."),
  // or, when the pool stopped it, why ("worker 1 (...) was stopped after its stream broke ...").
  std::string ended;
  // The failure of the task it was running when it ended (kAborted naming the death,
  // kDeadlineExceeded for a timeout, kCancelled for a terminate).
  absl::Status running_failure;
  // The task its stream broke on (kDataLoss): the one running then, or the one just finished;
  // and that failure.
  std::optional<std::pair<uint64_t, uint32_t>> blamed_task;  // (batch seq, index)
  absl::Status blamed_failure;
  // False when the pool stopped it on purpose (a timeout, a broken stream): running the task it
  // was running again would only repeat that. (Tasks whose results were lost with it are run
  // again under the call's retries either way: they did nothing wrong.)
  bool retry_allowed = true;
  // A connection to it failed TLS record authentication (bytes changed on the way): the tasks
  // lost with it fail kDataLoss, not kAborted (`ended` says why), and run again as after a death.
  bool corrupted = false;
  // Its last progress, read after it ended.
  WorkerProgress last;
};

class Scheduler {
 public:
  struct Config {
    int workers = 1;
    size_t max_frame_bytes = 0;
    int64_t max_tasks_per_worker = 0;  // 0: no limit
    absl::Duration task_timeout = absl::InfiniteDuration();
    absl::Duration kill_grace = absl::Seconds(1);
    // PoolOptions::cancel_grace: how long a task asked to stop may take before its worker is.
    absl::Duration cancel_grace = absl::ZeroDuration();
    // The most batches a worker may hold at once (one for links that cannot take tasks back
    // at once, TCP).
    size_t max_batches_per_worker = 64;
  };
  explicit Scheduler(Config config);
  ~Scheduler();

  // --- Calls -----------------------------------------------------------------------------------
  // Queues tasks [first, first + count) of `call` (count > 0).
  void submit(std::shared_ptr<Call> call, size_t first, size_t count);
  // The call's tasks that have not started fail with `status`; queued ones at once, ones sent to
  // a worker as soon as they are taken back (immediately for shared-memory links).
  void cancel(const Call* call, const absl::Status& status);
  // The same for every call.
  void cancel_all(const absl::Status& status);
  // Stops (through its port) every worker running a task of `call` now, with `reason` for that
  // task. With cancel(), this is AsyncResult::cancel(): nothing of the call runs on. With a
  // cancel_grace, the task is asked to stop first (ask_to_stop) and its worker is stopped only if
  // it still runs it when the grace ends. A worker whose progress comes late (TCP) and does not
  // show such a task yet is stopped once it does (check_worker).
  void stop_running(const Call* call, const absl::Status& reason);
  // Asks every task of `call` (null: of every call) that runs now, or was claimed by its worker,
  // to stop (this_task::stop_requested), without a deadline: leaving an imap loop, a signal's
  // close. Such a task that returns reports `reason` (its value is discarded).
  void ask_to_stop(const Call* call, const absl::Status& reason);
  // terminate(): every task without an outcome fails with `status` now, started or not; results
  // that arrive later are dropped.
  void abandon_all(const absl::Status& status);
  // Tasks queued, or waiting out a retry's backoff.
  bool has_pending() const { return !pending_.empty() || !delayed_.empty(); }
  // Tasks queued now (not those waiting out a backoff): the work no worker could take yet.
  size_t queued_tasks() const;
  bool work_outstanding() const;

  // --- Workers ---------------------------------------------------------------------------------
  // The pool grew a slot: slots are 0 .. slots()-1, and never go (resize() retires them instead).
  void add_slot();
  int slots() const { return static_cast<int>(workers_.size()); }
  // A worker is ready for work in `slot`, reached through `port` (which outlives its use here).
  void attach(int slot, WorkerPort* port);
  // The worker takes no new work (it is being recycled, shut down or stopped); what it holds
  // finishes. Also the state after attach until ready, and after on_worker_lost.
  void stop_accepting(int slot);
  bool accepting(int slot) const;
  // Undoes stop_accepting for an attached worker that stays (a resize took its slot back before
  // it left).
  void accept_again(int slot);
  // Nothing in flight at this worker.
  bool idle(int slot) const;
  // The number of the last batch sent to this worker that it still holds; 0 if none.
  uint64_t newest_batch(int slot) const;
  // It was given max_tasks_per_worker tasks: it should be recycled once idle.
  bool quota_used(int slot) const;

  // Gives queued tasks to workers that can take them, and writes what was sent.
  void dispatch();
  // For apply's fast path: if nothing is queued and a worker is idle, sends `call`'s one task to
  // it now and returns its slot; the caller may then read that worker's results itself.
  std::optional<int> dispatch_to_idle(std::shared_ptr<Call> call);

  // A results frame from the worker in `slot`. A non-OK status means it broke the protocol
  // (results for a batch it was not running, out of order): the pool stops it as for a bad frame.
  // `recovered`: found after the worker died (WorkerLink's held frames); results already
  // received are skipped.
  absl::Status on_results(int slot, wire::ResultBatch::Reader results, bool recovered = false);
  // The answer to a revoke.
  void on_revoked(int slot, uint32_t claim_slot, uint16_t tag, uint32_t claimed);
  // Takes back every task the worker in `slot` holds and has not started (the stall rule, its
  // host is leaving, a resize retired it): they go back to the front of the queue, on the same attempt, when the
  // worker's answer comes (during the call for shared-memory links).
  void take_back_unstarted(int slot);
  // The worker in `slot` is gone: settles every task it held (settlement.cc), and detaches it.
  void on_worker_lost(int slot, const LostWorker& how);

  // Deadlines: task timeouts (the worker is stopped through its port), soft timeouts and the
  // end of a cancel_grace, the stall rule (unstarted tasks of a worker that stopped making
  // progress are taken back), retries whose backoff ended (queued again). Returns when it wants
  // to be called again (CLOCK_MONOTONIC ns).
  int64_t check(int64_t now_ns);

  // For stats(): the call-relative index of the task the worker in `slot` runs, if any.
  std::optional<uint64_t> current_task(int slot) const;
  // The pool-wide number of task `index` of batch `seq` at `slot`'s worker, while the batch is
  // there or was among its last kRecentBatches settled (a worker's own stamps, for its log
  // records and the lines of output read from it); nothing if it is not.
  std::optional<uint64_t> task_number(int slot, uint64_t seq, uint32_t index) const;
  // The failure of task `index` of batch `seq` at `slot`'s worker, stopped by its host's
  // watchdog for its timeout, in the words of the pool's own timeout ("task 5 of its call ran
  // past its timeout of 300ms; worker 1 on h (pid 9) was stopped by its host's watchdog"); nothing
  // if the batch is no longer there or has no timeout.
  std::optional<absl::Status> host_timeout_failure(int slot, uint64_t seq, uint32_t index,
                                                   absl::string_view worker) const;
  int64_t tasks_submitted() const { return tasks_submitted_; }
  int64_t tasks_done() const { return tasks_done_; }
  int64_t tasks_failed() const { return tasks_failed_; }
  // The run times of the tasks whose outcomes came from a worker (pool_stats.h).
  const RunTimeHistogram& run_time() const { return run_time_; }

  // The stall rule, documented in README ("A stalled worker"): a worker whose current task has
  // run (or whose next batch has waited to start) longer than max(kStallFloor, kStallFactor x the
  // mean time of that call's tasks so far) has every task it holds and has not started taken back
  // and given to other workers.
  static constexpr int64_t kStallFloorNs = 100'000'000;
  static constexpr int64_t kStallFactor = 8;

 private:
  // A contiguous run of tasks of one call, all on the same attempt.
  struct TaskRange {
    std::shared_ptr<Call> call;
    size_t first = 0;
    size_t count = 0;
    int attempt = 0;
    // The pool-wide number of task `first` (tasks are numbered in the order they were submitted,
    // from 0; a task keeps its number when it runs again): what stats and log events call a task.
    uint64_t number = 0;
    // Workers lost, on this attempt, while task `first` was the first of theirs without an
    // outcome and their record of what they ran placed no task running (overwritten, perhaps by
    // the task itself): at kMaxUnplacedLosses it is taken as the task that ended them
    // (settlement.cc). Such a range holds that one task; a batch sent from it carries the count.
    int unplaced_losses = 0;
    // Its batches ask the worker to publish each task's outcome before the next task starts
    // (TaskBatch.publishEach): tasks that were behind such a first task (settlement.cc).
    bool publish_each = false;
  };
  // See TaskRange::unplaced_losses: so many workers lost with a task first in line and no task
  // placed running, and the task is deemed to have run (and failed) on the last.
  static constexpr int kMaxUnplacedLosses = 3;
  // How many of a worker's finished batches task_number() still knows (Worker::recent_batches):
  // a remote worker's lines come over its relay's connection, which a loaded relay may send some
  // milliseconds after the worker's results (dozens of one-task batches, one at a time).
  static constexpr size_t kRecentBatches = 32;
  // What becomes of a batch's tasks taken back by a revoke.
  enum class TakeBack { kNone, kRequeue, kFail };
  // One bit per claim slot of a worker's control page.
  using ClaimMask = uint64_t;
  static_assert(ControlPage::kClaimSlots <= std::numeric_limits<ClaimMask>::digits,
                "a worker's claim slots must each have a bit of ClaimMask");
  // A range sent to a worker as one frame.
  struct Batch {
    uint64_t seq = 0;
    uint32_t claim_slot = 0;
    uint16_t claim_tag = 0;
    TaskRange tasks;
    uint32_t reported = 0;  // outcomes received so far, in order
    uint32_t limit = 0;     // tasks.count, or the tasks claimed when the rest were taken back
    TakeBack take_back = TakeBack::kNone;  // a revoke is in flight
    absl::Status take_back_status;         // for kFail
    absl::Duration timeout = absl::InfiniteDuration();
    absl::Duration soft_timeout = absl::InfiniteDuration();
    int64_t front_since_ns = 0;  // when it became the worker's first batch in hand
    int64_t sent_ns = 0;         // when it was handed to the worker
    size_t blob_bytes = 0;       // its jobs' bytes in the worker's shared region
  };
  struct Worker {
    WorkerPort* port = nullptr;  // while attached
    bool accepting = false;
    std::deque<Batch> batches;
    uint64_t batches_sent = 0;   // by this worker process: claim slots and tags follow it
    ClaimMask claim_slots_used = 0;  // bit i: a batch in `batches` owns claim slot i
    int64_t tasks_assigned = 0;
    size_t blob_bytes = 0;  // in its shared region, for the batches it holds
    bool stall_taken_back = false;  // the stall rule acted on its current front batch
    // The start of the task its record names (batch, index), as first seen here (check_worker):
    // a later look at the same task never moves it later, nor past the clock. A record that
    // says "just started" again and again, or a start in the future (overwritten, perhaps by the
    // task), cannot hold a task past its timeout.
    struct SeenStart {
      uint64_t seq = ControlPage::kNoBatch;
      uint32_t index = 0;
      int64_t start_ns = 0;
    };
    SeenStart seen_start;
    bool suspect = false;           // its work was taken back for stalling; no results since
    // While suspect: since when it has not started a task (the stall rule's measure). When no
    // other worker can take them, what the stall rule took back is handed back to it, every
    // kWorkerRecheckNs; its task timeout counts from then, not from each hand-back (a stopped
    // only worker would otherwise hold its tasks for ever).
    int64_t suspect_since_ns = 0;
    // Tasks [from, to) of batch `seq` were asked to stop (WorkerPort::request_stop): they report
    // `reason` whatever they return; one still running at `kill_at_ns` has its worker stopped.
    struct StopRequest {
      uint64_t seq = 0;
      uint32_t from = 0;
      uint32_t to = 0;
      absl::Status reason;
      int64_t kill_at_ns = INT64_MAX;
    };
    std::optional<StopRequest> stop;
    // When check() looks at it next (INT64_MIN: at the next check): each look reads its progress
    // (a worker's control page, a cache miss), so a worker is looked at when its deadlines fall
    // due or when what they derive from changed here (a batch sent, results, a stop asked), not at
    // every wake. Its progress alone only moves its deadlines later.
    int64_t check_at_ns = INT64_MIN;
    // The batches it finished last (erase_batch), so that output it wrote in a task and that is
    // read after the task's outcome (a pipe read later than the frame) is still placed. Batch
    // numbers are pool-wide: a later process in the slot never matches these.
    struct RecentBatch {
      uint64_t seq = ControlPage::kNoBatch;
      uint64_t number = 0;  // of its first task
      size_t count = 0;
    };
    std::array<RecentBatch, kRecentBatches> recent_batches{};
    size_t recent_next = 0;
  };
  // A task range waiting out its retry's backoff until `ready_ns`.
  struct DelayedRetry {
    int64_t ready_ns = 0;
    TaskRange tasks;
  };

  // batch_encoder.cc
  int pick_worker();
  // Cuts the front of the queue into a batch for the worker in `slot` and sends it. `awaited`: a
  // caller waits for this batch (TaskBatch.awaited).
  void send_batch(int slot, bool awaited = false);
  // A batch's frame, built: the tasks it holds from the front of the queue (`taken`, maybe 0)
  // and, if the job right after them cannot be sent at all, why (it then fails alone).
  struct BatchFrame {
    uint64_t seq = 0;
    uint32_t claim_slot = 0;
    uint16_t claim_tag = 0;
    absl::Duration timeout = absl::InfiniteDuration();
    std::unique_ptr<capnp::MallocMessageBuilder> message;
    size_t taken = 0;
    std::optional<absl::Status> unencodable;
    SharedRegion* region = nullptr;  // where its jobs' blobs went, if anywhere
    size_t blob_bytes = 0;
  };
  // How many tasks of `range` to try in one batch (chunksize, quotas, the byte budget from one
  // job's size), and that job's size in words.
  size_t batch_size(const Worker& worker, const TaskRange& range, size_t& job_words);
  // Builds the frame for up to `want` tasks of `range`, fewer where a limit cuts it.
  BatchFrame build_batch(Worker& worker, const TaskRange& range, bool awaited, size_t want,
                         size_t job_words);
  // Records the batch as the worker's, opens its claims and sends its frame.
  void hand_over(Worker& worker, TaskRange sent, BatchFrame frame);
  // on_results: hand a frame's outcomes to the batch's call; a non-OK status (or a kj::Exception
  // from reading the frame) once part of it cannot be delivered. `batch.reported` counts only
  // outcomes delivered.
  absl::Status deliver_outcomes(Worker& worker, Batch& batch, wire::ResultBatch::Reader results);
  absl::Status deliver_word_results(Worker& worker, Batch& batch,
                                    wire::ResultBatch::Reader results);
  // settlement.cc
  void fail(const TaskRange& range, size_t first, size_t count, const absl::Status& status);
  void fail_pending(const absl::Status& status);
  void requeue_front(std::vector<TaskRange> ranges);
  // Whether a task of `tasks` that failed with `failure` runs again: its call's retries are not
  // used up, and retry_on lists the code; without retry_on, the old rule (`by_default`: its
  // worker died, or its result was lost).
  bool may_retry(const TaskRange& tasks, const absl::Status& failure, bool by_default) const;
  // Sends `tasks` (already on their next attempt) back: to the front of the queue, or after their
  // call's retry_backoff.
  void retry(TaskRange tasks);
  // Asks tasks [from, to) of `batch` at `worker` to stop (see Worker::StopRequest); without
  // `ask_worker`, only records them (they are stopped with their worker: no grace to wait out).
  void request_stop(Worker& worker, const Batch& batch, uint32_t from, uint32_t to,
                    const absl::Status& reason, int64_t kill_at_ns, bool ask_worker = true);
  // The outcome a task delivered by its worker reports instead, if it was asked to stop.
  const absl::Status* stopped_outcome(const Worker& worker, const Batch& batch,
                                      uint32_t index) const;
  // Revokes one batch: its unstarted tasks are settled (`how`) when the answer comes, which may
  // be within the call: `batch` may be gone when it returns.
  void take_back(int slot, Batch& batch, TakeBack how, const absl::Status& status);
  // take_back for every batch, of any worker, that `which` picks and that has no take-back in
  // flight; safe however the answers come.
  void take_back_where(TakeBack how, const absl::Status& status,
                       absl::FunctionRef<bool(int slot, const Batch& batch)> which);
  void settle_taken_back(Worker& worker, Batch& batch, uint32_t claimed);
  void erase_batch(Worker& worker, size_t index);
  void check_worker(int slot, int64_t now, int64_t& next);
  // "task N of its call ran past its timeout of T; <stopped>": one wording, whoever stopped it.
  static absl::Status timeout_failure(const Batch& batch, uint32_t index, absl::string_view stopped);
  // A worker is looked at again at least this often (the stall rule's threshold follows the
  // mean of every worker's tasks, which may fall).
  static constexpr int64_t kWorkerRecheckNs = 100'000'000;

  const Config config_;
  // Buffers for the first segments of large batches, reused (frame_io.h). Shared: a batch's frame
  // may outlive the scheduler in a link's queue.
  std::shared_ptr<SegmentPool> segment_pool_ = std::make_shared<SegmentPool>();
  std::vector<Worker> workers_;
  std::deque<TaskRange> pending_;
  std::vector<DelayedRetry> delayed_;  // retries waiting out their backoff
  uint64_t jitter_state_;  // xorshift for the backoff's jitter, seeded at random
  uint64_t next_seq_ = 1;
  bool abandoned_ = false;
  int64_t tasks_submitted_ = 0;
  int64_t tasks_done_ = 0;
  int64_t tasks_failed_ = 0;
  RunTimeHistogram run_time_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_SCHEDULER_SCHEDULER_H_
