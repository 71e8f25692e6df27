#include "procpool/internal/pool_core.h"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <cerrno>
#include <cstdio>
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/fork_server.h"
#include "lib/frame_io.h"
#include "lib/pool_registry.h"
#include "procpool/internal/protocol.capnp.h"
#include "lib/status_page.h"
#include "lib/unique_fd.h"
#include "lib/worker_main.h"
#include "lib/worker_process.h"
#include "procpool/internal/packed.h"

namespace procpool::internal {
namespace {

// Batches a worker may hold at once. A worker whose call's tasks are short (under
// kShortTaskNs on average, where the round trip between batches would be a real share of the
// time) gets more batches queued in its socket so it never sleeps between them: as many as it
// works through in about kQueuedWorkNs, and none behind a task that has already run longer than
// kLongRunningNs. Longer tasks are never queued behind a running one: queued work is work an idle
// worker could not take.
constexpr size_t kMaxBatchesPerWorker = 16;
constexpr int64_t kShortTaskNs = 100'000;
constexpr int64_t kQueuedWorkNs = 5'000'000;
constexpr int64_t kLongRunningNs = 1'000'000;
// A batch stops growing past this many bytes of encoded jobs, however large its chunksize.
constexpr size_t kBatchByteBudget = size_t{1} << 20;
// Crash-loop guard: more deaths than this within kDeathWindow stop respawning.
constexpr absl::Duration kDeathWindow = absl::Seconds(10);
// The loop wakes at least this often even with nothing to wait for, as a safety net.
constexpr int kMaxPollMs = 1000;

constexpr int64_t kMemoryCheckIntervalNs = 50'000'000;

// Resident set size of a process, from /proc; 0 if unknown.
size_t resident_bytes(pid_t pid) {
  std::FILE* statm = std::fopen(absl::StrCat("/proc/", pid, "/statm").c_str(), "re");
  if (statm == nullptr) return 0;
  unsigned long size = 0, resident = 0;
  const int read = std::fscanf(statm, "%lu %lu", &size, &resident);
  std::fclose(statm);
  return read == 2 ? resident * static_cast<size_t>(::sysconf(_SC_PAGESIZE)) : 0;
}

// How far CLOCK_MONOTONIC_COARSE may lag CLOCK_MONOTONIC.
int64_t coarse_clock_slack_ns() {
  static const int64_t slack = [] {
    timespec resolution{};
    ::clock_getres(CLOCK_MONOTONIC_COARSE, &resolution);
    return int64_t{resolution.tv_sec} * 1'000'000'000 + resolution.tv_nsec;
  }();
  return slack;
}

int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

}  // namespace

class PoolCore::Impl {
 public:
  Impl(PoolOptions options, WorkerBodyFactory factory);
  ~Impl();
  // close() + join(), then runs the callbacks still queued and stops the callback thread.
  // Idempotent. Called while the PoolCore is whole: callbacks may still reach it through it.
  void shutdown();

  absl::Status submit(std::shared_ptr<Call> call, size_t first, size_t count);
  absl::Status run_one(std::shared_ptr<Call> call, const std::function<bool()>& done);
  void cancel(const Call* call);
  void cancel_pending(absl::Status status);
  bool cancel_call(Call* call, const absl::Status& status, const std::function<bool()>& settle);
  absl::Status close();
  absl::Status join();
  absl::Status join_for(absl::Duration timeout);
  void terminate();
  PoolStats stats() const;
  void post_callback(std::function<void()> callback);
  void log(LogSeverity severity, std::string process, int pid, std::string message) const;

  const PoolOptions options_;
  const int worker_count_;

 private:
  // A contiguous run of tasks of one call, all on the same attempt.
  struct TaskRange {
    std::shared_ptr<Call> call;
    size_t first = 0;
    size_t count = 0;
    int attempt = 0;
  };
  // A range sent to a worker as one frame.
  struct Batch {
    uint64_t seq = 0;
    TaskRange tasks;
    uint32_t reported = 0;  // outcomes received so far, in order
    absl::Duration timeout = absl::InfiniteDuration();
    int64_t front_since_ns = 0;  // when it became the worker's first batch in hand
  };
  struct Slot {
    int index = 0;
    std::string name;
    WorkerProcess process;
    bool alive = false;           // forked and not yet reaped
    uint64_t generation = 0;      // counts the processes this slot has had
    bool ready = false;           // enter() succeeded
    bool shutdown_sent = false;
    std::optional<absl::Status> kill_reason;  // why we are killing it; set once
    int64_t kill_deadline_ns = 0;             // SIGKILL when passed (after a SIGTERM)
    bool killed_hard = false;
    std::deque<Batch> batches;
    FrameWriter writer;
    FrameReader reader{0};
    int64_t tasks_assigned = 0;   // by this process, for recycling
    bool recycling = false;
    bool borrowed = false;        // a caller of run_one() reads this worker's channel itself
    bool missing_from_poll = false;  // the pool thread's current poll set lacks its channel
    int64_t last_memory_check_ns = 0;
    absl::Status exit_hook_status;
    absl::Time started;
    int64_t started_ns = 0;
  };

  void loop();
  void spawn(Slot& slot);
  void dispatch();
  Slot* pick_worker();
  void send_batch(Slot& slot);
  void read_from(Slot& slot);
  void handle_frame(Slot& slot, kj::ArrayPtr<const capnp::word> words)
     ;
  void handle_results(Slot& slot, wire::ResultBatch::Reader results)
     ;
  void handle_exit(Slot& slot, int wait_status);
  void check_memory(Slot& slot);
  void stop_cancelled_work(Slot& slot);
  void requeue_or_drop(std::vector<TaskRange>& requeue);
  absl::Status join_outcome() const;
  void kill_worker(Slot& slot, absl::Status reason, int signal);
  int check_deadlines();
  void break_pool(absl::Status status);
  void fail_pending(const absl::Status& status);
  void fail(const TaskRange& range, size_t first, size_t count, const absl::Status& status)
     ;
  void deliver_value(Call& call, size_t index, wire::Value::Reader value)
     ;
  void maybe_send_shutdowns();
  bool work_outstanding() const;
  bool any_alive() const;
  void wake();
  std::string describe(const Slot& slot) const;
  void log_worker(const Slot& slot, LogSeverity severity, std::string message) const;

  void start_fork_server();
  void handle_fork_server_reports();

  const WorkerBodyFactory factory_;
  std::unique_ptr<ForkServer> fork_server_;
  const absl::Time start_time_ = absl::Now();
  UniqueFd wake_fd_;
  bool fork_from_pool_thread_ = false;

  // Guards everything below. The pool thread holds it except while in poll(); members whose
  // comment or name says "requires mu_" are called with it held.
  mutable std::mutex mu_;
  std::condition_variable loop_done_cv_;
  std::vector<Slot> slots_;
  std::deque<TaskRange> pending_;
  uint64_t next_seq_ = 1;
  bool closed_ = false;
  bool joining_ = false;
  // join_deadline_ns_ is from join_timeout; false while only join(timeout) has asked to join.
  bool join_deadline_armed_ = false;
  bool terminating_ = false;
  bool loop_done_ = false;
  int64_t join_deadline_ns_ = 0;
  bool join_deadline_passed_ = false;
  absl::Status broken_;
  std::vector<std::string> join_problems_;
  absl::StatusCode join_code_ = absl::StatusCode::kOk;
  std::deque<absl::Time> recent_deaths_;
  int64_t tasks_submitted_ = 0;
  int64_t tasks_done_ = 0;
  int64_t tasks_failed_ = 0;
  int64_t workers_restarted_ = 0;

  std::thread thread_;

  // The callback thread: runs user callbacks away from the pool thread, so they may use the pool.
  void run_callbacks();
  std::mutex callback_mu_;
  std::condition_variable callback_cv_;
  std::deque<std::function<void()>> callbacks_;
  bool callbacks_stopping_ = false;
  bool callback_thread_done_ = false;  // it has left its loop: it runs nothing more
  std::thread callback_thread_;
};

PoolCore::Impl::Impl(PoolOptions options, WorkerBodyFactory factory)
    : options_(std::move(options)),
      worker_count_(options_.workers > 0 ? options_.workers : cpu_count()),
      factory_(std::move(factory)) {
  std::unique_lock lock(mu_);
  slots_.resize(worker_count_);
  for (int i = 0; i < worker_count_; ++i) {
    slots_[i].index = i;
    slots_[i].name = absl::StrCat(options_.name, "-w", i).substr(0, 15);
    slots_[i].reader = FrameReader(options_.max_frame_bytes);
  }
  absl::StatusOr<UniqueFd> wake = make_event_fd();
  if (!wake.ok()) {
    broken_ = wake.status();
    loop_done_ = true;
    return;
  }
  wake_fd_ = *std::move(wake);
  // PR_SET_PDEATHSIG follows the thread that forked, not the process. The main thread lives as
  // long as the program, so fork from it here, before the pool has any thread of its own. Any
  // other thread may end before the pool does: then the pool thread forks, first thing.
  fork_from_pool_thread_ = ::gettid() != ::getpid();
  if (!fork_from_pool_thread_) {
    start_fork_server();
    for (Slot& slot : slots_) {
      if (broken_.ok()) spawn(slot);
    }
  }
  thread_ = std::thread([this] { loop(); });
}

PoolCore::Impl::~Impl() { shutdown(); }

void PoolCore::Impl::shutdown() {
  if (thread_.joinable()) {
    close().IgnoreError();
    join().IgnoreError();
  }
  if (thread_.joinable()) thread_.join();
  {
    std::lock_guard lock(callback_mu_);
    callbacks_stopping_ = true;
  }
  callback_cv_.notify_all();
  if (callback_thread_.joinable()) callback_thread_.join();
}

void PoolCore::Impl::post_callback(std::function<void()> callback) {
  {
    std::unique_lock lock(callback_mu_);
    // Once the callback thread has left its loop (or never ran), nothing else would run it.
    if (callbacks_stopping_ && (callback_thread_done_ || !callback_thread_.joinable())) {
      lock.unlock();
      callback();  // the callback thread is gone: nothing else can run it
      return;
    }
    callbacks_.push_back(std::move(callback));
    if (!callback_thread_.joinable()) callback_thread_ = std::thread([this] { run_callbacks(); });
  }
  callback_cv_.notify_one();
}

void PoolCore::Impl::run_callbacks() {
  std::unique_lock lock(callback_mu_);
  while (true) {
    callback_cv_.wait(lock, [this] { return callbacks_stopping_ || !callbacks_.empty(); });
    if (callbacks_.empty()) {  // stopping, and everything ran
      callback_thread_done_ = true;
      return;
    }
    std::function<void()> callback = std::move(callbacks_.front());
    callbacks_.pop_front();
    lock.unlock();
    try {
      callback();
    } catch (...) {
      log(LogSeverity::kError, "procpool", ::getpid(),
          absl::StrCat("a callback threw: ", describe_current_exception()));
    }
    lock.lock();
  }
}

void PoolCore::Impl::wake() {
  uint64_t one = 1;
  if (wake_fd_.valid()) (void)!::write(wake_fd_.get(), &one, sizeof(one));
}

std::string PoolCore::Impl::describe(const Slot& slot) const {
  return absl::StrFormat("worker %d (pid %d)", slot.index, slot.process.pid());
}

void PoolCore::Impl::log(LogSeverity severity, std::string process, int pid,
                         std::string message) const {
  if (!options_.log_sink) return;
  LogEvent event;
  event.severity = severity;
  event.process = std::move(process);
  event.pid = pid;
  event.since_start = absl::Now() - start_time_;
  event.message = std::move(message);
  options_.log_sink(event);
}

void PoolCore::Impl::log_worker(const Slot& slot, LogSeverity severity, std::string message) const {
  log(severity, slot.name, slot.process.pid(), std::move(message));
}

void PoolCore::Impl::start_fork_server() {
  if (options_.start_method != StartMethod::kForkServer) return;
  WorkerLaunch launch;
  launch.process_name = absl::StrCat(options_.name, "-fs").substr(0, 15);
  launch.parent_death_signal = true;
  launch.max_frame_bytes = options_.max_frame_bytes;
  launch.pool_pid = ::getpid();
  launch.factory = &factory_;
  absl::StatusOr<std::unique_ptr<ForkServer>> server = ForkServer::start(launch);
  if (!server.ok()) {
    break_pool(absl::Status(server.status().code(), absl::StrCat("could not start the fork server: ",
                                                                 server.status().message())));
    return;
  }
  fork_server_ = *std::move(server);
  log(LogSeverity::kInfo, launch.process_name, fork_server_->pid(), "fork server started");
}

void PoolCore::Impl::handle_fork_server_reports() {
  std::vector<std::pair<pid_t, int>> exits;
  absl::Status alive = fork_server_->take_exits(exits);
  for (const auto& [pid, status] : exits) {
    for (Slot& slot : slots_) {
      if (!slot.alive || slot.process.pid() != pid) continue;
      // Results it sent before it died are real: read them first.
      if (slot.process.channel_fd() >= 0) read_from(slot);
      slot.process.mark_reaped();
      handle_exit(slot, status);
      break;
    }
  }
  if (!alive.ok()) {
    // Its workers die with it (PR_SET_PDEATHSIG); no report will come for them.
    break_pool(absl::AbortedError("the fork server died; no worker can be started"));
    for (Slot& slot : slots_) {
      if (!slot.alive) continue;
      if (!slot.kill_reason) slot.kill_reason = absl::AbortedError("the fork server died");
      slot.process.mark_reaped();
      handle_exit(slot, SIGKILL);  // a wait status: killed by SIGKILL
    }
    fork_server_.reset();
  }
}

void PoolCore::Impl::spawn(Slot& slot) {
  WorkerLaunch launch;
  launch.slot = slot.index;
  launch.process_name = slot.name;
  launch.parent_death_signal = true;
  launch.max_frame_bytes = options_.max_frame_bytes;
  launch.pool_pid = ::getpid();
  launch.factory = &factory_;
  absl::StatusOr<WorkerProcess> process =
      fork_server_ ? fork_server_->spawn(launch) : WorkerProcess::spawn(launch);
  if (!process.ok()) {
    break_pool(absl::Status(process.status().code(),
                            absl::StrCat("could not start worker ", slot.index, ": ",
                                         process.status().message())));
    return;
  }
  slot.process = *std::move(process);
  ++slot.generation;
  slot.alive = true;
  slot.ready = false;
  slot.shutdown_sent = false;
  slot.kill_reason.reset();
  slot.kill_deadline_ns = 0;
  slot.killed_hard = false;
  slot.writer.clear();
  slot.reader = FrameReader(options_.max_frame_bytes);
  slot.tasks_assigned = 0;
  slot.recycling = false;
  slot.borrowed = false;
  slot.exit_hook_status = absl::OkStatus();
  slot.started = absl::Now();
  slot.started_ns = monotonic_now_ns();
  log_worker(slot, LogSeverity::kInfo, "started");
}

absl::Status PoolCore::Impl::submit(std::shared_ptr<Call> call, size_t first, size_t count) {
  {
    std::unique_lock lock(mu_);
    if (closed_) return absl::FailedPreconditionError("the pool is closed");
    if (!broken_.ok()) return broken_;
    if (count == 0) return absl::OkStatus();
    tasks_submitted_ += static_cast<int64_t>(count);
    const bool queue_was_empty = pending_.empty();
    pending_.push_back(TaskRange{std::move(call), first, count, 0});
    if (queue_was_empty && !joining_) {
      // Send to an idle worker from this thread: one thread hand-off fewer on the latency path.
      // The pool thread already polls every channel for the result; it needs waking only to
      // watch a socket that did not take the whole frame, or a task's deadline.
      dispatch();
      bool pool_thread_needed = !pending_.empty();
      for (const Slot& slot : slots_) {
        if (!slot.writer.empty() || (!slot.batches.empty() && slot.missing_from_poll) ||
            (!slot.batches.empty() && slot.batches.back().timeout != absl::InfiniteDuration())) {
          pool_thread_needed = true;
        }
      }
      if (!pool_thread_needed) return absl::OkStatus();
    }
  }
  wake();
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::run_one(std::shared_ptr<Call> call,
                                     const std::function<bool()>& done) {
  std::unique_lock lock(mu_);
  if (closed_) return absl::FailedPreconditionError("the pool is closed");
  if (!broken_.ok()) return broken_;
  Slot* slot = nullptr;
  if (pending_.empty() && !joining_) {
    for (Slot& candidate : slots_) {
      if (candidate.alive && candidate.ready && candidate.batches.empty() && !candidate.borrowed &&
          !candidate.shutdown_sent && !candidate.kill_reason && !candidate.recycling &&
          candidate.process.channel_fd() >= 0) {
        slot = &candidate;
        break;
      }
    }
  }
  const bool has_timeout = call->settings().has_task_timeout
                               ? call->settings().task_timeout != absl::InfiniteDuration()
                               : options_.task_timeout != absl::InfiniteDuration();
  if (slot == nullptr || has_timeout) {
    lock.unlock();
    return submit(std::move(call), 0, 1);
  }
  // Borrow the idle worker: send the task and read its result on this thread, sparing the two
  // hand-offs through the pool thread. The pool thread still watches the worker's pidfd; if the
  // worker dies, the channel ends and the pool thread settles the task as for any other.
  ++tasks_submitted_;
  pending_.push_back(TaskRange{std::move(call), 0, 1, 0});
  send_batch(*slot);
  (void)slot->writer.write_some(slot->process.channel_fd());
  const uint64_t generation = slot->generation;
  const int fd = slot->process.channel_fd();
  slot->borrowed = true;
  while (slot->generation == generation && slot->alive && slot->process.channel_fd() >= 0 &&
         !slot->batches.empty() && !done()) {
    pollfd ready{fd, static_cast<short>(POLLIN | (slot->writer.empty() ? 0 : POLLOUT)), 0};
    lock.unlock();
    // Bounded, so a stop of the pool (which needs no wake-up here) is noticed.
    ::poll(&ready, 1, 100);
    lock.lock();
    if (slot->generation != generation || !slot->alive || slot->process.channel_fd() < 0) break;
    if (ready.revents & POLLOUT) (void)slot->writer.write_some(fd);
    if (ready.revents & (POLLIN | POLLHUP | POLLERR)) read_from(*slot);
    if (terminating_) break;
  }
  if (slot->generation == generation) slot->borrowed = false;
  const bool pool_thread_needed = !slot->writer.empty() || !slot->alive || !pending_.empty() ||
                                  slot->process.channel_fd() < 0 || !slot->batches.empty() ||
                                  closed_;  // a join may wait to send this worker its shutdown
  lock.unlock();
  // The pool thread polls without this channel until it is woken; it must see it again if
  // anything more is owed on it.
  if (pool_thread_needed) wake();
  return absl::OkStatus();
}

void PoolCore::Impl::cancel(const Call* call) {
  std::unique_lock lock(mu_);
  const absl::Status cancelled = absl::CancelledError("cancelled before it started");
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->call.get() == call) {
      TaskRange range = std::move(*it);
      it = pending_.erase(it);
      fail(range, range.first, range.count, cancelled);
    } else {
      ++it;
    }
  }
}

// Issue 11 (AsyncResult::cancel, like Pebble's future.cancel()). See pool_core.h.
bool PoolCore::Impl::cancel_call(Call* call, const absl::Status& status,
                                 const std::function<bool()>& settle) {
  {
    std::unique_lock lock(mu_);
    if (!settle()) return false;
    call->cancelled = true;
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->call.get() == call) {
        TaskRange range = std::move(*it);
        it = pending_.erase(it);
        fail(range, range.first, range.count, status);
      } else {
        ++it;
      }
    }
    for (Slot& slot : slots_) stop_cancelled_work(slot);
  }
  wake();  // a stopped worker's kill deadline, and its tasks of other calls, need the pool thread
  return true;
}

// Stops the slot's worker if the batch it is on, or is about to start, belongs to a cancelled
// call. Its status page names the batch it is on; if that is none of the batches it holds, it has
// not started any and will start the first. A worker busy with another call's batch is left
// alone: handle_results calls this again when that batch is done. handle_exit then settles what
// the worker held (requeue_or_drop). Requires mu_.
void PoolCore::Impl::stop_cancelled_work(Slot& slot) {
  if (!slot.alive || slot.kill_reason || slot.batches.empty()) return;
  const uint64_t on = slot.process.page()->batch_seq.load(std::memory_order_acquire);
  const Batch* current = &slot.batches.front();
  for (const Batch& batch : slot.batches) {
    if (batch.seq == on) current = &batch;
  }
  if (!current->tasks.call->cancelled) return;
  kill_worker(slot, absl::CancelledError("the task was cancelled; its worker was stopped"), SIGTERM);
}

// Puts tasks a dead worker had not finished back at the front of the queue, in order, except those
// of cancelled calls: those fail (kCancelled; the call has its outcome and ignores it). Requires
// mu_.
void PoolCore::Impl::requeue_or_drop(std::vector<TaskRange>& requeue) {
  for (auto it = requeue.rbegin(); it != requeue.rend(); ++it) {
    if (it->call->cancelled) {
      fail(*it, it->first, it->count, absl::CancelledError("cancelled before it started"));
    } else {
      pending_.push_front(std::move(*it));
    }
  }
}

void PoolCore::Impl::cancel_pending(absl::Status status) {
  std::unique_lock lock(mu_);
  fail_pending(status);
}

absl::Status PoolCore::Impl::close() {
  std::unique_lock lock(mu_);
  closed_ = true;
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::join() {
  {
    std::unique_lock lock(mu_);
    if (!closed_) return absl::FailedPreconditionError("join() needs close() or terminate() first");
    // A join(timeout) before may have started joining without a deadline: arm it now.
    if (!joining_ || !join_deadline_armed_) {
      joining_ = true;
      join_deadline_armed_ = true;
      join_deadline_ns_ = monotonic_now_ns() + absl::ToInt64Nanoseconds(options_.join_timeout);
      if (options_.join_timeout == absl::InfiniteDuration()) {
        join_deadline_ns_ = std::numeric_limits<int64_t>::max();
      }
    }
  }
  wake();
  std::unique_lock lock(mu_);
  loop_done_cv_.wait(lock, [this] { return loop_done_; });
  return join_outcome();
}

// join()'s result once the pool thread is done: OK, or what went wrong, joined. Requires mu_.
absl::Status PoolCore::Impl::join_outcome() const {
  if (join_problems_.empty()) return absl::OkStatus();
  return absl::Status(join_code_, absl::StrCat("join: ", absl::StrJoin(join_problems_, "; ")));
}

// Issue 11 (Pebble's join(timeout)): starts the same shutdown as join(), waits at most `timeout`
// for it, and stops nobody. The join_timeout clock is left to join(): a caller that polls with
// join(timeout) must not have its workers killed behind its back.
absl::Status PoolCore::Impl::join_for(absl::Duration timeout) {
  {
    std::unique_lock lock(mu_);
    if (!closed_) return absl::FailedPreconditionError("join() needs close() or terminate() first");
    if (!joining_) {
      joining_ = true;
      join_deadline_ns_ = std::numeric_limits<int64_t>::max();
    }
  }
  wake();
  std::unique_lock lock(mu_);
  const bool done =
      timeout == absl::InfiniteDuration()
          ? (loop_done_cv_.wait(lock, [this] { return loop_done_; }), true)
          : loop_done_cv_.wait_for(lock,
                                   absl::ToChronoNanoseconds(std::max(timeout, absl::ZeroDuration())),
                                   [this] { return loop_done_; });
  if (done) return join_outcome();
  int alive = 0;
  for (const Slot& slot : slots_) alive += slot.alive ? 1 : 0;
  return absl::DeadlineExceededError(absl::StrFormat(
      "join: %d worker(s) still running after %s; none was stopped, the shutdown goes on", alive,
      absl::FormatDuration(timeout)));
}

void PoolCore::Impl::terminate() {
  {
    std::unique_lock lock(mu_);
    closed_ = true;
    if (terminating_ || loop_done_) return;
    terminating_ = true;
    joining_ = true;
    join_deadline_armed_ = true;
    join_deadline_ns_ = monotonic_now_ns();
    fail_pending(absl::CancelledError("the pool was terminated"));
    for (Slot& slot : slots_) {
      if (slot.alive) kill_worker(slot, absl::CancelledError("the pool was terminated"), SIGTERM);
    }
  }
  wake();
  std::unique_lock lock(mu_);
  loop_done_cv_.wait(lock, [this] { return loop_done_; });
}

PoolStats PoolCore::Impl::stats() const {
  std::unique_lock lock(mu_);
  PoolStats stats;
  stats.tasks_submitted = tasks_submitted_;
  stats.tasks_done = tasks_done_;
  stats.tasks_failed = tasks_failed_;
  stats.workers_restarted = workers_restarted_;
  for (const Slot& slot : slots_) {
    WorkerStats worker;
    worker.slot = slot.index;
    worker.pid = slot.alive ? slot.process.pid() : 0;
    if (!slot.alive) {
      worker.state = WorkerState::kDead;
    } else if (slot.shutdown_sent || slot.kill_reason) {
      worker.state = WorkerState::kExiting;
    } else if (!slot.ready) {
      worker.state = WorkerState::kStarting;
    } else if (slot.batches.empty()) {
      worker.state = WorkerState::kIdle;
    } else {
      worker.state = WorkerState::kBusy;
    }
    if (slot.alive) {
      StatusPage* page = slot.process.page();
      worker.tasks_done = page->tasks_done.load(std::memory_order_relaxed);
      worker.time_busy = absl::Nanoseconds(page->busy_ns.load(std::memory_order_relaxed));
      if (!slot.batches.empty() && page->running.load(std::memory_order_acquire) &&
          page->batch_seq.load(std::memory_order_relaxed) == slot.batches.front().seq) {
        worker.current_task =
            slot.batches.front().tasks.first + page->task_index.load(std::memory_order_relaxed);
      }
    }
    stats.workers.push_back(worker);
  }
  return stats;
}

void PoolCore::Impl::fail(const TaskRange& range, size_t first, size_t count,
                          const absl::Status& status) {
  for (size_t i = first; i < first + count; ++i) range.call->on_error(i, status);
  tasks_failed_ += static_cast<int64_t>(count);
}

void PoolCore::Impl::fail_pending(const absl::Status& status) {
  while (!pending_.empty()) {
    TaskRange range = std::move(pending_.front());
    pending_.pop_front();
    fail(range, range.first, range.count, status);
  }
}

void PoolCore::Impl::break_pool(absl::Status status) {
  if (broken_.ok()) {
    broken_ = status;
    log(LogSeverity::kError, "procpool", ::getpid(), std::string(status.message()));
  }
  fail_pending(broken_);
}

bool PoolCore::Impl::work_outstanding() const {
  if (!pending_.empty()) return true;
  for (const Slot& slot : slots_) {
    if (!slot.batches.empty()) return true;
  }
  return false;
}

bool PoolCore::Impl::any_alive() const {
  for (const Slot& slot : slots_) {
    if (slot.alive) return true;
  }
  return false;
}

PoolCore::Impl::Slot* PoolCore::Impl::pick_worker() {
  const Call& next = *pending_.front().call;
  size_t depth = 1;  // until the call's tasks have been timed, and for long ones
  const int64_t task_ns =
      next.observed_tasks > 0 ? next.observed_busy_ns / next.observed_tasks : kShortTaskNs;
  if (task_ns < kShortTaskNs) {
    const int64_t batch_ns =
        task_ns * static_cast<int64_t>(std::max<size_t>(1, next.settings().chunksize));
    depth = batch_ns <= 0 ? kMaxBatchesPerWorker
                          : std::clamp<size_t>(1 + kQueuedWorkNs / batch_ns, 1, kMaxBatchesPerWorker);
  }
  const int64_t now = depth > 1 ? monotonic_now_ns() : 0;
  Slot* best = nullptr;
  for (Slot& slot : slots_) {
    if (!slot.alive || !slot.ready || slot.shutdown_sent || slot.kill_reason || slot.recycling ||
        slot.borrowed) {
      continue;
    }
    if (slot.batches.empty()) return &slot;
    if (slot.batches.size() >= depth) continue;
    if (best != nullptr && best->batches.size() <= slot.batches.size()) continue;
    const StatusPage* page = slot.process.page();
    const bool running_long = page->running.load(std::memory_order_acquire) &&
                              now - page->started_ns.load(std::memory_order_relaxed) > kLongRunningNs;
    if (!running_long) best = &slot;
  }
  return best;
}

void PoolCore::Impl::dispatch() {
  bool sent = false;
  while (!pending_.empty()) {
    Slot* slot = pick_worker();
    if (slot == nullptr) break;
    send_batch(*slot);
    sent = true;
  }
  if (!sent) return;
  // Write now rather than on the next POLLOUT, one sendmsg per worker for all it was given. A
  // failure means the worker is gone; its pidfd will tell.
  for (Slot& slot : slots_) {
    if (slot.alive && !slot.writer.empty()) (void)slot.writer.write_some(slot.process.channel_fd());
  }
}

void PoolCore::Impl::send_batch(Slot& slot) {
  TaskRange& range = pending_.front();
  size_t want = std::min(range.count, std::max<size_t>(1, range.call->settings().chunksize));
  if (options_.max_tasks_per_worker > 0) {
    want = std::min<size_t>(want, options_.max_tasks_per_worker - slot.tasks_assigned);
  }

  // Size the batch before building it (shrinking a Cap'n Proto list in place is slow): from one
  // job's encoded size, as many as fit the byte budget.
  const bool packed = range.call->packs_jobs();
  size_t job_words = 8;
  if (packed) {
    want = std::min(want, kBatchByteBudget / sizeof(capnp::word));
    job_words = 1;
  } else {
    capnp::MallocMessageBuilder probe(64);
    try {
      range.call->encode_job(range.first, probe.initRoot<wire::Value>());
      job_words = probe.sizeInWords();
      want = std::clamp<size_t>(kBatchByteBudget / (job_words * sizeof(capnp::word)), 1, want);
    } catch (...) {
      want = 1;  // the build below reports it
    }
  }

  const uint64_t seq = next_seq_++;
  std::unique_ptr<capnp::MallocMessageBuilder> message;
  size_t taken = 0;
  std::optional<absl::Status> unencodable;  // the job right after the batch cannot be encoded
  while (true) {
    // A first segment the batch fits in: the default (8 KiB, zeroed) costs a small task dearly.
    message = std::make_unique<capnp::MallocMessageBuilder>(
        static_cast<unsigned>(std::min<size_t>(16 + want * job_words, size_t{1} << 20)));
    auto tasks = message->initRoot<wire::ToWorker>().initTasks();
    tasks.setSeq(seq);
    tasks.setTrampoline(range.call->settings().trampoline);
    tasks.setFunction(range.call->settings().function);
    taken = 0;
    bool failed_here = false;
    if (packed) {
      range.call->encode_jobs_packed(range.first, want, tasks.initPackedJobs());
      taken = want;
    }
    auto jobs = tasks.initJobs(packed ? 0 : static_cast<unsigned>(want));
    while (taken < want) {
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
    if (failed_here) {
      if (taken == 0) break;
      want = taken;  // build again without it (and what follows); it fails alone below
      continue;
    }
    // A frame the worker would refuse: send fewer jobs, or fail a job too big on its own.
    const size_t frame_bytes = capnp::computeSerializedSizeInWords(*message) * sizeof(capnp::word);
    if (frame_bytes <= options_.max_frame_bytes) break;
    if (want == 1) {
      taken = 0;
      unencodable = absl::InvalidArgumentError(absl::StrFormat(
          "the job encodes to %d bytes, over max_frame_bytes (%d)", frame_bytes,
          options_.max_frame_bytes));
      break;
    }
    want = want / 2;
    unencodable.reset();  // no longer right after the batch: a later batch meets it again
  }
  if (unencodable) {
    // It fails alone; the batch ends before it.
    range.call->on_error(range.first + taken, *unencodable);
    ++tasks_failed_;
  }
  const bool encode_failed = unencodable.has_value();

  TaskRange sent{range.call, range.first, taken, range.attempt};
  const size_t consumed = taken + (encode_failed ? 1 : 0);
  range.first += consumed;
  range.count -= consumed;
  if (range.count == 0) pending_.pop_front();
  if (taken == 0) return;

  Batch batch;
  batch.seq = seq;
  batch.tasks = std::move(sent);
  const CallSettings& settings = batch.tasks.call->settings();
  batch.timeout = settings.has_task_timeout ? settings.task_timeout : options_.task_timeout;
  if (slot.batches.empty()) batch.front_since_ns = monotonic_now_ns();
  slot.batches.push_back(std::move(batch));
  slot.tasks_assigned += static_cast<int64_t>(taken);
  if (options_.max_tasks_per_worker > 0 && slot.tasks_assigned >= options_.max_tasks_per_worker) {
    slot.recycling = true;
  }
  slot.writer.push(std::move(message));  // dispatch() writes it
}

void PoolCore::Impl::maybe_send_shutdowns() {
  for (Slot& slot : slots_) {
    if (!slot.alive || slot.shutdown_sent || slot.kill_reason || !slot.batches.empty()) continue;
    const bool recycle_now = slot.recycling && slot.ready;
    const bool pool_done = joining_ && pending_.empty();
    if (!recycle_now && !pool_done) continue;
    // A worker still starting gets its shutdown after enter(): frames are read in order.
    auto message = std::make_unique<capnp::MallocMessageBuilder>(16);
    message->initRoot<wire::ToWorker>().setShutdown();
    slot.writer.push(std::move(message));
    (void)slot.writer.write_some(slot.process.channel_fd());
    slot.shutdown_sent = true;
  }
}

void PoolCore::Impl::read_from(Slot& slot) {
  // Bounded: a flood from one worker must not starve the others.
  for (int round = 0; round < 16 && slot.alive && slot.process.channel_fd() >= 0; ++round) {
    absl::StatusOr<FrameReader::Fill> filled = slot.reader.fill(slot.process.channel_fd());
    if (!filled.ok() || *filled == FrameReader::Fill::kEndOfFile) {
      // The worker closed its end: it is exiting. Its pidfd reports when it is gone. Part of a
      // frame left over means it wrote garbage, not that it merely died.
      if (slot.reader.has_partial_frame() && !slot.kill_reason) {
        slot.kill_reason = absl::DataLossError(
            absl::StrCat(describe(slot), " sent a truncated frame before it exited"));
      }
      slot.process.close_channel();
      return;
    }
    if (*filled == FrameReader::Fill::kWouldBlock) return;
    while (slot.alive && !slot.kill_reason) {
      absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = slot.reader.next();
      if (!frame.ok()) {
        kill_worker(slot,
                    absl::DataLossError(absl::StrCat(describe(slot), " sent a bad frame: ",
                                                     frame.status().message())),
                    SIGKILL);
        return;
      }
      if (frame->size() == 0) break;
      handle_frame(slot, *frame);
    }
    // Nothing owed and nothing half-read: a further read could only say EAGAIN.
    if (slot.ready && slot.batches.empty() && !slot.shutdown_sent &&
        !slot.reader.has_partial_frame()) {
      return;
    }
  }
}

void PoolCore::Impl::handle_frame(Slot& slot, kj::ArrayPtr<const capnp::word> words) {
  // The one place a worker's bytes are parsed: whatever Cap'n Proto throws becomes kDataLoss.
  try {
    capnp::FlatArrayMessageReader message(words, slot.reader.options());
    auto frame = message.getRoot<wire::FromWorker>();
    switch (frame.which()) {
      case wire::FromWorker::READY:
        slot.ready = true;
        break;
      case wire::FromWorker::ENTER_FAILED: {
        absl::Status failure = status_from_wire(frame.getEnterFailed());
        log_worker(slot, LogSeverity::kError, absl::StrCat("enter() failed: ", failure.ToString()));
        if (failure.ok()) failure = absl::UnknownError("enter() failed without a status");
        break_pool(absl::Status(failure.code(), absl::StrCat(describe(slot), " failed enter(): ",
                                                             failure.message())));
        break;
      }
      case wire::FromWorker::RESULTS:
        handle_results(slot, frame.getResults());
        break;
      case wire::FromWorker::EXITED:
        slot.exit_hook_status = status_from_wire(frame.getExited());
        break;
    }
  } catch (const kj::Exception& e) {
    kill_worker(slot,
                absl::DataLossError(absl::StrCat(describe(slot), " sent a malformed frame: ",
                                                 e.getDescription().cStr())),
                SIGKILL);
  }
}

void PoolCore::Impl::deliver_value(Call& call, size_t index, wire::Value::Reader value) {
  if (call.on_value(index, value)) {
    ++tasks_done_;
  } else {
    ++tasks_failed_;
  }
}

void PoolCore::Impl::handle_results(Slot& slot, wire::ResultBatch::Reader results) {
  if (slot.batches.empty() || slot.batches.front().seq != results.getSeq()) {
    kill_worker(slot, absl::DataLossError(absl::StrCat(describe(slot),
                                                       " reported results for a batch it was "
                                                       "not running")),
                SIGKILL);
    return;
  }
  Batch& batch = slot.batches.front();
  auto listed = results.getOutcomes();
  const uint32_t count = results.getCount();
  const bool packed = results.hasPackedResults();
  const size_t entries = packed ? PackedReader(results.getPackedResults()).size() : listed.size();
  if (results.getStart() != batch.reported || count > entries ||
      batch.reported + count > batch.tasks.count) {
    kill_worker(slot, absl::DataLossError(absl::StrCat(describe(slot),
                                                       " reported results out of order")),
                SIGKILL);
    return;
  }
  // Work gets done: whatever deaths came before were no crash loop.
  recent_deaths_.clear();
  batch.tasks.call->observed_tasks += count;
  batch.tasks.call->observed_busy_ns += static_cast<int64_t>(results.getBusyNs());
  if (packed) {
    const size_t values = batch.tasks.call->on_packed_results(
        batch.tasks.first + batch.reported, count, results.getPackedResults(), results.getErrors());
    tasks_done_ += static_cast<int64_t>(values);
    tasks_failed_ += static_cast<int64_t>(count - values);
    batch.reported += count;
  }
  for (uint32_t i = 0; i < (packed ? 0 : count); ++i) {
    const wire::Outcome::Reader outcome = listed[i];
    const size_t index = batch.tasks.first + batch.reported;
    ++batch.reported;
    if (outcome.which() == wire::Outcome::OK) {
      deliver_value(*batch.tasks.call, index, outcome.getOk());
    } else {
      absl::Status status = status_from_wire(outcome.getError());
      if (status.ok()) status = absl::UnknownError("the task failed without a status");
      batch.tasks.call->on_error(index, std::move(status));
      ++tasks_failed_;
    }
  }
  if (batch.reported == batch.tasks.count) {
    slot.batches.pop_front();
    if (!slot.batches.empty()) {
      slot.batches.front().front_since_ns = monotonic_now_ns();
      // It may now be on a batch of a call cancelled while it sat in this worker's queue.
      if (slot.batches.front().tasks.call->cancelled) stop_cancelled_work(slot);
    }
    check_memory(slot);
  }
}

void PoolCore::Impl::check_memory(Slot& slot) {
  if (options_.max_worker_rss_bytes == 0 || slot.recycling) return;
  const int64_t now = monotonic_now_ns();
  if (now - slot.last_memory_check_ns < kMemoryCheckIntervalNs) return;
  slot.last_memory_check_ns = now;
  const size_t rss = resident_bytes(slot.process.pid());
  if (rss > options_.max_worker_rss_bytes) {
    slot.recycling = true;
    log_worker(slot, LogSeverity::kInfo,
               absl::StrFormat("recycling: resident memory %d bytes exceeds max_worker_rss_bytes %d",
                               rss, options_.max_worker_rss_bytes));
  }
}

void PoolCore::Impl::kill_worker(Slot& slot, absl::Status reason, int signal) {
  if (!slot.alive) return;
  if (!slot.kill_reason) {
    slot.kill_reason = std::move(reason);
    log_worker(slot, LogSeverity::kWarning,
               absl::StrCat("stopping with SIG", sigabbrev_np(signal), ": ",
                            slot.kill_reason->message()));
  }
  slot.process.kill(signal);
  if (signal == SIGKILL) {
    slot.killed_hard = true;
  } else if (slot.kill_deadline_ns == 0) {
    slot.kill_deadline_ns = monotonic_now_ns() + absl::ToInt64Nanoseconds(options_.kill_grace);
  }
}

void PoolCore::Impl::handle_exit(Slot& slot, int wait_status) {
  slot.alive = false;
  slot.process.close_channel();
  const bool clean_exit = WIFEXITED(wait_status) &&
                          (WEXITSTATUS(wait_status) == kWorkerExitOk ||
                           WEXITSTATUS(wait_status) == kWorkerExitExitHookFailed);
  const bool expected = slot.shutdown_sent && clean_exit && !slot.kill_reason;
  const std::string how = absl::StrCat(describe(slot), " ", describe_wait_status(wait_status));
  log_worker(slot, expected ? LogSeverity::kInfo : LogSeverity::kWarning, how);
  if (!slot.exit_hook_status.ok()) {
    join_problems_.push_back(absl::StrCat(describe(slot), ": exit() failed: ",
                                          slot.exit_hook_status.message()));
    if (join_code_ == absl::StatusCode::kOk) join_code_ = slot.exit_hook_status.code();
  }

  // Settle every task the worker held. Ones it never started go back to the front of the queue.
  // The one it was running fails; so do ones it finished but whose results died with it (a
  // worker holds back results of short tasks for up to 2 ms). Both run again instead while the
  // call's retries allow (the user's consent to running a task twice), unless we killed the
  // worker on purpose: a timeout or bad frames would only repeat.
  const absl::Status died = slot.kill_reason.value_or(
      absl::AbortedError(absl::StrCat(how, " while running this task")));
  const bool bad_frames =
      slot.kill_reason && slot.kill_reason->code() == absl::StatusCode::kDataLoss;
  StatusPage* page = slot.process.page();
  const uint64_t page_seq = page->batch_seq.load(std::memory_order_acquire);
  const bool page_running = page->running.load(std::memory_order_acquire) != 0;
  const size_t page_index = page->task_index.load(std::memory_order_relaxed);
  // The batch the worker was on: batches before it are finished (their results may have been on
  // the way), batches after it never started.
  size_t current = slot.batches.size();
  for (size_t b = 0; b < slot.batches.size(); ++b) {
    if (slot.batches[b].seq == page_seq) current = b;
  }
  std::vector<TaskRange> requeue;
  for (size_t b = 0; b < slot.batches.size(); ++b) {
    Batch& batch = slot.batches[b];
    TaskRange& tasks = batch.tasks;
    size_t unreported_end = batch.reported;  // [reported, unreported_end) finished, unreported
    std::optional<size_t> running;
    if (b < current && current < slot.batches.size()) {
      unreported_end = tasks.count;
    } else if (b == current) {
      const size_t finished = std::min(page_running ? page_index : page_index + 1, tasks.count);
      unreported_end = std::max<size_t>(finished, batch.reported);
      if (page_running && page_index >= batch.reported && page_index < tasks.count) {
        running = page_index;
      }
    }
    if (unreported_end > batch.reported) {
      const size_t count = unreported_end - batch.reported;
      if (bad_frames) {
        fail(tasks, tasks.first + batch.reported, count, died);
      } else if (tasks.attempt < tasks.call->settings().retries) {
        requeue.push_back(
            TaskRange{tasks.call, tasks.first + batch.reported, count, tasks.attempt + 1});
      } else {
        fail(tasks, tasks.first + batch.reported, count,
             absl::AbortedError(absl::StrCat(how, " after this task finished but before its "
                                             "result was sent")));
      }
    }
    size_t not_started = unreported_end;
    if (running) {
      const size_t index = tasks.first + *running;
      if (!slot.kill_reason && tasks.attempt < tasks.call->settings().retries) {
        requeue.push_back(TaskRange{tasks.call, index, 1, tasks.attempt + 1});
      } else {
        fail(tasks, index, 1, died);
      }
      not_started = *running + 1;
    }
    if (not_started < tasks.count) {
      requeue.push_back(
          TaskRange{tasks.call, tasks.first + not_started, tasks.count - not_started, tasks.attempt});
    }
  }
  slot.batches.clear();
  slot.writer.clear();
  requeue_or_drop(requeue);

  if (joining_ && join_deadline_passed_) {
    join_problems_.push_back(
        absl::StrCat(how, " after join_timeout (", absl::FormatDuration(options_.join_timeout),
                     ") passed"));
    join_code_ = absl::StatusCode::kDeadlineExceeded;
  }

  // Replace it, unless the pool is stopping or the worker was recycled out with nothing to do.
  const bool stopping = terminating_ || join_deadline_passed_ || !broken_.ok();
  const bool wanted = (!expected || slot.recycling) && (!joining_ || work_outstanding());
  if (stopping || !wanted) {
    if (!pending_.empty() && !any_alive()) {
      fail_pending(broken_.ok() ? died : broken_);
    }
    return;
  }
  // A crash loop is workers dying on their own before finishing a single task, with no result
  // arriving in between: a worker that finished tasks, or one we killed (a timeout, a bad
  // frame), says nothing about the next one.
  if (!expected && !slot.kill_reason && page->tasks_done.load(std::memory_order_relaxed) == 0) {
    const absl::Time now = absl::Now();
    recent_deaths_.push_back(now);
    while (!recent_deaths_.empty() && now - recent_deaths_.front() > kDeathWindow) {
      recent_deaths_.pop_front();
    }
    const size_t limit = std::max<size_t>(8, 2 * slots_.size());
    if (recent_deaths_.size() > limit) {
      break_pool(absl::AbortedError(absl::StrFormat(
          "workers keep dying (%d deaths within %s); not restarting them. Last: %s",
          recent_deaths_.size(), absl::FormatDuration(kDeathWindow), how)));
      return;
    }
  }
  ++workers_restarted_;
  spawn(slot);
}

int PoolCore::Impl::check_deadlines() {
  const int64_t now = monotonic_now_ns();
  int64_t next = now + int64_t{kMaxPollMs} * 1'000'000;
  if (joining_ && !join_deadline_passed_) {
    if (now >= join_deadline_ns_) {
      join_deadline_passed_ = true;
      for (Slot& slot : slots_) {
        if (!slot.alive) continue;
        kill_worker(slot,
                    terminating_ ? absl::CancelledError("the pool was terminated")
                                 : absl::DeadlineExceededError(absl::StrCat(
                                       "the pool's join_timeout (",
                                       absl::FormatDuration(options_.join_timeout), ") passed")),
                    SIGTERM);
      }
      fail_pending(terminating_ ? absl::CancelledError("the pool was terminated")
                                : absl::DeadlineExceededError("join_timeout passed before this "
                                                              "task could start"));
    } else {
      next = std::min(next, join_deadline_ns_);
    }
  }
  for (Slot& slot : slots_) {
    if (!slot.alive) continue;
    if (slot.kill_deadline_ns != 0 && !slot.killed_hard) {
      if (now >= slot.kill_deadline_ns) {
        kill_worker(slot, absl::OkStatus(), SIGKILL);
      } else {
        next = std::min(next, slot.kill_deadline_ns);
      }
    }
    if (!slot.ready && !slot.kill_reason && options_.enter_timeout != absl::InfiniteDuration()) {
      const int64_t deadline = slot.started_ns + absl::ToInt64Nanoseconds(options_.enter_timeout);
      if (now >= deadline) {
        absl::Status late = absl::DeadlineExceededError(absl::StrCat(
            describe(slot), " did not finish enter() within enter_timeout (",
            absl::FormatDuration(options_.enter_timeout), ")"));
        kill_worker(slot, late, SIGTERM);
        break_pool(late);
        next = std::min(next, slot.kill_deadline_ns);
      } else {
        next = std::min(next, deadline);
      }
    }
    if (slot.batches.empty() || slot.kill_reason) continue;
    const Batch& batch = slot.batches.front();
    if (batch.timeout == absl::InfiniteDuration()) continue;
    StatusPage* page = slot.process.page();
    const bool started = page->batch_seq.load(std::memory_order_relaxed) == batch.seq;
    if (!started || !page->running.load(std::memory_order_acquire)) {
      // Not started yet, or between tasks. A worker that stays so past the timeout (and the
      // grace) is stuck or stopped: it holds tasks it will never run, so it goes too.
      int64_t idle_since = batch.front_since_ns;
      if (started) idle_since = std::max(idle_since, page->started_ns.load(std::memory_order_relaxed));
      const int64_t deadline = idle_since + absl::ToInt64Nanoseconds(batch.timeout) +
                               absl::ToInt64Nanoseconds(options_.kill_grace);
      if (now >= deadline) {
        kill_worker(slot,
                    absl::DeadlineExceededError(absl::StrFormat(
                        "%s did not start its next task within the task timeout of %s; it is "
                        "stuck or stopped and was killed",
                        describe(slot), absl::FormatDuration(batch.timeout))),
                    SIGKILL);
      } else {
        next = std::min(next, std::min(deadline, now + 1'000'000));
      }
      continue;
    }
    // Workers stamp scalar tasks with the coarse clock, which runs behind by up to its
    // resolution: never kill a task before its time.
    const int64_t deadline = page->started_ns.load(std::memory_order_relaxed) +
                             absl::ToInt64Nanoseconds(batch.timeout) + coarse_clock_slack_ns();
    if (now >= deadline) {
      const size_t index = batch.tasks.first + page->task_index.load(std::memory_order_relaxed);
      kill_worker(slot,
                  absl::DeadlineExceededError(absl::StrFormat(
                      "task %d of its call ran past its timeout of %s; %s was killed", index,
                      absl::FormatDuration(batch.timeout), describe(slot))),
                  SIGTERM);
      next = std::min(next, slot.kill_deadline_ns);
    } else {
      next = std::min(next, deadline);
    }
  }
  const int64_t wait_ns = std::max<int64_t>(0, next - now);
  return static_cast<int>(std::min<int64_t>((wait_ns + 999'999) / 1'000'000, kMaxPollMs));
}

void PoolCore::Impl::loop() {
  std::unique_lock lock(mu_);
  if (fork_from_pool_thread_) {
    start_fork_server();
    for (Slot& slot : slots_) {
      if (broken_.ok()) spawn(slot);
    }
  }
  // What each pollfd is. A slot's entries carry its generation: when handling one event respawns
  // a worker, the slot's later entries (whose fd numbers the new worker may reuse) are stale.
  enum class Source { kWake, kForkServer, kChannel, kPidfd };
  struct Owner {
    Source source;
    int slot = -1;
    uint64_t generation = 0;
  };
  std::vector<pollfd> fds;
  std::vector<Owner> owners;
  while (true) {
    // Exit reports a spawn read ahead of its reply: the fork server's socket will not say so.
    while (fork_server_ && fork_server_->has_queued_exits()) handle_fork_server_reports();
    dispatch();
    maybe_send_shutdowns();
    const int timeout_ms = check_deadlines();
    if (joining_ && !any_alive()) {
      if (!pending_.empty()) fail_pending(broken_.ok() ? absl::AbortedError("no worker is left") : broken_);
      break;
    }

    fds.clear();
    owners.clear();
    fds.push_back({wake_fd_.get(), POLLIN, 0});
    owners.push_back({Source::kWake});
    if (fork_server_) {
      fds.push_back({fork_server_->fd(), POLLIN, 0});
      owners.push_back({Source::kForkServer});
    }
    for (Slot& slot : slots_) {
      if (!slot.alive) continue;
      slot.missing_from_poll = slot.borrowed;
      if (slot.process.channel_fd() >= 0 && !slot.borrowed) {
        short events = POLLIN;
        if (!slot.writer.empty()) events |= POLLOUT;
        fds.push_back({slot.process.channel_fd(), events, 0});
        owners.push_back({Source::kChannel, slot.index, slot.generation});
      }
      // A fork server's worker is not our child: the server reports its exit.
      if (!fork_server_) {
        fds.push_back({slot.process.pidfd(), POLLIN, 0});
        owners.push_back({Source::kPidfd, slot.index, slot.generation});
      }
    }

    lock.unlock();
    int ready = ::poll(fds.data(), fds.size(), timeout_ms);
    lock.lock();
    if (ready < 0) continue;  // EINTR

    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      const Owner& owner = owners[i];
      if (owner.source == Source::kWake) {
        uint64_t count;
        (void)!::read(wake_fd_.get(), &count, sizeof(count));
        continue;
      }
      if (owner.source == Source::kForkServer) {
        if (fork_server_) handle_fork_server_reports();
        continue;
      }
      Slot& slot = slots_[owner.slot];
      if (!slot.alive || slot.generation != owner.generation) continue;
      // Its borrower reads the channel; this poll set predates the borrow.
      if (owner.source == Source::kChannel && slot.borrowed) continue;
      if (owner.source == Source::kPidfd) {
        // Drain what it sent before it died: results it reported are real.
        if (slot.process.channel_fd() >= 0) read_from(slot);
        if (std::optional<int> status = slot.process.try_reap()) handle_exit(slot, *status);
        continue;
      }
      if (slot.process.channel_fd() < 0) continue;
      if (fds[i].revents & POLLOUT) {
        if (!slot.writer.write_some(slot.process.channel_fd()).ok()) slot.writer.clear();
      }
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) read_from(slot);
    }
  }
  loop_done_ = true;
  loop_done_cv_.notify_all();
}

PoolCore::PoolCore(PoolOptions options, WorkerBodyFactory factory)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(factory))) {
  link_->core_ = this;
  register_pool(this);
}
PoolCore::~PoolCore() {
  // First, so the signal thread never acts on a pool being destroyed.
  unregister_pool(this);
  // Before impl_ is reset: until the pool thread has stopped, it may still deliver results whose
  // completions post callbacks through this PoolCore.
  impl_->shutdown();
  // AsyncResults that outlive the pool now run their callbacks themselves (CoreLink); this waits
  // for one in progress.
  {
    std::lock_guard lock(link_->mu_);
    link_->core_ = nullptr;
  }
  impl_.reset();
}
void PoolCore::cancel_pending(absl::Status status) { impl_->cancel_pending(std::move(status)); }
absl::Status PoolCore::submit(std::shared_ptr<Call> call, size_t first, size_t count) {
  return impl_->submit(std::move(call), first, count);
}
absl::Status PoolCore::run_one(std::shared_ptr<Call> call, const std::function<bool()>& done) {
  return impl_->run_one(std::move(call), done);
}
void PoolCore::cancel(const Call* call) { impl_->cancel(call); }
bool PoolCore::cancel_call(Call* call, absl::Status status, const std::function<bool()>& settle) {
  return impl_->cancel_call(call, status, settle);
}
void PoolCore::post_callback(std::function<void()> callback) {
  impl_->post_callback(std::move(callback));
}
absl::Status PoolCore::close() { return impl_->close(); }
absl::Status PoolCore::join() { return impl_->join(); }
absl::Status PoolCore::join(absl::Duration timeout) { return impl_->join_for(timeout); }
void PoolCore::terminate() { impl_->terminate(); }
int PoolCore::worker_count() const { return impl_->worker_count_; }
PoolStats PoolCore::stats() const { return impl_->stats(); }
const PoolOptions& PoolCore::options() const { return impl_->options_; }
void PoolCore::log(LogSeverity severity, std::string message) const {
  impl_->log(severity, "procpool", ::getpid(), std::move(message));
}

}  // namespace procpool::internal
