// PoolCore: the pool's lock, its thread and event loop, over the scheduler (lib/scheduler),
// supervision (lib/supervision) and the launcher of its links (lib/link); what callers' threads do
// is in pool_calls.cc. docs/ARCHITECTURE.md follows a job through these layers.

#include "procpool/internal/pool_core.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/callback_runner.h"
#include "lib/common/clock.h"
#include "lib/common/mutex.h"
#include "lib/common/poll_set.h"
#include "lib/common/process_id.h"
#include "lib/common/unique_fd.h"
#include "lib/link/fork_launcher.h"
#include "lib/link/remote_launcher.h"
#include "lib/metrics_server.h"
#include "lib/options_check.h"
#include "lib/pool_registry.h"
#include "lib/scheduler/scheduler.h"
#include "lib/supervision/supervisor.h"
#include "lib/pool_core_impl.h"
#include "procpool/metrics.h"

namespace procpool::internal {
namespace {

// The loop wakes at least this often even with nothing to wait for, as a safety net.
constexpr int64_t kMaxPollNs = 1'000'000'000;

// The pool whose event loop this thread runs, or whose lock it holds while it runs the
// program's code (PoolCore::HeldLockMark), if any (PoolCore::Impl::called_from_own_loop).
thread_local const void* loop_of_this_thread = nullptr;

int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

}  // namespace

PoolCore::HeldLockMark::HeldLockMark(const Impl* pool)
    : outer_(std::exchange(loop_of_this_thread, pool)) {}
PoolCore::HeldLockMark::~HeldLockMark() { loop_of_this_thread = outer_; }

PoolCore::Impl::Impl(PoolOptions options, WorkerBodyFactory factory, std::string worker_type,
                     PoolCore::Features features)
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
  if (!options_.metrics_listen.empty()) {
    // Listened on now, so that a port in use is every call's error; served once the workers are
    // forked (serve_metrics): a scrape before could start the pool thread (stats()).
    absl::StatusOr<std::unique_ptr<MetricsServer>> metrics = MetricsServer::listen(
        *parse_metrics_listen(options_.metrics_listen),
        [this] { return metrics_text(stats(), options_.name); });
    if (!metrics.ok()) {
      thread_failure_ = metrics.status();
      loop_done_ = true;
      return;
    }
    metrics_server_ = *std::move(metrics);
  }
  if (options_.remote) {
    absl::StatusOr<std::unique_ptr<RemoteLauncher>> remote =
        RemoteLauncher::start(RemoteLauncher::Config{.remote = *options_.remote,
                                                     .max_frame_bytes = options_.max_frame_bytes,
                                                     .kill_grace = options_.kill_grace,
                                                     .frame_timeout = options_.frame_timeout,
                                                     .name = options_.name,
                                                     .worker_type = worker_type,
                                                     .report_resident_bytes =
                                                         options_.max_worker_rss_bytes > 0 ||
                                                         !options_.metrics_listen.empty(),
                                                     .max_worker_memory_bytes =
                                                         options_.max_worker_memory_bytes,
                                                     .cgroups_off =
                                                         options_.cgroups == Cgroups::kOff,
                                                     .workers = worker_count_,
                                                     .worker_env = options_.worker_env,
                                                     .spread_cpus = options_.cpu_affinity ==
                                                                    CpuAffinity::kSpread,
                                                     .forward_output = options_.worker_output !=
                                                                       WorkerOutput::kInherit,
                                                     .crash_backtraces = options_.crash_backtraces});
    if (!remote.ok()) {
      thread_failure_ = remote.status();
      loop_done_ = true;
      return;
    }
    log(LogSeverity::kInfo, "procpool", ::getpid(),
        absl::StrCat("listening for remote workers; they dial ", (*remote)->address()));
    launcher_ = *std::move(remote);
  } else {
    auto forks = std::make_unique<ForkLauncher>(ForkLauncher::Config{
        .process_name_prefix = options_.name,
        .fork_server = options_.start_method == StartMethod::kForkServer,
        .max_frame_bytes = options_.max_frame_bytes,
        .frame_timeout = options_.frame_timeout,
        .factory = &factory_,
        .blob_regions = features.blob_regions,
        .cgroups = options_.cgroups,
        .max_worker_memory_bytes = options_.max_worker_memory_bytes,
        .workers = worker_count_,
        .worker_env = options_.worker_env,
        .spread_cpus = options_.cpu_affinity == CpuAffinity::kSpread,
        .forward_output = options_.worker_output == WorkerOutput::kForward,
        .crash_backtraces = options_.crash_backtraces});
    // Which mechanism stops workers' trees and holds the memory cap, said once at start.
    log(LogSeverity::kInfo, "procpool", ::getpid(), forks->cgroup_plan().describe());
    launcher_ = std::move(forks);
  }
  scheduler_ = std::make_unique<Scheduler>(Scheduler::Config{
      .workers = worker_count_,
      .max_frame_bytes = options_.max_frame_bytes,
      .max_tasks_per_worker = options_.max_tasks_per_worker,
      .task_timeout = options_.task_timeout,
      .kill_grace = options_.kill_grace,
      .cancel_grace = options_.cancel_grace,
      // A remote worker's progress reaches the pool late: a batch queued behind its running one
      // could not be told apart from one it started if its host were lost. One batch at a time.
      .max_batches_per_worker =
          options_.remote ? size_t{1} : Scheduler::Config{}.max_batches_per_worker});
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
          .cancel_grace = options_.cancel_grace,
          .idle_timeout = options_.idle_timeout,
          .min_workers = options_.min_workers,
          .process_name_prefix = options_.name,
          .log = [this](LogEvent event) { emit(std::move(event)); },
          .log_lines = [this](LogEvent& event, std::span<const std::string_view> lines) {
            emit_lines(event, lines);
          }},
      *launcher_, *scheduler_, poll_set_);
}

void PoolCore::Impl::start() {
  MutexLock lock(mu_);
  if (loop_done_) return;  // the constructor failed: every call says why
  if (!fork_from_pool_thread_) {
    supervisor_->start_due(monotonic_now_ns());
    // Forked here; the pool thread starts with the first call (or stats(), join(timeout)): a
    // pool made and joined without a call never pays for a thread (its creation, first-touch
    // faults on its stack, its exit), and join() runs the shutdown on the joining thread. Until
    // then the workers start on their own and wait; a worker lost meanwhile is noticed then.
    // Remote workers cannot wait so: their hosts dial in and are answered by the pool thread;
    // nor can idle_timeout, whose clock the pool thread keeps.
    if (!options_.remote && options_.idle_timeout == absl::InfiniteDuration()) return;
  }
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
      loop();
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
  if (thread_.joinable() && thread_.get_id() == std::this_thread::get_id()) {
    // Destroyed from a progress callback (which runs on the pool thread, holding its lock): the
    // thread cannot close and join itself. Say so rather than hang.
    std::fprintf(stderr,
                 "procpool: a pool cannot be destroyed on its own pool thread (from a progress "
                 "callback); destroy it from another thread or from a result callback\n");
    std::abort();
  }
  bool reported = false;
  {
    MutexLock lock(mu_);
    closed_ = true;
    reported = join_failure_reported_;
  }
  // A failed shutdown is logged once: not when the program's own join() returned it, nor again
  // when this runs a second time (the core's destructor, then this object's).
  if (absl::Status joined = join(); !joined.ok() && !reported) {
    log(LogSeverity::kError, "procpool", ::getpid(), std::string(joined.message()));
  }
  if (thread_.joinable()) thread_.join();
  callbacks_.stop();
  metrics_server_.reset();
}

void PoolCore::Impl::serve_metrics() {
  if (!metrics_server_) return;
  if (absl::Status served = metrics_server_->serve(); !served.ok()) {
    log(LogSeverity::kError, "procpool", ::getpid(), std::string(served.message()));
    return;
  }
  log(LogSeverity::kInfo, "procpool", ::getpid(),
      absl::StrCat("serving metrics on http://", metrics_server_->address(), "/metrics"));
}

std::string PoolCore::Impl::metrics_address() const {
  return metrics_server_ && !foreign() ? metrics_server_->address() : "";
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
  LogEvent event;
  event.severity = severity;
  event.process = process;
  event.pid = pid;
  event.message = message;
  emit(std::move(event));
}

void PoolCore::Impl::emit(LogEvent event) const {
  if (!options_.log_sink) return;
  event.since_start = absl::Now() - start_time_;
  call_sink(event);
}

void PoolCore::Impl::emit_lines(LogEvent& event, std::span<const std::string_view> lines) const {
  if (!options_.log_sink) return;
  event.since_start = absl::Now() - start_time_;
  if (sink_is_log_to_stderr_) {
    log_lines_to_stderr(event, lines);
    return;
  }
  for (const std::string_view line : lines) {
    event.message.assign(line);  // its capacity kept from line to line: no allocation per line
    call_sink(event);
  }
}

void PoolCore::Impl::call_sink(const LogEvent& event) const {
  // The sink is the program's code, called on the pool thread (and callers'), under the pool's
  // lock: an exception escaping it would end the program (std::terminate) or leave the pool's
  // state half changed. Say so on stderr, the one place left to say it, and go on. Calls of the
  // pool from it are refused, on a caller's thread as on the pool's.
  const HeldLockMark mark(this);
  try {
    options_.log_sink(event);
  } catch (...) {
    const std::string what = describe_current_exception();
    std::fprintf(stderr, "procpool: the log sink threw %s, on: %s\n", what.c_str(),
                 event.message.c_str());
  }
}

bool PoolCore::Impl::called_from_own_loop() const { return loop_of_this_thread == this; }

absl::Status PoolCore::Impl::own_loop_error(const char* what) const {
  return absl::FailedPreconditionError(absl::StrCat(
      what, " was called from a progress function or the log sink, which run holding the pool "
            "(on the pool's own thread or a caller's), where it would wait for itself: call it "
            "from another thread or a result callback"));
}

void PoolCore::Impl::loop() {
  // What the loop calls of the user's (a progress function, the log sink) runs here, with mu_
  // held: calls of this pool from there are refused rather than left to wait for themselves.
  const HeldLockMark mark(this);
  if (fork_from_pool_thread_) supervisor_->start_due(monotonic_now_ns());
  // Only this thread waits on it; other threads touch the supervisor under mu_, never the set.
  PollSet& poll_set = supervisor_->poll_set();
  const pollfd wake{wake_fd_.get(), POLLIN, 0};
  poll_set.set(Supervisor::kPoolGroup, &wake, 1);
  while (true) {
    run_deferred_cancels();
    const int64_t now = monotonic_now_ns();
    supervisor_->start_due(now);
    scheduler_->dispatch();
    // After dispatch, so that the deadlines of what was just sent count; dispatch again for
    // what the checks took back.
    int64_t next = supervisor_->check(now);
    // A worker found gone by a check (without pidfds its exit is looked for there) is replaced
    // now, as one found gone by service() is at the top of the next turn, before the lock is let
    // go: whoever learns of the death sees its replacement started. (Its start is due from when
    // its end was seen, after `now`.)
    supervisor_->start_due(monotonic_now_ns());
    scheduler_->dispatch();
    supervisor_->after_events();
    if (joining_ && !supervisor_->any_alive() &&
        (supervisor_->terminating() || supervisor_->join_deadline_passed() ||
         !scheduler_->work_outstanding() || !supervisor_->availability().ok())) {
      break;
    }

    next = std::clamp(next, now, now + kMaxPollNs);
    int timeout_ms = static_cast<int>(std::max<int64_t>(0, (next - now + 999'999) / 1'000'000));
    if (supervisor_->launcher_has_pending_events()) timeout_ms = 0;

    mu_.unlock();
    const int ready = poll_set.wait(timeout_ms);
    mu_.lock();
    if (ready < 0) continue;  // EINTR
    if (poll_set.entries(Supervisor::kPoolGroup).front().revents != 0) {
      uint64_t count;
      (void)!::read(wake_fd_.get(), &count, sizeof(count));
    }
    supervisor_->service();
  }
  scheduler_->cancel_all(absl::AbortedError("no worker is left to run this task"));
  launcher_->finish();
  loop_done_ = true;
  loop_done_cv_.notify_all();
}

void PoolCore::Impl::run_loop_to_end() {
  if (!loop_running_ && !loop_done_) {
    // No pool thread could be started: the calling thread runs the loop to its end itself.
    loop_running_ = true;
    loop();
  }
  wait_on(loop_done_cv_, mu_, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return loop_done_; });
}

PoolCore::PoolCore(PoolOptions options, WorkerBodyFactory factory, std::string worker_type,
                   Features features)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(factory), std::move(worker_type),
                                   features)) {
  link_->core_ = this;
  // Only now, with the PoolCore whole: a worker gets a copy of it as it is at the fork, and a
  // task that calls the pool it came from (a global one) must find it able to refuse.
  impl_->start();
  impl_->serve_metrics();
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
void PoolCore::cancel(std::shared_ptr<const Call> call) { impl_->cancel(std::move(call)); }
void PoolCore::release_borrowed(const Call* call) { impl_->release_borrowed(call); }
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
int PoolCore::worker_count() const {
  return impl_->target_workers_.load(std::memory_order_relaxed);
}
absl::Status PoolCore::resize(int workers) { return impl_->resize(workers); }
PoolStats PoolCore::stats() const { return impl_->stats(); }
std::string PoolCore::remote_address() const { return impl_->remote_address(); }
std::string PoolCore::remote_token() const { return impl_->remote_token(); }
std::string PoolCore::metrics_address() const { return impl_->metrics_address(); }
const PoolOptions& PoolCore::options() const { return impl_->options_; }
void PoolCore::log(LogSeverity severity, std::string message) const {
  impl_->log(severity, "procpool", ::getpid(), message);
}

}  // namespace procpool::internal
