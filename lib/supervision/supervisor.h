// Supervisor: the lives of a pool's workers, whatever their link.
//
// It starts a worker for every slot (through the Launcher), hands it to the scheduler once it is
// ready, replaces it when it ends, recycles it (max_tasks_per_worker, max_worker_rss_bytes), and
// stops it: politely with a shutdown frame at join, or by force (SIGTERM, then SIGKILL after
// kill_grace) for a timeout, a broken stream, join_timeout or terminate().
//
// The crash guard. A worker that dies while running a task is that task's failure, never the
// pool's: it is replaced at once, always. Only start failures count against the pool: a worker
// that could not be made (fork failed), died or failed before it was ready (its constructor,
// enter(), enter_timeout). After each, that slot's next start waits respawn_delay, doubled for
// every consecutive start failure pool-wide, up to respawn_max_delay; one worker starting
// cleanly resets it. While no worker is ready or starting and the last start failed, queued
// tasks and new calls fail at once with that failure (calls never wait for a worker that may
// never come), and the guard keeps trying: the pool recovers by itself when the cause goes away.
//
// It parses the frames a worker's stream carries to the pool (READY, ENTER_FAILED, RESULTS,
// EXITED, LOG; on_frame in supervisor_events.cc): whatever a malformed one makes Cap'n Proto throw
// becomes kDataLoss there. Other readers of a peer's bytes: a remote link's handshake and
// heartbeats (lib/link/remote_host.cc) and, on the worker's side, the relay and the task server
// (lib/link/relay.cc, lib/worker/task_server.cc).
//
// Threads: not thread-safe; the pool calls it with its lock held.

#ifndef PROCPOOL_LIB_SUPERVISION_SUPERVISOR_H_
#define PROCPOOL_LIB_SUPERVISION_SUPERVISOR_H_

#include <poll.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/common/poll_set.h"
#include "lib/link/launcher.h"
#include "lib/link/worker_link.h"
#include "lib/scheduler/scheduler.h"
#include "procpool/pool_options.h"
#include "procpool/pool_stats.h"

namespace procpool::internal {

class Supervisor final : private LauncherEvents {
 public:
  struct Config {
    int workers = 1;
    size_t max_frame_bytes = 0;
    absl::Duration enter_timeout;
    absl::Duration kill_grace;
    absl::Duration join_timeout;
    absl::Duration respawn_delay;
    absl::Duration respawn_max_delay;
    size_t max_worker_rss_bytes = 0;
    // PoolOptions::cancel_grace: terminate() first asks running tasks to stop, and waits this
    // long for them to return.
    absl::Duration cancel_grace = absl::ZeroDuration();
    // PoolOptions::idle_timeout and min_workers: a worker idle this long leaves while more than
    // min_workers remain, and work that no worker can take starts them again.
    absl::Duration idle_timeout = absl::InfiniteDuration();
    int min_workers = 0;
    std::string process_name_prefix;  // workers are "<prefix>-w3" in logs
    // Every event (the pool adds since_start and calls its sink).
    std::function<void(LogEvent)> log;
    // Lines of a worker's output read at one time: `event` once per line, with the line as its
    // message (one since_start for all; `event` is the caller's to reuse, its message changed).
    std::function<void(LogEvent& event, std::span<const std::string_view> lines)> log_lines;
  };
  // `poll_set` is the event loop's, and outlives the launcher (whose descriptors it watches).
  Supervisor(Config config, Launcher& launcher, Scheduler& scheduler, PollSet& poll_set);
  ~Supervisor() override;

  // Starts the workers that are due: every slot at first, then replacements whose delay passed.
  // Call from a thread the launcher allows (fork_launcher.h).
  void start_due(int64_t now_ns);

  // The event loop, over poll_set(): service() hands what the last wait found ready to the
  // launcher (its watches, group kLauncherGroup) and to those links, check() handles deadlines (of the links that are due or were
  // touched) and returns when it wants to be called again, and after_events() sends shutdowns that
  // became due, registers in poll_set() what changed since the last wait (the descriptors of new
  // and ended links, and what each link now waits for: only links something touched are asked),
  // and drops ended links. Call after_events() after service/check, before the next wait; the
  // caller waits on poll_set(), its own descriptors in group kPoolGroup.
  static constexpr uint32_t kPoolGroup = 0;
  PollSet& poll_set() { return poll_set_; }
  void service();
  int64_t check(int64_t now_ns);
  void after_events();
  bool launcher_has_pending_events() const;

  // OK, or the start failure calls fail with while no worker is ready or starting.
  absl::Status availability() const;
  // A worker process exists (starting, serving or stopping).
  bool any_alive() const;

  // resize(): the pool has `workers` slots from now on. Growing takes back retired slots (lowest
  // first) and adds new ones, whose workers start on the next start_due(); shrinking retires
  // slots: those without a worker first, then starting ones, then idle ones, busy ones last.
  // A retired slot's worker takes no new work, gives back the tasks it has not started, and once
  // idle runs exit() and leaves as at join (after_events); it is never replaced.
  void resize(int workers);

  // Close-then-join: workers with nothing to do are asked to run exit() and leave (a remote slot
  // still waiting for a worker host ends at once, and no host is given a worker then); past
  // `deadline_ns` the rest are stopped by force. Called again, keeps the earlier deadline.
  void begin_join(int64_t deadline_ns);
  bool join_deadline_passed() const { return join_deadline_passed_; }
  // OK if every worker left after its exit() returned OK; else what went wrong, naming them.
  absl::Status join_result() const;
  // Every worker is stopped at once, without exit(); every task without an outcome fails
  // kCancelled. Deliberate: nothing is logged above kInfo, and join() then returns OK. With a
  // cancel_grace, a worker running a task is first asked to stop every task, and is stopped when
  // its task returns or the grace ends.
  void terminate();
  bool terminating() const { return terminating_; }

  // apply's fast path: the caller reads `slot`'s channel itself until it gives it back.
  WorkerLink* borrow(int slot);
  void give_back(int slot);
  // Reads and writes what is ready on a borrowed channel (`revents` from the caller's poll).
  void pump_borrowed(int slot, short revents);
  // Counts the processes `slot` had: a caller that borrowed it sees whether it is the same one.
  uint64_t generation(int slot) const;
  // The link `slot` has now; null once it ended (the pool thread then drops it, borrowed or not).
  WorkerLink* link(int slot) const;

  // Every link copies the unsent bytes of frames that reference memory `borrower` lent
  // (WorkerLink::release_borrowed): nothing of that memory is read after this returns.
  void release_borrowed(const void* borrower);

  // The workers, restarts and bytes of `stats` (the scheduler's counters are the caller's).
  void fill_stats(PoolStats& stats) const;

 private:
  enum class State { kEmpty, kStarting, kReady, kDraining, kShutdownSent };
  class Events;
  class Port;
  struct ProcessState;
  struct Slot;

  LinkEvents& events_of(WorkerLink& link) override;
  void on_capacity() override;

  void launch(Slot& slot, int64_t now_ns);
  void on_frame(Slot& slot, kj::ArrayPtr<const capnp::word> words, bool recovered = false);
  void on_broken_stream(Slot& slot, absl::Status why);
  void on_corrupted_connection(Slot& slot, absl::Status why);
  void on_ended(Slot& slot, WorkerEnd end);
  void on_output(Slot& slot, bool is_stderr, std::span<const std::string_view> lines,
                 OutputPlace place);
  // Its host is leaving (LinkEvents::on_host_leaving): retired as a recycled worker is, at once.
  void on_host_leaving(Slot& slot);
  void stop(Slot& slot, absl::Status reason, StopMode mode);
  void record_start_failure(Slot& slot, absl::Status failure, int64_t now_ns);
  // Places whose start found no host where hosts dial in on their own (is_waiting_for_host): said
  // once, as a warning, each time more of them wait than were last said, not as an error per place.
  void announce_waiting_places();
  void send_shutdown(Slot& slot);
  // Sends `slot`'s worker its shutdown if it is due: it has nothing to do, and the pool is done
  // (join), or it is being recycled, retired or parked. The one place that decides it.
  void shutdown_if_due(Slot& slot);
  void retire(Slot& slot);
  void take_back(Slot& slot, int64_t now_ns);
  // idle_timeout: parks workers idle that long (beyond min_workers), and starts parked slots
  // again for the tasks no worker could take. Returns when it wants to be called again.
  int64_t check_idle(int64_t now_ns);
  // Checks `slot` and records when it wants to be checked next (check_at_).
  void check_slot(Slot& slot, int64_t now_ns);
  // Registers in poll_set_ what the touched slots' links wait for now (the launcher keeps its
  // own watches).
  void prepare_wait();
  void check_slot(Slot& slot, int64_t now_ns, int64_t& next);
  void fail_queued_if_unavailable();
  bool wanted() const;
  std::string process_name(const Slot& slot) const;
  void log(const Slot& slot, LogSeverity severity, const std::string& message) const;
  // An event about `slot`'s worker: its name, pid, host and slot are filled in here (identify).
  void log(const Slot& slot, LogEvent event) const;
  void identify(const Slot& slot, LogEvent& event) const;

  const Config config_;
  Launcher& launcher_;
  Scheduler& scheduler_;
  // Every slot the pool has had; only growth adds one, and none goes (retired ones stay, and a
  // resize may take them back): indices, Ports and Events stay valid.
  std::vector<std::unique_ptr<Slot>> slots_;
  int target_;  // slots not retired: the pool's size (resize())
  std::vector<std::unique_ptr<WorkerLink>> ended_links_;  // dropped in after_events()
  // The event loop's descriptors: group kLauncherGroup is the launcher's watches, slot i's
  // link's list is kFirstSlotGroup + i.
  static constexpr uint32_t kLauncherGroup = 1;
  static constexpr uint32_t kFirstSlotGroup = 2;
  PollSet& poll_set_;
  std::vector<pollfd> wanted_;  // what a link waits for (prepare_wait)
  // Slots something touched since they were last registered (unsynced) or checked (unchecked):
  // only these are asked what they wait for, and checked before they are due.
  std::vector<int> touched_;
  // When each slot wants check_slot() next (indexed by slot; a slot something touched is checked
  // sooner). One scan of these a wake instead of a call into every link.
  std::vector<int64_t> check_at_;
  // Marks `slot` touched: its link may wait for other descriptors or events now, and may have new
  // deadlines. Whatever calls a link, or changes what check_slot() decides for a slot, calls it.
  void touch(Slot& slot);
  void touch_all();
  // The event the lines of a worker's output go in (on_output): reused, so that its strings keep
  // their room from read to read (a flood of 64 KiB pieces allocates nothing per read).
  LogEvent output_event_;

  int consecutive_start_failures_ = 0;
  absl::Status last_start_failure_;
  int waiting_places_announced_ = 0;  // announce_waiting_places()
  bool joining_ = false;
  int64_t join_deadline_ns_ = 0;
  bool join_deadline_passed_ = false;
  bool terminating_ = false;
  std::vector<std::string> join_problems_;
  absl::StatusCode join_code_ = absl::StatusCode::kOk;
  int64_t workers_restarted_ = 0;
  int64_t bytes_sent_ = 0;      // frames given to links (Port::send)
  int64_t bytes_received_ = 0;  // frames links delivered (on_frame)
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_SUPERVISION_SUPERVISOR_H_
