// WorkerLink: one worker as the pool sees it, whatever carries its frames.
//
// Supervision holds the links and reaches a worker only through this interface, as Cap'n Proto's
// RPC reaches its peer only through a connection that carries messages and reports disconnection.
// Two things below it still show through, and only these: the descriptors the event loop polls
// (add_pollfds and service; channel_fd for a caller that borrows the channel), which supervision
// and the pool wait on without reading them, and pid(), which goes into log lines and
// stats. Reading and writing, reaping and signals stay in the link. The scheduler sees less: a
// WorkerPort (lib/scheduler/scheduler.h), with no descriptor, pid or signal in it. Two links
// implement this: ForkLink (a forked process: a socketpair, a pidfd, a shared control page,
// signals) and TcpLink (a worker program on any host: a TCP connection, a handshake, heartbeats).
//
// Ordering. Frames are delivered to the worker in the order they are sent, and the worker's
// frames reach `LinkEvents::on_frame` in the order it wrote them. After `on_ended`, the link
// delivers nothing more, and frames sent to it are dropped. Every frame the worker wrote before
// it ended is delivered before `on_ended`.
//
// Threads: not thread-safe; the pool calls a link with its lock held.

#ifndef PROCPOOL_LIB_LINK_WORKER_LINK_H_
#define PROCPOOL_LIB_LINK_WORKER_LINK_H_

#include <poll.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "capnp/message.h"
#include "lib/wire/control_page.h"
#include "lib/wire/shared_region.h"

namespace procpool::internal {

// Which task lines of a worker's output belong to: the batch and task its record (its control
// page) named as last started when they were read, which the scheduler turns into a task number
// (Scheduler::task_number). Read after the bytes were, so the lines were written in that task or
// before it: in it when the worker ran one task at a time, or its tasks each took longer than the
// reader's wake. kNoBatch: it had started none. The worker's own words, like all it writes.
struct OutputPlace {
  uint64_t batch_seq = ControlPage::kNoBatch;
  uint32_t task_index = 0;
};

// How a worker ended, as its link saw it.
struct WorkerEnd {
  std::string how;     // "was killed by signal 6 (SIGABRT)", "exited with status 3", ...
  bool clean = false;  // left on its own, with a status the protocol expects after a shutdown
  // Why it was stopped, when the link knows better than its death says (a remote worker's
  // watchdog stopped it for a task timeout): the failure of the task it was running.
  std::optional<absl::Status> cause = std::nullopt;
  // The stack it recorded when a fatal signal killed it (PoolOptions::crash_backtraces), or "".
  std::string crash_stack = {};
  // It was lost because a connection to it failed TLS record authentication (bytes changed on
  // the way): `cause` says so (kDataLoss). Not its doing, nor its task's: what it held runs again
  // as after a death.
  bool corrupted = false;
  // `cause` is a remote worker host's watchdog's: the running task (the link's last progress)
  // passed its task_timeout there. The pool names the task in its own words (as when it stops a
  // forked worker itself), where it still knows the task.
  bool timed_out_by_host = false;
};

// What a worker is doing, as far as its link knows.
struct WorkerProgress {
  uint64_t batch_seq = ControlPage::kNoBatch;  // the batch of the task below
  uint32_t task_index = 0;                     // the last task it started in that batch
  bool running = false;                        // that task is still running
  int64_t started_ns = 0;                      // when that task started (CLOCK_MONOTONIC)
  int64_t tasks_done = 0;
  int64_t busy_ns = 0;
  int64_t timeout_ns = 0;  // the task timeout of the batch it runs (0: none)
  // False when the link learns of progress late (over TCP): tasks after the one above may have
  // started. True when it is read from shared memory, as the worker writes it.
  bool exact = true;
};

// How late a link that learns of progress late (WorkerProgress::exact false) may still show a
// task the worker has moved past: a worker host looks at its worker every 10 ms and reports a
// change, at most every 100 ms while short tasks stream (relay.cc), and its report then crosses
// the network and two busy hosts' schedulers. A rule that times a task by such a report (a
// timeout, a soft timeout's grace, the stall rule) allows this much more, so that a task which
// ended long ago, as the report could not yet say, is never stopped for it; a worker host enforces
// task_timeout itself, exactly, from its worker's shared memory.
inline constexpr int64_t kInexactProgressLagNs = 250'000'000;

// Where a link reports what happened. The pool implements it for each link.
class LinkEvents {
 public:
  virtual ~LinkEvents() = default;
  // One whole frame from the worker (FromWorker), borrowed for the call.
  virtual void on_frame(kj::ArrayPtr<const capnp::word> frame) = 0;
  // A frame the worker held back (in shared memory) and the link found after the worker died:
  // it may repeat one delivered by on_frame already (the worker may have died between writing it
  // and clearing it), so the receiver skips what it has seen; and the worker is gone, so a frame
  // that does not fit is dropped, never held against a task. Comes before on_ended.
  virtual void on_recovered_frame(kj::ArrayPtr<const capnp::word> /*frame*/) {}
  // The worker's stream can no longer be trusted: a frame too big, garbage, a frame begun and
  // not finished within frame_timeout. The pool stops the worker; kDataLoss names the cause.
  virtual void on_broken_stream(absl::Status why) = 0;
  // The connection from the worker failed TLS record authentication (TlsChannel::record_failed):
  // someone on the path changed bytes, not the worker. The pool stops the worker; the tasks it
  // held fail with `why` (kDataLoss), or run again as after a death.
  virtual void on_corrupted_connection(absl::Status why) { on_broken_stream(std::move(why)); }
  // The answer to revoke(): `claimed` tasks of the batch were claimed and will run or ran.
  virtual void on_revoked(uint32_t slot, uint16_t tag, uint32_t claimed) = 0;
  // Lines the worker wrote to its stdout (`is_stderr` false) or stderr, when its output is
  // forwarded (PoolOptions::worker_output), without their newlines, borrowed for the call: at
  // least one, those read at one time. Lines of one stream come in the order written, each once;
  // all of them before on_ended. `place`: the task the worker had last started when they were
  // read (OutputPlace).
  virtual void on_output(bool /*is_stderr*/, std::span<const std::string_view> /*lines*/,
                         OutputPlace /*place*/) {}
  // The worker is gone for good.
  virtual void on_ended(WorkerEnd end) = 0;
  // The worker's host is leaving (a remote worker's relay got SIGTERM, relay.h): the pool stops
  // giving it work, takes back what it has not started, lets it finish its task, has it run
  // exit(), and starts the slot's next worker elsewhere. Only a remote link calls it.
  virtual void on_host_leaving() {}
};

enum class StopMode {
  kTerminate,  // ask the process to end now (SIGTERM), without its exit() hook
  kKill,       // end it, no questions (SIGKILL; for TCP, drop the connection)
};

class WorkerLink {
 public:
  virtual ~WorkerLink() = default;

  // "worker 3 (pid 4242)", for messages.
  virtual const std::string& name() const = 0;
  // The worker's process id where one is known and meaningful here, else 0.
  virtual int pid() const = 0;
  // The name of the host it runs on (this one's for a forked worker), for log events.
  virtual std::string host_name() const {
    static const std::string local = [] {
      char host[256] = {};
      ::gethostname(host, sizeof(host) - 1);
      return std::string(host);
    }();
    return local;
  }

  // Queues a frame (ToWorker); flush() writes what the transport takes now, and the rest goes as
  // the event loop finds it writable. Dropped after the link ended.
  virtual void send(std::unique_ptr<capnp::MessageBuilder> frame) = 0;
  virtual void flush() = 0;
  virtual bool has_unsent() const = 0;

  // Zero-copy sends. True if frames given to send() may reference memory a call lends (external
  // segments of a BorrowingMessageBuilder, frame_io.h): the link then promises that
  // release_borrowed(borrower) copies whatever it has not sent yet of such frames, so that memory
  // is never read after release_borrowed returns. A link that cannot promise that keeps the
  // default, false, and is only given frames that own their bytes.
  virtual bool can_borrow() const { return false; }
  virtual void release_borrowed(const void* /*borrower*/) {}
  // The worker's shared region for blobs (lib/wire/shared_region.h), if its link has one; it
  // lives as long as the link. Null (the default): blobs travel in frames.
  virtual SharedRegion* shared_region() { return nullptr; }

  // The event loop. add_pollfds appends what to wait for (the channel only if `with_channel`:
  // a caller may be reading it itself, see borrow below); service() handles what poll() said of
  // them (the entries this link added, in order), leaving the channel alone unless
  // `with_channel` (a borrow may have begun since); check() handles the link's own deadlines and
  // returns when it wants to be called again (CLOCK_MONOTONIC ns). The pool's loop keeps what
  // add_pollfds gave registered (lib/common/poll_set.h) and asks again only after it called
  // send, flush, revoke, stop, pump or check, or service (only when something it added is
  // ready), or after its launcher reported on it: what a link waits for must change only in such
  // calls, and a descriptor it closes must be one it drops from add_pollfds in the same call.
  virtual void add_pollfds(std::vector<pollfd>& fds, bool with_channel) = 0;
  virtual void service(const pollfd* polled, size_t count, bool with_channel,
                       LinkEvents& events) = 0;
  virtual int64_t check(int64_t now_ns, LinkEvents& events) = 0;

  // Borrowing: a caller thread (apply) may wait on the channel itself, for one round trip less.
  // channel_fd() is what to poll; pump() reads and writes what is ready.
  virtual int channel_fd() const = 0;
  virtual void pump(short revents, LinkEvents& events) = 0;

  // What the worker is doing (control_page.h for what the fields mean).
  virtual WorkerProgress progress() const = 0;
  // Its resident memory in bytes, where known (0 if not): for max_worker_rss_bytes and stats.
  virtual size_t resident_bytes() const = 0;
  // The name of the host it runs on, for stats: this machine's for a forked worker, its worker
  // host's for a remote one; "" while there is none (the default).
  virtual std::string host() const { return {}; }
  // Claims (control_page.h): open a batch's claims before sending it; take its unstarted tasks
  // back. The answer to revoke comes through events.on_revoked, during the call (shared memory)
  // or later (a round trip).
  virtual void open_claims(uint32_t slot, uint16_t tag, uint32_t count) = 0;
  virtual void revoke(uint32_t slot, uint16_t tag, LinkEvents& events) = 0;
  // Asks tasks [from, to) of batch `seq` to stop (this_task::stop_requested; control_page.h's
  // request_stop: `seq` ControlPage::kStopEveryTask asks every task, 0 withdraws). Advisory: the
  // worker may not look. No answer comes; the default (a link without a page) does nothing.
  virtual void request_stop(uint64_t /*seq*/, uint32_t /*from*/, uint32_t /*to*/) {}

  // Stops the worker without its exit() hook (the polite way is a shutdown frame). Idempotent.
  virtual void stop(StopMode mode) = 0;

  // When its worker was asked for (CLOCK_MONOTONIC ns), from which enter_timeout counts: 0 for a
  // link made with its worker (a fork), INT64_MAX while there is nowhere to run it yet (a remote
  // link waiting for a worker host, a wait connect_timeout bounds instead).
  virtual int64_t placed_ns() const { return 0; }
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_WORKER_LINK_H_
