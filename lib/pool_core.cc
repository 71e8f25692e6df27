// PoolCore: the pool's lock, its thread and event loop, and the public entry points, over the
// scheduler (lib/scheduler), supervision (lib/supervision) and the launcher of its links
// (lib/link). docs/ARCHITECTURE.md follows a job through these layers.

#include "procpool/internal/pool_core.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/callback_runner.h"
#include "lib/common/clock.h"
#include "lib/common/mutex.h"
#include "lib/common/unique_fd.h"
#include "lib/link/fork_launcher.h"
#include "lib/link/remote_launcher.h"
#include "lib/options_check.h"
#include "lib/pool_registry.h"
#include "lib/scheduler/scheduler.h"
#include "lib/supervision/supervisor.h"

namespace procpool::internal {
namespace {

// The loop wakes at least this often even with nothing to wait for, as a safety net.
constexpr int64_t kMaxPollNs = 1'000'000'000;
// A caller reading a borrowed worker's channel (apply) wakes this often to notice a stop.
constexpr int kBorrowPollMs = 100;

int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

}  // namespace

class PoolCore::Impl {
 public:
  Impl(PoolOptions options, WorkerBodyFactory factory, std::string worker_type);
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
  std::string remote_address() const;
  void post_callback(std::function<void()> callback);
  void log(LogSeverity severity, const std::string& process, int pid,
           const std::string& message) const;

  // True in a process the pool was inherited by (a worker): nothing of it may be touched there,
  // not even its lock, which another thread may have held at the fork.
  bool foreign() const { return ::getpid() != owner_pid_; }

  const PoolOptions options_;
  const int worker_count_;

 private:
  absl::Status foreign_error() const;
  absl::Status admit(const CallSettings& settings) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ensure_thread() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Starts close-then-join (once); `with_deadline` arms join_timeout's clock (once).
  absl::Status begin_join(bool with_deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void loop(MutexLock& lock) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void run_loop_to_end(MutexLock& lock) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void wake();

  const pid_t owner_pid_;
  const absl::Status invalid_options_;
  const WorkerBodyFactory factory_;
  const absl::Time start_time_ = absl::Now();
  // PR_SET_PDEATHSIG follows the thread that forked, not the process. The main thread lives as
  // long as the program, so the constructor forks from it when it runs there, before the pool
  // has a thread of its own; any other thread may end before the pool does, and then the pool
  // thread forks, first thing.
  const bool fork_from_pool_thread_;
  UniqueFd wake_fd_;

  mutable Mutex mu_;
  std::condition_variable loop_done_cv_;
  std::unique_ptr<Launcher> launcher_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Scheduler> scheduler_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Supervisor> supervisor_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool joining_ ABSL_GUARDED_BY(mu_) = false;
  bool join_deadline_armed_ ABSL_GUARDED_BY(mu_) = false;
  bool loop_running_ ABSL_GUARDED_BY(mu_) = false;
  bool loop_done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status thread_failure_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;

  CallbackRunner callbacks_;
};

PoolCore::Impl::Impl(PoolOptions options, WorkerBodyFactory factory, std::string worker_type)
    : options_(std::move(options)),
      worker_count_(options_.workers > 0 ? options_.workers : cpu_count()),
      owner_pid_(::getpid()),
      invalid_options_(check_pool_options(options_, /*remote_allowed=*/!worker_type.empty())),
      factory_(std::move(factory)),
      fork_from_pool_thread_(::gettid() != ::getpid()),
      callbacks_([this](const std::string& what) {
        log(LogSeverity::kError, "procpool", ::getpid(), absl::StrCat("a callback threw: ", what));
      }) {
  MutexLock lock(mu_);
  if (!invalid_options_.ok()) {
    loop_done_ = true;
    return;
  }
  absl::StatusOr<UniqueFd> wake = make_event_fd();
  if (!wake.ok()) {
    thread_failure_ = wake.status();
    loop_done_ = true;
    return;
  }
  wake_fd_ = *std::move(wake);
  if (options_.remote) {
    absl::StatusOr<std::unique_ptr<RemoteLauncher>> remote =
        RemoteLauncher::start(RemoteLauncher::Config{.remote = *options_.remote,
                                                     .max_frame_bytes = options_.max_frame_bytes,
                                                     .kill_grace = options_.kill_grace,
                                                     .frame_timeout = options_.frame_timeout,
                                                     .name = options_.name,
                                                     .worker_type = worker_type,
                                                     .report_resident_bytes =
                                                         options_.max_worker_rss_bytes > 0});
    if (!remote.ok()) {
      thread_failure_ = remote.status();
      loop_done_ = true;
      return;
    }
    log(LogSeverity::kInfo, "procpool", ::getpid(),
        absl::StrCat("listening for remote workers; they dial ", (*remote)->address()));
    launcher_ = *std::move(remote);
  } else {
    launcher_ = std::make_unique<ForkLauncher>(ForkLauncher::Config{
        .process_name_prefix = options_.name,
        .fork_server = options_.start_method == StartMethod::kForkServer,
        .max_frame_bytes = options_.max_frame_bytes,
        .frame_timeout = options_.frame_timeout,
        .factory = &factory_});
  }
  scheduler_ = std::make_unique<Scheduler>(Scheduler::Config{
      .workers = worker_count_,
      .max_frame_bytes = options_.max_frame_bytes,
      .max_tasks_per_worker = options_.max_tasks_per_worker,
      .task_timeout = options_.task_timeout,
      .kill_grace = options_.kill_grace,
      // A remote worker's progress reaches the pool late: a batch queued behind its running one
      // could not be told apart from one it started if its host were lost. One batch at a time.
      .max_batches_per_worker = options_.remote ? size_t{1} : size_t{16}});
  supervisor_ = std::make_unique<Supervisor>(
      Supervisor::Config{
          .workers = worker_count_,
          .max_frame_bytes = options_.max_frame_bytes,
          .enter_timeout = options_.enter_timeout,
          .kill_grace = options_.kill_grace,
          .join_timeout = options_.join_timeout,
          .respawn_delay = options_.respawn_delay,
          .respawn_max_delay = options_.respawn_max_delay,
          .max_worker_rss_bytes = options_.max_worker_rss_bytes,
          .process_name_prefix = options_.name,
          .log = [this](LogSeverity severity, const std::string& process, int pid,
                        const std::string& message) { log(severity, process, pid, message); }},
      *launcher_, *scheduler_);
  if (!fork_from_pool_thread_) supervisor_->start_due(monotonic_now_ns());
  ensure_thread().IgnoreError();  // a failure is every call's error until a retry succeeds
}

PoolCore::Impl::~Impl() { shutdown(); }

absl::Status PoolCore::Impl::foreign_error() const {
  return absl::FailedPreconditionError(
      absl::StrCat("this pool belongs to process ", owner_pid_, "; a worker (process ", ::getpid(),
                   ") cannot use it"));
}

absl::Status PoolCore::Impl::ensure_thread() {
  if (loop_running_ || loop_done_) return thread_failure_;
  try {
    thread_ = std::thread([this] {
      MutexLock lock(mu_);
      loop(lock);
    });
    loop_running_ = true;
    thread_failure_ = absl::OkStatus();
  } catch (const std::system_error& e) {
    thread_failure_ = absl::ResourceExhaustedError(
        absl::StrCat("could not start the pool's thread: ", e.what(),
                     " (the process or thread limit is reached)"));
  }
  return thread_failure_;
}

absl::Status PoolCore::Impl::admit(const CallSettings& settings) {
  if (!invalid_options_.ok()) return invalid_options_;
  if (closed_) return absl::FailedPreconditionError("the pool is closed");
  if (absl::Status checked = check_call_settings(settings); !checked.ok()) return checked;
  if (absl::Status thread = ensure_thread(); !thread.ok()) return thread;
  return supervisor_->availability();
}

void PoolCore::Impl::shutdown() {
  {
    MutexLock lock(mu_);
    closed_ = true;
  }
  if (absl::Status joined = join(); !joined.ok()) {
    log(LogSeverity::kError, "procpool", ::getpid(), std::string(joined.message()));
  }
  if (thread_.joinable()) thread_.join();
  callbacks_.stop();
}

void PoolCore::Impl::post_callback(std::function<void()> callback) {
  callbacks_.post(std::move(callback));
}

void PoolCore::Impl::wake() {
  uint64_t one = 1;
  if (wake_fd_.valid()) (void)!::write(wake_fd_.get(), &one, sizeof(one));
}

void PoolCore::Impl::log(LogSeverity severity, const std::string& process, int pid,
                         const std::string& message) const {
  if (!options_.log_sink) return;
  LogEvent event;
  event.severity = severity;
  event.process = process;
  event.pid = pid;
  event.since_start = absl::Now() - start_time_;
  event.message = message;
  options_.log_sink(event);
}

void PoolCore::Impl::loop(MutexLock& lock) {
  if (fork_from_pool_thread_) supervisor_->start_due(monotonic_now_ns());
  std::vector<pollfd> fds;
  while (true) {
    const int64_t now = monotonic_now_ns();
    supervisor_->start_due(now);
    scheduler_->dispatch();
    // After dispatch, so that the deadlines of what was just sent count; dispatch again for
    // what the checks took back.
    int64_t next = supervisor_->check(now);
    scheduler_->dispatch();
    supervisor_->after_events();
    if (joining_ && !supervisor_->any_alive() &&
        (supervisor_->terminating() || supervisor_->join_deadline_passed() ||
         !scheduler_->work_outstanding() || !supervisor_->availability().ok())) {
      break;
    }

    fds.clear();
    fds.push_back({wake_fd_.get(), POLLIN, 0});
    supervisor_->add_pollfds(fds);
    next = std::min(next, now + kMaxPollNs);
    int timeout_ms = static_cast<int>(std::max<int64_t>(0, (next - now + 999'999) / 1'000'000));
    if (supervisor_->launcher_has_pending_events()) timeout_ms = 0;

    lock.unlock();
    const int ready = ::poll(fds.data(), fds.size(), timeout_ms);
    lock.lock();
    if (ready < 0) continue;  // EINTR
    if (fds[0].revents != 0) {
      uint64_t count;
      (void)!::read(wake_fd_.get(), &count, sizeof(count));
    }
    supervisor_->service(fds);
  }
  scheduler_->cancel_all(absl::AbortedError("no worker is left to run this task"));
  launcher_->finish();
  loop_done_ = true;
  loop_done_cv_.notify_all();
}

void PoolCore::Impl::run_loop_to_end(MutexLock& lock) {
  if (!loop_running_ && !loop_done_) {
    // No pool thread could be started: the calling thread runs the loop to its end itself.
    loop_running_ = true;
    loop(lock);
  }
  wait_on(loop_done_cv_, mu_, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return loop_done_; });
}

absl::Status PoolCore::Impl::submit(std::shared_ptr<Call> call, size_t first, size_t count) {
  if (foreign()) return foreign_error();
  {
    MutexLock lock(mu_);
    if (absl::Status admitted = admit(call->settings()); !admitted.ok()) return admitted;
    if (count == 0) return absl::OkStatus();
    scheduler_->submit(std::move(call), first, count);
    // Send to an idle worker from this thread: one thread hand-off fewer on the latency path.
    // The pool thread polls every channel already; it needs waking for what it must watch anew.
    scheduler_->dispatch();
  }
  wake();
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::run_one(std::shared_ptr<Call> call,
                                     const std::function<bool()>& done) {
  if (foreign()) return foreign_error();
  MutexLock lock(mu_);
  if (absl::Status admitted = admit(call->settings()); !admitted.ok()) return admitted;
  const bool has_timeout = call->settings().has_task_timeout
                               ? call->settings().task_timeout != absl::InfiniteDuration()
                               : options_.task_timeout != absl::InfiniteDuration();
  std::optional<int> slot;
  if (!has_timeout && !joining_) slot = scheduler_->dispatch_to_idle(call);
  if (!slot) {
    scheduler_->submit(std::move(call), 0, 1);
    scheduler_->dispatch();
    lock.unlock();
    wake();
    return absl::OkStatus();
  }
  // Borrow the worker: read its result on this thread, sparing the two hand-offs through the
  // pool thread. The pool thread still watches for the worker's end; if it dies, the pool thread
  // settles the task as for any other.
  const uint64_t generation = supervisor_->generation(*slot);
  WorkerLink* link = supervisor_->borrow(*slot);
  const int fd = link != nullptr ? link->channel_fd() : -1;
  while (fd >= 0 && supervisor_->generation(*slot) == generation && !done() &&
         !supervisor_->terminating()) {
    pollfd ready{fd, static_cast<short>(POLLIN | (link->has_unsent() ? POLLOUT : 0)), 0};
    lock.unlock();
    ::poll(&ready, 1, kBorrowPollMs);
    lock.lock();
    if (supervisor_->generation(*slot) != generation || link->channel_fd() != fd) break;
    supervisor_->pump_borrowed(*slot, ready.revents);
  }
  if (supervisor_->generation(*slot) == generation) supervisor_->give_back(*slot);
  lock.unlock();
  // The pool thread polls without this channel while it is borrowed: it must see it again.
  wake();
  return absl::OkStatus();
}

void PoolCore::Impl::cancel(const Call* call) {
  if (foreign()) return;
  {
    MutexLock lock(mu_);
    if (scheduler_) scheduler_->cancel(call, absl::CancelledError("cancelled before it started"));
  }
  wake();
}

void PoolCore::Impl::cancel_pending(absl::Status status) {
  if (foreign()) return;
  {
    MutexLock lock(mu_);
    if (scheduler_) scheduler_->cancel_all(status);
  }
  wake();
}

bool PoolCore::Impl::cancel_call(Call* call, const absl::Status& status,
                                 const std::function<bool()>& settle) {
  if (foreign()) return false;
  {
    MutexLock lock(mu_);
    if (!settle()) return false;
    call->cancelled = true;
    if (scheduler_) {
      // Tasks not started are taken back (exactly, through their claims); a worker running one
      // is stopped and replaced, like Pebble's future.cancel().
      scheduler_->cancel(call, status);
      scheduler_->stop_running(call, absl::CancelledError(
                                         "the task was cancelled; its worker was stopped"));
    }
  }
  wake();
  return true;
}

absl::Status PoolCore::Impl::close() {
  if (foreign()) return foreign_error();
  MutexLock lock(mu_);
  closed_ = true;
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::begin_join(bool with_deadline) {
  if (!closed_) return absl::FailedPreconditionError("join() needs close() or terminate() first");
  joining_ = true;
  if (supervisor_ == nullptr) return absl::OkStatus();  // invalid options: nothing was started
  if (with_deadline && !join_deadline_armed_) {
    join_deadline_armed_ = true;
    supervisor_->begin_join(options_.join_timeout == absl::InfiniteDuration()
                                ? INT64_MAX
                                : monotonic_now_ns() + to_ns(options_.join_timeout));
  } else {
    supervisor_->begin_join(INT64_MAX);
  }
  return absl::OkStatus();
}

absl::Status PoolCore::Impl::join() {
  if (foreign()) return foreign_error();
  {
    MutexLock lock(mu_);
    if (absl::Status begun = begin_join(/*with_deadline=*/true); !begun.ok()) return begun;
    if (supervisor_ == nullptr) return absl::OkStatus();
  }
  wake();
  MutexLock lock(mu_);
  run_loop_to_end(lock);
  return supervisor_->join_result();
}

absl::Status PoolCore::Impl::join_for(absl::Duration timeout) {
  if (foreign()) return foreign_error();
  {
    MutexLock lock(mu_);
    // Pebble's join(timeout): the shutdown starts, but join_timeout's clock is left to join():
    // a caller that polls with join(timeout) must not have its workers killed behind its back.
    if (absl::Status begun = begin_join(/*with_deadline=*/false); !begun.ok()) return begun;
    if (supervisor_ == nullptr) return absl::OkStatus();
    if (!loop_running_ && !loop_done_) {
      // No pool thread: this thread runs the shutdown to its end (it cannot give up midway).
      run_loop_to_end(lock);
      return supervisor_->join_result();
    }
  }
  wake();
  MutexLock lock(mu_);
  std::unique_lock<std::mutex> native(mu_.native(), std::adopt_lock);
  const bool done = loop_done_cv_.wait_for(
      native, absl::ToChronoNanoseconds(std::clamp(timeout, absl::ZeroDuration(), absl::Hours(24 * 365))),
      [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return loop_done_; });
  native.release();
  if (done) return supervisor_->join_result();
  return absl::DeadlineExceededError(absl::StrCat(
      "join: workers still running after ", absl::FormatDuration(timeout),
      "; none was stopped, the shutdown goes on"));
}

void PoolCore::Impl::terminate() {
  if (foreign()) return;
  {
    MutexLock lock(mu_);
    closed_ = true;
    if (!supervisor_ || loop_done_) return;
    joining_ = true;
    supervisor_->terminate();
  }
  wake();
  MutexLock lock(mu_);
  run_loop_to_end(lock);
}

std::string PoolCore::Impl::remote_address() const {
  if (foreign()) return "";
  MutexLock lock(mu_);
  if (auto* remote = dynamic_cast<const RemoteLauncher*>(launcher_.get())) return remote->address();
  return "";
}

PoolStats PoolCore::Impl::stats() const {
  PoolStats stats;
  if (foreign()) return stats;
  MutexLock lock(mu_);
  if (!scheduler_) return stats;
  stats.tasks_submitted = scheduler_->tasks_submitted();
  stats.tasks_done = scheduler_->tasks_done();
  stats.tasks_failed = scheduler_->tasks_failed();
  supervisor_->fill_stats(stats);
  return stats;
}

PoolCore::PoolCore(PoolOptions options, WorkerBodyFactory factory, std::string worker_type)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(factory), std::move(worker_type))) {
  link_->core_ = this;
  register_pool(this);
}

PoolCore::~PoolCore() {
  if (impl_->foreign()) {
    // A worker inherited this pool and is being torn down (user code called exit()): the
    // parent's threads do not exist here and its lock may be held for good. Leave the pool as it
    // is, leaked; this process ends without it.
    (void)impl_.release();
    return;
  }
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
void PoolCore::post_callback(std::function<void()> callback) {
  impl_->post_callback(std::move(callback));
}
absl::Status PoolCore::close() { return impl_->close(); }
absl::Status PoolCore::join() { return impl_->join(); }
absl::Status PoolCore::join(absl::Duration timeout) { return impl_->join_for(timeout); }
bool PoolCore::cancel_call(Call* call, absl::Status status, const std::function<bool()>& settle) {
  return impl_->cancel_call(call, status, settle);
}
void PoolCore::terminate() { impl_->terminate(); }
int PoolCore::worker_count() const { return impl_->worker_count_; }
PoolStats PoolCore::stats() const { return impl_->stats(); }
std::string PoolCore::remote_address() const { return impl_->remote_address(); }
const PoolOptions& PoolCore::options() const { return impl_->options_; }
void PoolCore::log(LogSeverity severity, std::string message) const {
  impl_->log(severity, "procpool", ::getpid(), message);
}

}  // namespace procpool::internal
