#include "lib/worker_main.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "capnp/message.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/frame_io.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/internal/packed.h"

namespace procpool::internal {
namespace {

constexpr int kChannelFd = 3;
// A worker sends finished results early when a batch has run this long since the last send, so
// the parent learns of progress (and loses little if the worker dies) without a write per task.
constexpr int64_t kFlushIntervalNs = 2'000'000;
// The result of a task that took this long is sent at once: a write costs little next to it,
// and a crash of the worker later cannot lose it.
constexpr int64_t kSendAtOnceNs = 200'000;
// The most outcomes one result frame carries (a packed one: results).
constexpr uint32_t kMaxPieceOutcomes = 4096;
constexpr uint32_t kMaxPackedPieceResults = 65536;

// SIGTERM counts only when the pool sent it (a timeout, terminate(), join's deadline). One sent
// to the whole process group, by a terminal or a supervisor, is the parent's to act on.
pid_t pool_pid = 0;

void on_sigterm(int signal, siginfo_t* info, void*) {
  if (info != nullptr && info->si_code == SI_USER && info->si_pid != pool_pid) return;
  ::signal(signal, SIG_DFL);
  ::raise(signal);
}

int64_t coarse_now_ns() {
  timespec now;
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

[[noreturn]] void leave(int status) {
  // Our own stdio output only: the parent flushed its buffers before fork().
  std::fflush(nullptr);
  ::_exit(status);
}

void prepare_process(int channel_fd, const WorkerLaunch& launch, pid_t parent_pid) {
  ::prctl(PR_SET_NAME, launch.process_name.c_str(), 0, 0, 0);
  if (launch.parent_death_signal) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    // The parent may have died before the line above: then nobody will signal us.
    if (::getppid() != parent_pid) ::_exit(kWorkerExitOk);
  }
  reset_signals_for_child(launch.pool_pid);

  if (channel_fd != kChannelFd) {
    ::dup3(channel_fd, kChannelFd, O_CLOEXEC);
  }
  // Every other descriptor the parent had open (its other workers' channels, its files) closes.
  ::syscall(SYS_close_range, kChannelFd + 1, ~0U, 0);
}

bool send(capnp::MessageBuilder& message) { return write_frame(kChannelFd, message).ok(); }

void send_error_frame(bool enter_failed, const absl::Status& status) {
  capnp::MallocMessageBuilder message(64);
  auto root = message.initRoot<wire::FromWorker>();
  status_to_wire(status, enter_failed ? root.initEnterFailed() : root.initExited());
  send(message);
}

// The bookkeeping around each task of a batch, the same for both kinds of batch: the status
// page stamps the parent reads, the task's time, and whether the results held so far must go out.
template <int64_t (*kNow)()>
class TaskPacer {
 public:
  TaskPacer(StatusPage* page, uint64_t seq)
      : page_(page), seq_(seq), started_(kNow()), last_send_(started_) {}

  void begin(uint32_t index) {
    page_->batch_seq.store(seq_, std::memory_order_relaxed);
    page_->task_index.store(index, std::memory_order_relaxed);
    page_->started_ns.store(started_, std::memory_order_relaxed);
    page_->running.store(1, std::memory_order_release);
  }

  // Ends the task begun last. True if the results held so far should be sent now: the task was
  // slow, or the last send was a while ago. (One clock read per task: a task's end is the next
  // one's start.)
  bool end() {
    page_->running.store(0, std::memory_order_release);
    page_->tasks_done.fetch_add(1, std::memory_order_relaxed);
    const int64_t now = kNow();
    const int64_t busy = now - started_;
    started_ = now;
    page_->busy_ns.fetch_add(busy, std::memory_order_relaxed);
    unsent_busy_ns_ += busy;
    return now - last_send_ >= kFlushIntervalNs || busy >= kSendAtOnceNs;
  }

  // Time spent on the tasks since the last send; call when sending.
  int64_t take_busy_ns() { return std::exchange(unsent_busy_ns_, 0); }
  // After a send: the time it took is not the next task's.
  void sent() { started_ = last_send_ = kNow(); }

 private:
  StatusPage* page_;
  uint64_t seq_;
  int64_t started_;
  int64_t last_send_;
  int64_t unsent_busy_ns_ = 0;
};

// Runs the tasks of a packed batch (TaskBatch.packedJobs) in order: as run_batch, but results go
// into one packed list per frame, and only failures get an entry of their own. Scalar tasks are
// typically tiny, so time comes from the coarse clock (a few ns to read, a few ms resolution):
// task timeouts and the send-at-once rule for slow tasks keep working at that resolution.
void run_packed_batch(WorkerBody& body, wire::TaskBatch::Reader batch, StatusPage* page) {
  const PackedReader jobs(batch.getPackedJobs());
  const uint32_t count = jobs.size();
  const uint64_t seq = batch.getSeq();
  uint32_t first_unsent = 0;

  std::unique_ptr<capnp::MallocMessageBuilder> message;
  wire::ResultBatch::Builder results = nullptr;
  PackedWriter values;
  uint32_t entries = 0;
  std::vector<std::pair<uint32_t, absl::Status>> errors;
  auto start_piece = [&] {
    entries = std::min(count - first_unsent, kMaxPackedPieceResults);
    message = std::make_unique<capnp::MallocMessageBuilder>(32 + entries);
    results = message->initRoot<wire::FromWorker>().initResults();
    results.setSeq(seq);
    results.setStart(first_unsent);
    values = body.init_packed_results(results.initPackedResults(), entries);
    errors.clear();
  };
  start_piece();

  TaskPacer<coarse_now_ns> pacer(page, seq);
  for (uint32_t i = 0; i < count; ++i) {
    pacer.begin(i);
    absl::Status ran = body.run_packed(jobs, i, values, i - first_unsent);
    if (!ran.ok()) errors.emplace_back(i - first_unsent, std::move(ran));
    const bool due = pacer.end();

    const uint32_t in_piece = i + 1 - first_unsent;
    const bool last = i + 1 == count;
    if (last || in_piece == entries || due) {
      results.setCount(in_piece);
      results.setBusyNs(static_cast<uint64_t>(pacer.take_busy_ns()));
      if (!errors.empty()) {
        auto listed = results.initErrors(static_cast<uint32_t>(errors.size()));
        for (uint32_t e = 0; e < errors.size(); ++e) {
          listed[e].setIndex(errors[e].first);
          status_to_wire(errors[e].second, listed[e].initError());
        }
      }
      if (!send(*message)) leave(kWorkerExitOk);  // the parent is gone
      first_unsent = i + 1;
      if (!last) start_piece();
      pacer.sent();
    }
  }
}

// Runs the tasks of one batch in order, sending their outcomes in one or more frames.
void run_batch(WorkerBody& body, wire::TaskBatch::Reader batch, StatusPage* page) {
  const auto jobs = batch.getJobs();
  const uint32_t count = jobs.size();
  const uint64_t seq = batch.getSeq();
  uint32_t first_unsent = 0;

  // Outcomes go into a list of at most kMaxPieceOutcomes entries; a piece sent before its list
  // is full says how many entries it used (shrinking a Cap'n Proto list in place is slow).
  std::unique_ptr<capnp::MallocMessageBuilder> message;
  wire::ResultBatch::Builder results = nullptr;
  capnp::List<wire::Outcome>::Builder outcomes = nullptr;
  auto start_piece = [&] {
    const uint32_t entries = std::min(count - first_unsent, kMaxPieceOutcomes);
    // A first segment sized for small results (the default 8 KiB is zeroed on every piece).
    message = std::make_unique<capnp::MallocMessageBuilder>(16 + 6 * entries);
    results = message->initRoot<wire::FromWorker>().initResults();
    results.setSeq(seq);
    results.setStart(first_unsent);
    outcomes = results.initOutcomes(entries);
  };
  start_piece();

  TaskPacer<monotonic_now_ns> pacer(page, seq);
  for (uint32_t i = 0; i < count; ++i) {
    pacer.begin(i);
    body.run(batch, jobs[i], outcomes[i - first_unsent]);
    const bool due = pacer.end();

    const uint32_t in_piece = i + 1 - first_unsent;
    const bool last = i + 1 == count;
    if (last || in_piece == outcomes.size() || due) {
      results.setCount(in_piece);
      results.setBusyNs(static_cast<uint64_t>(pacer.take_busy_ns()));
      if (!send(*message)) leave(kWorkerExitOk);  // the parent is gone
      first_unsent = i + 1;
      if (!last) start_piece();
      pacer.sent();
    }
  }
}

}  // namespace

void reset_signals_for_child(pid_t pool) {
  for (int signal = 1; signal < NSIG; ++signal) {
    if (signal == SIGKILL || signal == SIGSTOP) continue;
    std::signal(signal, SIG_DFL);
  }
  std::signal(SIGINT, SIG_IGN);
  pool_pid = pool;
  struct sigaction term {};
  term.sa_sigaction = on_sigterm;
  term.sa_flags = SA_SIGINFO;
  sigemptyset(&term.sa_mask);
  ::sigaction(SIGTERM, &term, nullptr);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

}

void worker_main(int channel_fd, StatusPage* page, const WorkerLaunch& launch, pid_t parent_pid) {
  prepare_process(channel_fd, launch, parent_pid);

  std::unique_ptr<WorkerBody> body = (*launch.factory)();
  absl::Status entered = body->enter();
  if (!entered.ok()) {
    send_error_frame(/*enter_failed=*/true, entered);
    leave(kWorkerExitEnterFailed);
  }
  {
    capnp::MallocMessageBuilder ready(16);
    ready.initRoot<wire::FromWorker>().setReady();
    if (!send(ready)) leave(kWorkerExitOk);
  }

  FrameReader reader(launch.max_frame_bytes);
  while (true) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader.read_blocking(kChannelFd);
    // End of file: the parent died or dropped us without asking. No hooks: nobody waits for them.
    if (!frame.ok()) leave(frame.status().code() == absl::StatusCode::kUnavailable
                               ? kWorkerExitOk : kWorkerExitProtocolError);
    bool shutdown = false;
    try {
      capnp::FlatArrayMessageReader message(*frame, reader.options());
      auto request = message.getRoot<wire::ToWorker>();
      switch (request.which()) {
        case wire::ToWorker::TASKS:
          if (request.getTasks().hasPackedJobs()) {
            run_packed_batch(*body, request.getTasks(), page);
          } else {
            run_batch(*body, request.getTasks(), page);
          }
          break;
        case wire::ToWorker::SHUTDOWN:
          shutdown = true;
          break;
      }
    } catch (const kj::Exception& e) {
      // A frame we cannot read means the parent and we disagree: stop; the parent sees the exit.
      std::fprintf(stderr, "[procpool %s] malformed frame from the parent: %s\n",
                   launch.process_name.c_str(), e.getDescription().cStr());
      leave(kWorkerExitProtocolError);
    }
    if (shutdown) {
      absl::Status exited = body->exit();
      body.reset();
      send_error_frame(/*enter_failed=*/false, exited);
      leave(exited.ok() ? kWorkerExitOk : kWorkerExitExitHookFailed);
    }
  }
}

}  // namespace procpool::internal
