// libFuzzer target: whatever frames a worker sends, every call ends, each task with exactly one
// outcome. The pool's own path (Supervisor::on_frame, then Scheduler::on_results and the
// settlement of a lost worker) runs over fake links (tests/fake_worker.h): no process, no
// descriptor, so each input replays exactly. Built and run by tools/fuzz.sh with clang's
// -fsanitize=fuzzer,address,undefined.
//
// The input is a script of steps for two workers: start or finish a task, report honestly, send
// arbitrary bytes or an honest results frame with bytes changed, let time pass (task timeouts,
// the stall rule), dispatch, cancel a call, die (with frames recovered after death), have its
// record in the control page overwritten (as a task with a wild pointer might). When it runs
// out, every worker dies, fresh honest workers run whatever was queued again, and every task of
// both calls (a plain one and a word one) must have exactly one outcome: else it aborts.

#include <poll.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "lib/common/clock.h"
#include "lib/scheduler/scheduler.h"
#include "lib/supervision/supervisor.h"
#include "procpool/internal/protocol.capnp.h"
#include "tests/fake_worker.h"

namespace {

using procpool::internal::CallSettings;
using procpool::internal::Scheduler;
using procpool::internal::Supervisor;
using procpool::testing::FakeLauncher;
using procpool::testing::FakeWorker;
using procpool::testing::FakeWorkerLink;
using procpool::testing::RecordingCall;
namespace wire = procpool::wire;

constexpr int kWorkers = 2;
constexpr size_t kMaxFrameBytes = size_t{1} << 20;

class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return at_ >= size_; }
  uint8_t byte() { return at_ < size_ ? data_[at_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(byte() | (byte() << 8)); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

class Harness {
 public:
  Harness()
      : scheduler_(Scheduler::Config{.workers = kWorkers,
                                     .max_frame_bytes = kMaxFrameBytes,
                                     .kill_grace = absl::Seconds(1)}),
        supervisor_(
            Supervisor::Config{.workers = kWorkers,
                               .max_frame_bytes = kMaxFrameBytes,
                               .enter_timeout = absl::InfiniteDuration(),
                               .kill_grace = absl::Seconds(1),
                               .join_timeout = absl::InfiniteDuration(),
                               .respawn_delay = absl::ZeroDuration(),
                               .respawn_max_delay = absl::ZeroDuration()},
            launcher_, scheduler_, poll_set_) {
    CallSettings plain;
    plain.chunksize = 3;
    plain.retries = 1;
    CallSettings words;
    words.chunksize = 4;
    words.has_task_timeout = true;
    words.task_timeout = absl::Milliseconds(50);
    calls_[0] = std::make_shared<RecordingCall>(12, plain);
    calls_[1] = std::make_shared<RecordingCall>(10, words, /*words=*/true);
    turn();
    for (auto& call : calls_) scheduler_.submit(call, 0, call->size());
    scheduler_.dispatch();
  }

  // One step of the script.
  void step(Input& in) {
    const uint8_t op = in.byte();
    const int slot = in.byte() % kWorkers;
    FakeWorkerLink* link = live_[slot];
    switch (op % 11) {
      case 0:  // the worker starts its next task
        if (link != nullptr) start_next(link->worker());
        break;
      case 1:  // it finishes the task it runs
        if (link != nullptr && link->worker().running_seq()) link->worker().finish();
        break;
      case 2:  // it reports what it finished, honestly
        if (link != nullptr) {
          kj::Array<capnp::word> frame = honest_frame(link->worker(), /*advance=*/true, in.byte());
          if (frame.size() > 0) link->deliver(frame);
        }
        break;
      case 3: {  // arbitrary bytes, as whole words
        if (link == nullptr) break;
        const size_t bytes = in.byte() + 8 * (in.byte() % 4);
        kj::Array<capnp::word> frame = kj::heapArray<capnp::word>((bytes + 7) / 8);
        std::memset(frame.begin(), 0, frame.size() * sizeof(capnp::word));
        auto* out = reinterpret_cast<uint8_t*>(frame.begin());
        for (size_t i = 0; i < bytes; ++i) out[i] = in.byte();
        link->deliver(frame);
        break;
      }
      case 4: {  // an honest results frame with bytes changed
        if (link == nullptr) break;
        kj::Array<capnp::word> frame = honest_frame(link->worker(), /*advance=*/false, in.byte());
        if (frame.size() == 0) frame = procpool::testing::results_frame(in.byte(), in.byte(), {1});
        auto* bytes = reinterpret_cast<uint8_t*>(frame.begin());
        const size_t size = frame.size() * sizeof(capnp::word);
        const int changes = 1 + in.byte() % 8;
        for (int i = 0; i < changes; ++i) {
          const size_t at = in.u16() % size;
          bytes[at] ^= in.byte();
        }
        link->deliver(frame);
        break;
      }
      case 5:  // time passes: timeouts, the stall rule
        now_ += int64_t{in.byte()} * 2'000'000;
        supervisor_.check(now_);
        break;
      case 6:  // the pool's loop turns; workers it stopped are gone
        end_stopped();
        turn();
        break;
      case 7:  // the worker dies, a frame found after its death first
        if (link == nullptr) break;
        if (in.byte() & 1) {
          kj::Array<capnp::word> frame = honest_frame(link->worker(), /*advance=*/false, in.byte());
          if (frame.size() > 0) link->recover(frame);
        }
        end(slot, "was killed by signal 9 (SIGKILL)");
        break;
      case 8: {  // a call is cancelled, as AsyncResult::cancel does
        RecordingCall& call = *calls_[in.byte() % 2];
        if (call.cancelled) break;
        call.cancelled = true;
        const absl::Status cancelled = absl::CancelledError("cancelled");
        scheduler_.cancel(&call, cancelled);
        scheduler_.stop_running(&call, cancelled);
        break;
      }
      case 9:  // a frame of another kind
        if (link != nullptr) link->deliver(other_frame(in.byte()));
        break;
      case 10: {  // its record is overwritten: what it runs, since when, and a claim word
        if (link == nullptr) break;
        procpool::internal::ControlPage& page = link->worker().page();
        const uint8_t what = in.byte();
        page.batch_seq.store((what & 1) ? procpool::internal::ControlPage::kNoBatch : in.u16());
        page.task_index.store(in.u16());
        page.running.store((what >> 1) & 1);
        page.started_ns.store(now_ + int64_t{static_cast<int16_t>(in.u16())} * 1'000'000);
        if (what & 4) {
          page.claims[in.byte() % procpool::internal::ControlPage::kClaimSlots].store(
              uint64_t{in.u16()} << 48 | uint64_t{in.u16()} << 24 | in.u16());
        }
        break;
      }
    }
  }

  // Every worker dies; fresh honest ones run what is left. Aborts unless every task of every
  // call then has exactly one outcome.
  void finish() {
    for (int slot = 0; slot < kWorkers; ++slot) end(slot, "was killed by signal 9 (SIGKILL)");
    for (int round = 0; round < 2000 && !ended(); ++round) {
      now_ += 1'000'000;
      turn();
      for (FakeWorkerLink* link : live_) {
        if (link != nullptr) run_honestly(*link);
      }
      end_stopped();
      supervisor_.check(now_);
    }
    for (size_t c = 0; c < calls_.size(); ++c) {
      const RecordingCall& call = *calls_[c];
      for (size_t i = 0; i < call.size(); ++i) {
        if (call.count(i) != 1) {
          std::fprintf(stderr, "call %zu task %zu has %d outcomes (work outstanding: %d)\n", c, i,
                       call.count(i), scheduler_.work_outstanding());
          std::abort();
        }
      }
    }
  }

 private:
  bool ended() const {
    return !scheduler_.work_outstanding() && calls_[0]->ended() && calls_[1]->ended();
  }

  // The pool loop's turn: replacements start (and say READY), queued tasks go out.
  void turn() {
    supervisor_.after_events();
    int launches[kWorkers];
    for (int slot = 0; slot < kWorkers; ++slot) launches[slot] = launcher_.launches(slot);
    supervisor_.start_due(now_);
    // Fake links have no descriptors, so no wait finds them ready: check() asks each slot that
    // was touched (a new link is) and so tells its link where its events go.
    supervisor_.check(now_);
    for (int slot = 0; slot < kWorkers; ++slot) {
      if (launcher_.launches(slot) == launches[slot]) continue;
      live_[slot] = launcher_.latest(slot);
      live_[slot]->deliver(procpool::testing::ready_frame());
    }
    scheduler_.dispatch();
  }

  void end(int slot, const char* how) {
    FakeWorkerLink* link = live_[slot];
    if (link == nullptr) return;
    live_[slot] = nullptr;  // the supervisor drops it at its next after_events()
    link->end(how);
  }

  void end_stopped() {
    for (int slot = 0; slot < kWorkers; ++slot) {
      if (live_[slot] != nullptr && !live_[slot]->stops().empty()) {
        end(slot, "was killed by signal 15 (SIGTERM)");
      }
    }
  }

  static void start_next(FakeWorker& worker) {
    if (worker.running_seq()) return;
    for (FakeWorker::Batch& batch : worker.batches()) {
      if (batch.next < batch.count) {
        worker.start(batch.seq, procpool::internal::monotonic_now_ns());
        return;
      }
    }
  }

  // Results for the tasks of the first batch with finished, unsent ones (as words for a word
  // batch, unless `style` says otherwise); with `advance`, they count as sent.
  static kj::Array<capnp::word> honest_frame(FakeWorker& worker, bool advance, uint8_t style) {
    for (FakeWorker::Batch& batch : worker.batches()) {
      uint32_t finished = batch.next;
      if (worker.running_seq() == batch.seq) --finished;
      if (batch.sent >= finished) continue;
      std::vector<int64_t> values;
      for (uint32_t i = batch.sent; i < finished; ++i) values.push_back(batch.jobs[i] * 10);
      const uint32_t start = batch.sent;
      if (advance) batch.sent = finished;
      return batch.words && (style & 1) == 0
                 ? procpool::testing::word_results_frame(batch.seq, start, values)
                 : procpool::testing::results_frame(batch.seq, start, values);
    }
    return nullptr;
  }

  // Runs every batch it holds to its end and reports each whole.
  static void run_honestly(FakeWorkerLink& link) {
    FakeWorker& worker = link.worker();
    while (!worker.batches().empty() && !link.ended()) {
      FakeWorker::Batch& batch = worker.batches().front();
      if (worker.running_seq()) worker.finish();
      while (worker.start(batch.seq, procpool::internal::monotonic_now_ns())) worker.finish();
      kj::Array<capnp::word> frame = honest_frame(worker, /*advance=*/true, 0);
      worker.batches().pop_front();
      if (frame.size() > 0) link.deliver(frame);
      if (!link.stops().empty()) return;
    }
  }

  static kj::Array<capnp::word> other_frame(uint8_t kind) {
    capnp::MallocMessageBuilder message;
    auto frame = message.initRoot<wire::FromWorker>();
    switch (kind % 5) {
      case 0:
        frame.setReady();
        break;
      case 1:
        frame.initEnterFailed().setCode(2);
        break;
      case 2:
        frame.initExited().setCode(kind >> 4);
        break;
      case 3:
        frame.initPong();
        break;
      default:
        frame.initRevoked();
        break;
    }
    return capnp::messageToFlatArray(message);
  }

  int64_t now_ = procpool::internal::monotonic_now_ns();
  procpool::internal::PollSet poll_set_;  // the loop's (the pool's own outlives its launcher)
  FakeLauncher launcher_;
  Scheduler scheduler_;
  Supervisor supervisor_;
  std::array<std::shared_ptr<RecordingCall>, 2> calls_;
  FakeWorkerLink* live_[kWorkers] = {};
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in(data, size);
  Harness harness;
  for (int steps = 0; steps < 400 && !in.empty(); ++steps) harness.step(in);
  harness.finish();
  return 0;
}
