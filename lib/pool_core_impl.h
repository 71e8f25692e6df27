// PoolCore::Impl: the pool core's state and its two halves. pool_core.cc builds it, runs the pool
// thread and its event loop; pool_calls.cc has what callers' threads do (submit, apply's borrowed
// worker, cancel, close, join, terminate, stats). Private to lib/.

#ifndef PROCPOOL_LIB_POOL_CORE_IMPL_H_
#define PROCPOOL_LIB_POOL_CORE_IMPL_H_

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/callback_runner.h"
#include "lib/common/mutex.h"
#include "lib/common/process_id.h"
#include "lib/common/spin.h"
#include "lib/common/unique_fd.h"
#include "lib/link/launcher.h"
#include "lib/metrics_server.h"
#include "lib/output_sink.h"
#include "lib/scheduler/scheduler.h"
#include "lib/supervision/supervisor.h"
#include "procpool/internal/pool_core.h"

namespace procpool::internal {

class PoolCore::Impl {
 public:
  Impl(PoolOptions options, WorkerBodyFactory factory, std::string worker_type,
       PoolCore::Features features);
  ~Impl();
  // Forks the workers or starts the pool thread that forks them (see the constructor of
  // PoolCore). Called once, after the PoolCore holds this Impl.
  void start();
  // close() + join(), then runs the callbacks still queued and stops the callback thread.
  // Idempotent. Called while the PoolCore is whole: callbacks may still reach it through it.
  void shutdown();

  absl::Status submit(std::shared_ptr<Call> call, size_t first, size_t count);
  absl::Status run_one(std::shared_ptr<Call> call, const std::function<bool()>& done);
  void cancel(std::shared_ptr<const Call> call);
  void release_borrowed(const Call* call);
  void cancel_pending(absl::Status status);
  bool cancel_call(Call* call, const absl::Status& status, const std::function<bool()>& settle);
  absl::Status close();
  absl::Status join();
  absl::Status join_for(absl::Duration timeout);
  // The shutdown's outcome, as join() returns it to its caller: a failure counts as reported
  // (join_failure_reported_), so the destructor does not log it.
  absl::Status returned_join_result() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status resize(int workers);
  void terminate();
  PoolStats stats() const;
  std::string remote_address() const;
  std::string remote_token() const;
  // The metrics endpoint: serving starts once the workers are forked (the constructor listened).
  void serve_metrics();
  std::string metrics_address() const;
  void post_callback(std::function<void()> callback);
  void log(LogSeverity severity, const std::string& process, int pid,
           const std::string& message) const;
  // Stamps `event` with the time since the pool was made and hands it to the sink.
  void emit(LogEvent event) const;
  // The same for lines of a worker's output read at one time: `event` once per line, the line
  // its message, all with one time (Supervisor::Config::log_lines).
  void emit_lines(LogEvent& event, std::span<const std::string_view> lines) const;

  // True in a process the pool was inherited by (a worker): nothing of it may be touched there,
  // not even its lock, which another thread may have held at the fork.
  bool foreign() const { return current_pid() != owner_pid_; }
  // True on a thread running this pool's event loop, or the program's code under mu_ on a
  // caller's thread (PoolCore::HeldLockMark: a progress function, the log sink). A call of the
  // pool from there would wait for itself.
  bool called_from_own_loop() const;
  absl::Status own_loop_error(const char* what) const;
  // What cancel() and cancel_pending() do, under mu_.
  void cancel_locked(const Call* call) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void cancel_pending_locked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The pool thread, at the top of each turn of its loop: the cancels asked for from the pool's
  // own code (deferred_cancels_).
  void run_deferred_cancels() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PoolOptions options_;
  const int worker_count_;  // the size the pool was made with
  // Its size now: worker_count_, then what resize() said (read without the lock: workers()).
  std::atomic<int> target_workers_{worker_count_};

 private:
  // Calls the sink, which must not throw (an exception it throws is reported on stderr).
  void call_sink(const LogEvent& event) const;
  absl::Status foreign_error() const;
  absl::Status admit(const CallSettings& settings) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ensure_thread() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Starts close-then-join (once); `with_deadline` arms join_timeout's clock (once).
  absl::Status begin_join(bool with_deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs the event loop until the pool is done; releases mu_ only around poll().
  void loop() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void run_loop_to_end() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
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
  // The sink is the default one, which takes a read's lines at once (lib/output_sink.h).
  const bool sink_is_log_to_stderr_ = is_log_to_stderr(options_.log_sink);
  UniqueFd wake_fd_;

  mutable Mutex mu_;
  std::condition_variable loop_done_cv_;
  // The event loop's descriptors (only the pool thread waits on it). Before the launcher, which
  // watches its own in it until its end: the set goes last.
  PollSet poll_set_;
  std::unique_ptr<Launcher> launcher_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Scheduler> scheduler_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Supervisor> supervisor_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // join() returned the shutdown's failure to a caller (or shutdown() logged it): the destructor
  // does not log it (again).
  bool join_failure_reported_ ABSL_GUARDED_BY(mu_) = false;
  bool joining_ ABSL_GUARDED_BY(mu_) = false;
  bool join_deadline_armed_ ABSL_GUARDED_BY(mu_) = false;
  bool loop_running_ ABSL_GUARDED_BY(mu_) = false;
  bool loop_done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status thread_failure_ ABSL_GUARDED_BY(mu_);
  SpinPolicy spin_ ABSL_GUARDED_BY(mu_);  // for apply's borrowed round trips
  // cancel() and cancel_pending() asked for from the pool's own code (a log sink, a progress
  // function), which runs in the middle of the scheduler's work: the pool thread does them at its
  // next turn (run_deferred_cancels). Their own lock, taken after mu_ if both are: a sink may run
  // on a caller's thread that does not hold mu_ (while it reads a borrowed channel).
  struct DeferredCancels {
    std::vector<std::weak_ptr<const Call>> calls;
    std::optional<absl::Status> pending;
  };
  Mutex deferred_mu_;
  DeferredCancels deferred_cancels_ ABSL_GUARDED_BY(deferred_mu_);
  std::thread thread_;

  CallbackRunner callbacks_;
  // PoolOptions::metrics_listen. Last: its thread calls stats(), so it goes first (shutdown()).
  std::unique_ptr<MetricsServer> metrics_server_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_POOL_CORE_IMPL_H_
