// The scheduler's rules, over fake workers (tests/fake_worker.h): no process, no clock but the
// one the test passes. Each case takes the steps a worker would (start a task, send its result,
// die) one by one and checks what the scheduler made of them. What only processes can show
// (kills, signals, real frames on a socket) stays in the end-to-end suites.

#include "lib/scheduler/scheduler.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "capnp/any.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "kj/exception.h"
#include "lib/common/clock.h"
#include "procpool/internal/protocol.capnp.h"
#include "tests/fake_worker.h"

namespace procpool::testing {
namespace {

using internal::CallSettings;
using internal::LostWorker;
using internal::Scheduler;

// A scheduler and its workers: slot i is reached through ports[i] while attached.
struct Rig {
  explicit Rig(int workers, size_t max_batches = 64)
      : scheduler(Scheduler::Config{.workers = workers,
                                    .max_frame_bytes = size_t{1} << 20,
                                    .max_batches_per_worker = max_batches}),
        fakes(workers), ports(workers) {
    for (int slot = 0; slot < workers; ++slot) attach(slot);
  }

  // A fresh worker in `slot` (after the last one was lost).
  void attach(int slot) {
    fakes[slot] = std::make_unique<FakeWorker>(absl::StrCat("worker ", slot, " #", ++made));
    ports[slot] = std::make_unique<FakeWorkerPort>(*fakes[slot], scheduler, slot);
    scheduler.attach(slot, ports[slot].get());
  }
  FakeWorker& worker(int slot) { return *fakes[slot]; }
  FakeWorker::Batch& front(int slot) { return fakes[slot]->batches().front(); }

  std::shared_ptr<RecordingCall> submit(size_t tasks, CallSettings settings = {},
                                        bool words = false) {
    auto call = std::make_shared<RecordingCall>(tasks, settings, words);
    scheduler.submit(call, 0, tasks);
    return call;
  }

  // The worker in `slot` reports values for tasks [start, start + values.size()) of `seq`.
  absl::Status report(int slot, uint64_t seq, uint32_t start, const std::vector<int64_t>& values) {
    return deliver_results(scheduler, slot, results_frame(seq, start, values));
  }
  // Starts and finishes the next task of `seq` at `slot` and reports its value, job * 10.
  void run_one(int slot, uint64_t seq) {
    FakeWorker::Batch* batch = worker(slot).find(seq);
    REQUIRE(batch != nullptr);
    const std::optional<uint32_t> index = worker(slot).start(seq, internal::monotonic_now_ns());
    REQUIRE(index.has_value());
    worker(slot).finish();
    REQUIRE(report(slot, seq, *index, {batch->jobs[*index] * 10}).ok());
  }
  // Runs every batch every worker holds, to the end, until nothing is outstanding.
  void run_all() {
    for (int round = 0; round < 1000 && scheduler.work_outstanding(); ++round) {
      scheduler.dispatch();
      for (size_t slot = 0; slot < fakes.size(); ++slot) {
        auto& batches = worker(static_cast<int>(slot)).batches();
        while (!batches.empty()) {
          FakeWorker::Batch& batch = batches.front();
          while (batch.next < batch.count) run_one(static_cast<int>(slot), batch.seq);
          batches.pop_front();
        }
      }
    }
    REQUIRE_FALSE(scheduler.work_outstanding());
  }

  // The worker in `slot` died (killed, not by the pool) and a fresh one takes its place.
  void lose(int slot, LostWorker how = {}) {
    if (how.ended.empty()) how.ended = "was killed by signal 9 (SIGKILL)";
    if (how.running_failure.ok()) {
      how.running_failure = absl::AbortedError(absl::StrCat(how.ended, " while running this task"));
    }
    how.last = worker(slot).progress();
    scheduler.on_worker_lost(slot, how);
    attach(slot);
  }

  Scheduler scheduler;
  std::vector<std::unique_ptr<FakeWorker>> fakes;
  std::vector<std::unique_ptr<FakeWorkerPort>> ports;
  int made = 0;
};

CallSettings chunks(size_t chunksize, int retries = 0) {
  CallSettings settings;
  settings.chunksize = chunksize;
  settings.retries = retries;
  return settings;
}

TEST_CASE("a lost worker's unstarted tasks run next, before tasks queued after them") {
  Rig rig(2);
  auto call = rig.submit(6, chunks(2));
  rig.scheduler.dispatch();
  REQUIRE(rig.front(0).jobs == std::vector<int64_t>{0, 1});
  REQUIRE(rig.front(1).jobs == std::vector<int64_t>{2, 3});
  REQUIRE(rig.worker(0).start(rig.front(0).seq, internal::monotonic_now_ns()) == 0u);
  rig.lose(0);
  // Task 0 ran when its worker died; task 1 had not started: it goes before tasks 4 and 5.
  CHECK(call->outcome(0).status().code() == absl::StatusCode::kAborted);
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(0).batches().size() == 1);
  CHECK(rig.front(0).jobs == std::vector<int64_t>{1});
  rig.run_all();
  CHECK(call->ended_once());
  for (int64_t i = 1; i < 6; ++i) CHECK(call->outcome(i).value_or(-1) == i * 10);
}

TEST_CASE("a task whose worker dies under it runs again while the call's retries last") {
  Rig rig(1);
  auto call = rig.submit(2, chunks(1, /*retries=*/1));
  int runs_of_task_0 = 0;
  for (int death = 0; death < 2; ++death) {
    rig.scheduler.dispatch();
    REQUIRE(rig.worker(0).batches().size() == 1);
    REQUIRE(rig.front(0).jobs == std::vector<int64_t>{0});
    ++runs_of_task_0;
    REQUIRE(rig.worker(0).start(rig.front(0).seq, internal::monotonic_now_ns()) == 0u);
    rig.lose(0);
    // The first death is retried; the second is the task's outcome.
    CHECK(call->count(0) == death);
  }
  CHECK(runs_of_task_0 == 2);
  CHECK(call->outcome(0).status().code() == absl::StatusCode::kAborted);
  CHECK(absl::StrContains(call->outcome(0).status().message(), "while running this task"));
  rig.run_all();
  CHECK(call->ended_once());
  CHECK(call->outcome(1).value_or(-1) == 10);
}

TEST_CASE("a task running when the pool stopped its worker on purpose is not run again") {
  Rig rig(1);
  auto call = rig.submit(2, chunks(2, /*retries=*/3));
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(0).start(rig.front(0).seq, internal::monotonic_now_ns()) == 0u);
  LostWorker how;
  how.running_failure = absl::DeadlineExceededError("task 0 ran past its timeout");
  how.retry_allowed = false;
  rig.lose(0, how);
  CHECK(call->outcome(0).status().code() == absl::StatusCode::kDeadlineExceeded);
  rig.run_all();
  CHECK(call->ended_once());
  CHECK(call->outcome(1).value_or(-1) == 10);
}

TEST_CASE("a lost worker's tasks are settled by its progress: finished, running, not started") {
  int retries = 0;
  bool stream_broke = false;
  SUBCASE("it died") {}
  SUBCASE("it died, and the call has retries") { retries = 1; }
  SUBCASE("its stream broke while it ran task 2") { stream_broke = true; }
  Rig rig(1);
  auto call = rig.submit(5, chunks(5, retries));
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  rig.run_one(0, seq);                                               // task 0: reported
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 1u);  // task 1: finished,
  rig.worker(0).finish();                                            // its result unsent
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 2u);  // task 2: running
  LostWorker how;
  if (stream_broke) {
    how.blamed_task = std::make_pair(seq, uint32_t{2});
    how.blamed_failure = absl::DataLossError("worker 0 sent a malformed frame");
    how.running_failure = absl::AbortedError("worker 0 was stopped after its stream broke");
    how.retry_allowed = false;
  }
  rig.lose(0, how);
  CHECK(call->outcome(0).value_or(-1) == 0);
  if (retries == 0) {
    CHECK(call->outcome(1).status().code() == absl::StatusCode::kAborted);
    CHECK(absl::StrContains(call->outcome(1).status().message(),
                            "after this task finished but before its result was sent"));
  }
  if (stream_broke) {
    CHECK(call->outcome(2).status().code() == absl::StatusCode::kDataLoss);
  } else if (retries == 0) {
    CHECK(absl::StrContains(call->outcome(2).status().message(), "while running this task"));
  }
  // Tasks 3 and 4 had not started: they run on the next worker (and, with retries, 1 and 2).
  CHECK(call->count(3) == 0);
  rig.run_all();
  CHECK(call->ended_once());
  CHECK(call->outcome(3).value_or(-1) == 30);
  CHECK(call->outcome(4).value_or(-1) == 40);
  if (retries > 0) {
    CHECK(call->outcome(1).value_or(-1) == 10);
    CHECK(call->outcome(2).value_or(-1) == 20);
  }
}

// What a task with a wild pointer may leave in its worker's record before it kills the worker.
void wipe_record(FakeWorker& worker) {
  worker.page().batch_seq.store(ControlPage::kNoBatch);
  worker.page().task_index.store(0);
  worker.page().running.store(0);
}

TEST_CASE("a task that wipes its worker's record and kills it: first in line at three such "
          "losses, it fails; the tasks behind it run once more, publishing each outcome") {
  for (const int retries : {0, 1}) {
    CAPTURE(retries);
    Rig rig(1);
    auto call = rig.submit(3, chunks(3, retries));
    int losses = 0;
    // Task 0 is the killer: every run of it wipes the record and ends the worker.
    while (call->count(0) == 0 && losses < 20) {
      rig.scheduler.dispatch();
      auto& batches = rig.worker(0).batches();
      REQUIRE_FALSE(batches.empty());
      const FakeWorker::Batch& batch = batches.front();
      REQUIRE(batch.jobs.front() == 0);
      if (losses > 0) {
        // Alone since its first loss; what was behind it publishes each outcome.
        CHECK(batch.count == 1);
        for (size_t b = 1; b < batches.size(); ++b) CHECK(batches[b].publish_each);
      }
      REQUIRE(rig.worker(0).start(batch.seq, internal::monotonic_now_ns()) == 0u);
      wipe_record(rig.worker(0));
      rig.lose(0);
      ++losses;
    }
    CHECK(losses == 3 * (1 + retries));
    REQUIRE(call->count(0) == 1);
    CHECK(call->outcome(0).status().code() == absl::StatusCode::kAborted);
    CHECK(absl::StrContains(call->outcome(0).status().message(), "taken as the task that ended"));
    rig.run_all();
    CHECK(call->ended_once());
    CHECK(*call->outcome(1) == 10);
    CHECK(*call->outcome(2) == 20);
  }
}

TEST_CASE("a loss whose record places a finished task charges no task first in line") {
  Rig rig(1);
  auto call = rig.submit(2, chunks(2, /*retries=*/10));
  for (int loss = 0; loss < 5; ++loss) {
    rig.scheduler.dispatch();
    // It finishes its first task, and is killed before its result goes: that task answers for
    // the loss (an attempt), not the one behind it.
    const uint64_t seq = rig.front(0).seq;
    REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 0u);
    rig.worker(0).finish();
    rig.lose(0);
  }
  rig.run_all();
  CHECK(call->ended_once());
  CHECK(*call->outcome(0) == 0);
  CHECK(*call->outcome(1) == 10);
}

TEST_CASE("the stall rule gives a stalled worker's unstarted tasks to another worker, once") {
  Rig rig(2);
  auto call = rig.submit(4, chunks(4));
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(0).batches().size() == 1);
  REQUIRE(rig.worker(1).batches().empty());
  const uint64_t seq = rig.front(0).seq;
  const int64_t started = internal::monotonic_now_ns();
  REQUIRE(rig.worker(0).start(seq, started) == 0u);
  // Within the floor (no task of the call timed yet): nothing moves.
  rig.scheduler.check(started + Scheduler::kStallFloorNs - 1);
  rig.scheduler.dispatch();
  CHECK(rig.worker(1).batches().empty());
  // Past it: its batch keeps only the task it runs (it cannot start another), once per front
  // batch; tasks 1..3 go to the idle worker, and the stalled one is given nothing more.
  rig.scheduler.check(started + Scheduler::kStallFloorNs);
  CHECK_FALSE(rig.worker(0).start(seq, started).has_value());
  rig.scheduler.check(started + 3 * Scheduler::kStallFloorNs);
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(1).batches().size() == 1);
  CHECK(rig.front(1).jobs == std::vector<int64_t>{1, 2, 3});
  CHECK(rig.worker(0).batches().size() == 1);
  rig.worker(0).finish();
  REQUIRE(rig.report(0, seq, 0, {0}).ok());
  rig.worker(0).batches().clear();
  rig.run_all();
  CHECK(call->ended_once());
  for (int64_t i = 0; i < 4; ++i) CHECK(call->outcome(i).value_or(-1) == i * 10);
  CHECK(rig.ports[0]->stops().empty());
}

// A worker's results carry its own account of their run time, which sets the stall rule's
// threshold (a multiple of the call's mean). One claiming 73 years switched the rule off for the
// call on every worker: a stalled worker kept its unstarted tasks.
TEST_CASE("a worker's claim of years of run time does not switch the stall rule off") {
  Rig rig(2);
  auto call = rig.submit(8, chunks(4));
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(0).batches().size() == 1);
  REQUIRE(rig.worker(1).batches().size() == 1);
  const uint64_t stalled = rig.front(0).seq;
  const uint64_t forging = rig.front(1).seq;
  REQUIRE(rig.worker(1).start(forging, internal::monotonic_now_ns()) == 0u);
  rig.worker(1).finish();
  {
    capnp::MallocMessageBuilder message;
    auto results = init_results(message, forging, 0, 1);
    results.initOutcomes(1)[0].initOk().setInt(40);
    results.setBusyNs(uint64_t{1} << 61);
    REQUIRE(deliver_results(rig.scheduler, 1, capnp::messageToFlatArray(message)).ok());
  }
  for (uint32_t i = 1; i < 4; ++i) rig.run_one(1, forging);
  rig.worker(1).batches().clear();
  const int64_t started = internal::monotonic_now_ns();
  REQUIRE(rig.worker(0).start(stalled, started) == 0u);
  rig.scheduler.check(started + Scheduler::kStallFloorNs);
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(1).batches().size() == 1);
  CHECK(rig.front(1).jobs == std::vector<int64_t>{1, 2, 3});
  CHECK(call->outcome(4).value_or(-1) == 40);
}

TEST_CASE("a task timeout stops the worker through its port, naming the task") {
  Rig rig(1);
  CallSettings settings = chunks(2);
  settings.has_task_timeout = true;
  settings.task_timeout = absl::Seconds(1);
  auto call = rig.submit(2, settings);
  rig.scheduler.dispatch();
  const int64_t started = internal::monotonic_now_ns();
  REQUIRE(rig.worker(0).start(rig.front(0).seq, started) == 0u);
  rig.scheduler.check(started + 999'000'000);
  CHECK(rig.ports[0]->stops().empty());
  rig.scheduler.check(started + 1'000'000'000 + internal::coarse_clock_slack_ns());
  REQUIRE(rig.ports[0]->stops().size() == 1);
  const absl::Status reason = rig.ports[0]->stops()[0];
  CHECK(reason.code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(absl::StrContains(reason.message(), "task 0 of its call"));
  LostWorker how;
  how.running_failure = reason;
  how.retry_allowed = false;
  rig.lose(0, how);
  CHECK(call->outcome(0).status() == reason);
  rig.run_all();
  CHECK(call->ended_once());
}

// A remote worker's progress reaches the pool late (WorkerProgress::exact false): a report that
// task 0 runs may be 100 ms old while the worker streams through tasks far shorter than that.
// Timed from such a report, a 5 ms timeout stopped workers over tasks they had finished.
TEST_CASE("a report that comes late is timed with its lag: no timeout falls on a task the worker "
          "may have left") {
  for (const bool soft : {false, true}) {
    for (const bool exact : {true, false}) {
      CAPTURE(soft);
      CAPTURE(exact);
      Rig rig(1);
      CallSettings settings = chunks(1000);
      if (soft) {
        settings.soft_timeout = absl::Milliseconds(5);
      } else {
        settings.has_task_timeout = true;
        settings.task_timeout = absl::Milliseconds(5);
      }
      rig.submit(1000, settings);
      rig.scheduler.dispatch();
      rig.worker(0).set_exact(exact);
      const int64_t start = internal::monotonic_now_ns();
      REQUIRE(rig.worker(0).start(rig.front(0).seq, start) == 0u);
      auto stopped = [&] {
        return soft ? internal::stop_requested(rig.worker(0).page())
                    : !rig.ports[0]->stops().empty();
      };
      const int64_t due = start + 5'000'000 + internal::coarse_clock_slack_ns();
      if (exact) {
        rig.scheduler.check(due);
        CHECK(stopped());
      } else {
        // 100 ms after the report, the worker may well have run 10,000 tasks since.
        const int64_t wake = rig.scheduler.check(due + 100'000'000);
        CHECK_FALSE(stopped());
        CHECK(wake <= due + internal::kInexactProgressLagNs);
        // Past the lag a task still shown running is stopped (its worker host should have).
        rig.scheduler.check(due + internal::kInexactProgressLagNs);
        CHECK(stopped());
      }
    }
  }
}

// AsyncResult::cancel() without a cancel_grace stops a worker running a task of the call. A
// remote worker's report that it began one may come after the cancel: the worker was then left to
// run a cancelled task to its end (a 60 s task held it for 60 s).
TEST_CASE("a call cancelled before a late report shows its task begun: without a cancel_grace, the "
          "worker is stopped once one does") {
  Rig rig(1);
  rig.ports[0]->answer_revokes_later();
  rig.worker(0).set_exact(false);
  auto call = rig.submit(1, chunks(1));
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  // As AsyncResult::cancel() does; no report shows the task running yet.
  rig.scheduler.cancel(call.get(), absl::CancelledError("cancelled before it started"));
  rig.scheduler.stop_running(call.get(), absl::CancelledError("the task was cancelled"));
  const int64_t cancelled = internal::monotonic_now_ns();
  CHECK(rig.ports[0]->stops().empty());
  // It had begun: the revoke reached the worker after it claimed the task.
  REQUIRE(rig.worker(0).start(seq, cancelled) == 0u);
  rig.ports[0]->answer_revokes();
  CHECK(call->count(0) == 0);
  // A report that it runs may be older than its task: within the lag, no stop.
  rig.scheduler.check(cancelled);
  CHECK(rig.ports[0]->stops().empty());
  rig.scheduler.check(cancelled + internal::kInexactProgressLagNs);
  REQUIRE(rig.ports[0]->stops().size() == 1);
  CHECK(rig.ports[0]->stops()[0].code() == absl::StatusCode::kCancelled);
  // No grace: the task was not asked to stop first.
  CHECK_FALSE(internal::stop_requested(rig.worker(0).page()));
}

TEST_CASE("claims: a cancelled call's unstarted tasks fail kCancelled; started ones deliver") {
  bool answered_later = false;
  SUBCASE("the revoke is answered at once (shared memory)") {}
  SUBCASE("the revoke is answered later (a remote worker)") { answered_later = true; }
  Rig rig(1);
  if (answered_later) rig.ports[0]->answer_revokes_later();
  auto call = rig.submit(4, chunks(4));
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 0u);
  rig.scheduler.cancel(call.get(), absl::CancelledError("cancelled by the test"));
  uint32_t claimed = 1;
  if (answered_later) {
    CHECK(call->count(1) == 0);
    // The worker goes on until the revoke reaches it.
    rig.worker(0).finish();
    REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 1u);
    claimed = 2;
    rig.ports[0]->answer_revokes();
  }
  for (uint32_t i = claimed; i < 4; ++i) {
    CHECK(call->outcome(i).status().code() == absl::StatusCode::kCancelled);
  }
  rig.worker(0).finish();
  CHECK_FALSE(rig.worker(0).start(seq, internal::monotonic_now_ns()).has_value());
  std::vector<int64_t> values;
  for (uint32_t i = 0; i < claimed; ++i) values.push_back(int64_t{i} * 10);
  REQUIRE(rig.report(0, seq, 0, values).ok());
  CHECK(rig.scheduler.idle(0));
  CHECK(call->ended_once());
  CHECK(call->outcome(0).value_or(-1) == 0);
}

TEST_CASE("each batch a worker holds has a claim slot of its own; a batch waits for a free one") {
  Rig rig(1, /*max_batches=*/64);
  auto call = rig.submit(100, chunks(1));
  // Short tasks: the worker may hold as many batches as it has claim slots.
  call->observed_tasks = 1000;
  call->observed_busy_ns = 1000;
  rig.scheduler.dispatch();
  auto& batches = rig.worker(0).batches();
  REQUIRE(batches.size() == ControlPage::kClaimSlots);
  for (uint32_t i = 0; i < batches.size(); ++i) {
    CHECK(batches[i].claim_slot == i);
    CHECK(batches[i].claim_tag == i);
  }
  // The worker can claim the one task of each, and no more.
  const uint64_t first = batches.front().seq;
  REQUIRE(rig.worker(0).start(first, internal::monotonic_now_ns()) == 0u);
  rig.worker(0).finish();
  CHECK_FALSE(rig.worker(0).start(first, internal::monotonic_now_ns()).has_value());
  // Nothing more until a slot is free; the first batch's slot is the next one's.
  rig.scheduler.dispatch();
  CHECK(batches.size() == ControlPage::kClaimSlots);
  REQUIRE(rig.report(0, first, 0, {0}).ok());
  batches.pop_front();
  rig.scheduler.dispatch();
  REQUIRE(batches.size() == ControlPage::kClaimSlots);
  CHECK(batches.back().claim_slot == 0);
  CHECK(batches.back().claim_tag == ControlPage::kClaimSlots);
  rig.run_all();
  CHECK(call->ended_once());
}

// --- Results that cannot be delivered (issue 15, item 2) ------------------------------------

// Runs `frame` for a batch of 3 tasks of which the worker runs task 1 (task 0 finished,
// unreported): the frame must be refused or throw; then the worker is lost as the pool loses it
// after a broken stream, and every task must end with exactly one outcome.
void check_undeliverable(kj::ArrayPtr<const capnp::word> frame, bool words,
                         std::optional<int64_t> delivered_before = std::nullopt) {
  Rig rig(1);
  auto call = rig.submit(3, chunks(3), words);
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  REQUIRE(seq == 1);
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 0u);
  rig.worker(0).finish();
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 1u);
  absl::Status status;
  try {
    status = deliver_results(rig.scheduler, 0, frame);
  } catch (const kj::Exception& e) {
    status = absl::DataLossError(e.getDescription().cStr());
  }
  MESSAGE(status);
  CHECK(status.code() == absl::StatusCode::kDataLoss);
  if (delivered_before) {
    CHECK(call->outcome(0).value_or(-1) == *delivered_before);
  } else {
    CHECK(call->count(0) == 0);
  }
  CHECK(call->count(1) == 0);
  LostWorker how;
  how.blamed_task = std::make_pair(seq, uint32_t{1});
  how.blamed_failure = status;
  how.retry_allowed = false;
  rig.lose(0, how);
  CHECK(call->outcome(1).status().code() == absl::StatusCode::kDataLoss);
  rig.run_all();
  CHECK(call->ended_once());
  CHECK(call->outcome(2).value_or(-1) == 20);
}

TEST_CASE("results that cannot be delivered whole count for nothing, and the call still ends") {
  SUBCASE("word results for a call whose jobs are not words") {
    check_undeliverable(word_results_frame(1, 0, {0}), /*words=*/false);
  }
  SUBCASE("word results that do not cover their count") {
    auto frame = word_results_frame(1, 0, {0});
    capnp::FlatArrayMessageReader reader(frame);
    capnp::MallocMessageBuilder copy;
    copy.setRoot(reader.getRoot<wire::FromWorker>());
    copy.getRoot<wire::FromWorker>().getResults().setCount(2);
    check_undeliverable(capnp::messageToFlatArray(copy), /*words=*/true);
  }
  SUBCASE("word results whose failed tasks are out of order") {
    auto frame = word_results_frame(1, 0, {0, 10});
    capnp::FlatArrayMessageReader reader(frame);
    capnp::MallocMessageBuilder copy;
    copy.setRoot(reader.getRoot<wire::FromWorker>());
    auto errors = copy.getRoot<wire::FromWorker>().getResults().initErrors(2);
    errors[0].setIndex(1);
    errors[1].setIndex(0);
    check_undeliverable(capnp::messageToFlatArray(copy), /*words=*/true);
  }
  SUBCASE("an outcome whose pointer is out of bounds, after one that is fine") {
    capnp::MallocMessageBuilder message;
    auto results = message.initRoot<wire::FromWorker>().initResults();
    results.setSeq(1);
    results.setStart(0);
    results.setCount(2);
    auto outcomes = results.initOutcomes(2);
    outcomes[0].initOk().setInt(0);
    outcomes[1].initOk().setInt(10);
    // The second outcome's pointer (after its one-word data section) points far out.
    auto* pointer = reinterpret_cast<uint64_t*>(
        capnp::AnyStruct::Builder(outcomes[1]).getDataSection().end());
    *pointer = (*pointer & ~uint64_t{0xffffffff}) | (uint64_t{0x1fffffff} << 2);
    check_undeliverable(capnp::messageToFlatArray(message), /*words=*/false,
                        /*delivered_before=*/0);
  }
  SUBCASE("an outcome of no known kind") {
    capnp::MallocMessageBuilder message;
    auto results = message.initRoot<wire::FromWorker>().initResults();
    results.setSeq(1);
    results.setStart(0);
    results.setCount(1);
    auto outcome = results.initOutcomes(1)[0];
    outcome.initOk().setInt(0);
    // The union's tag is the first 16 bits of its data section.
    auto data = capnp::AnyStruct::Builder(std::move(outcome)).getDataSection();
    data[0] = 7;
    check_undeliverable(capnp::messageToFlatArray(message), /*words=*/false);
  }
}

TEST_CASE("a worker whose progress says it still runs a task it reported is stopped kDataLoss") {
  Rig rig(2);
  auto call = rig.submit(4, chunks(4));
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  const int64_t started = internal::monotonic_now_ns();
  REQUIRE(rig.worker(0).start(seq, started) == 0u);
  // Its "result" for task 0 comes while it still runs task 0.
  REQUIRE(rig.report(0, seq, 0, {0}).ok());
  rig.scheduler.check(started + 1);
  REQUIRE(rig.ports[0]->stops().size() == 1);
  CHECK(rig.ports[0]->stops()[0].code() == absl::StatusCode::kDataLoss);
  LostWorker how;
  how.running_failure = rig.ports[0]->stops()[0];
  how.retry_allowed = false;
  rig.lose(0, how);
  rig.run_all();
  CHECK(call->ended_once());
  for (int64_t i = 1; i < 4; ++i) CHECK(call->outcome(i).value_or(-1) == i * 10);
}

// Chunks of one task, sent back on kUnavailable up to `retries` times, each wait `wait` (initial
// and max) spread by +-`jitter`.
CallSettings retried_on_unavailable(int retries, absl::Duration wait, double jitter) {
  CallSettings settings = chunks(1, retries);
  settings.retry_on = {absl::StatusCode::kUnavailable};
  settings.retry_backoff.initial = wait;
  settings.retry_backoff.max = wait;
  settings.retry_backoff.jitter = jitter;
  return settings;
}

// The wait of one retry at a fresh scheduler whose backoff is `max` at once, spread by +-50 %.
int64_t one_jittered_wait_ns(absl::Duration max) {
  Rig rig(1);
  auto call = rig.submit(1, retried_on_unavailable(/*retries=*/1, max, /*jitter=*/0.5));
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 0u);
  rig.worker(0).finish();
  const int64_t before = internal::monotonic_now_ns();
  REQUIRE(deliver_results(rig.scheduler, 0,
                          results_frame(seq, 0, {0}, {{0, absl::UnavailableError("busy")}}))
              .ok());
  rig.worker(0).batches().pop_front();
  const int64_t wake = rig.scheduler.check(internal::monotonic_now_ns());
  return wake - before;
}

TEST_CASE("the backoff's jitter differs from pool to pool, and no wait is longer than max") {
  const absl::Duration max = absl::Hours(1);
  std::set<int64_t> waits;
  for (int pool = 0; pool < 8; ++pool) {
    const int64_t wait = one_jittered_wait_ns(max);
    // (Measured from before the result was delivered: the clock moved a little meanwhile.)
    CHECK(wait <= absl::ToInt64Nanoseconds(max) + 1'000'000'000);
    CHECK(wait >= absl::ToInt64Nanoseconds(max / 2) - 1'000'000'000);
    waits.insert(wait / 1'000'000);  // to the millisecond: the clock moves between the pools
  }
  // Eight schedulers drawing from one sequence would wait the same (to the millisecond).
  CHECK(waits.size() > 1);
}

TEST_CASE("a task sent back by retry_on waits out its backoff on the scheduler's timer") {
  Rig rig(1);
  auto call = rig.submit(2, retried_on_unavailable(/*retries=*/2, absl::Hours(1), /*jitter=*/0));
  rig.scheduler.dispatch();
  const uint64_t first = rig.front(0).seq;
  REQUIRE(rig.worker(0).start(first, internal::monotonic_now_ns()) == 0u);
  rig.worker(0).finish();
  REQUIRE(deliver_results(rig.scheduler, 0,
                          results_frame(first, 0, {0}, {{0, absl::UnavailableError("busy")}}))
              .ok());
  rig.worker(0).batches().pop_front();
  CHECK(call->count(0) == 0);  // sent back, not failed
  CHECK(rig.scheduler.has_pending());
  // The worker is not kept waiting for it: task 1 goes first.
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(0).batches().size() == 1);
  CHECK(rig.front(0).jobs == std::vector<int64_t>{1});
  rig.run_one(0, rig.front(0).seq);
  rig.worker(0).batches().pop_front();
  rig.scheduler.dispatch();
  CHECK(rig.worker(0).batches().empty());  // its hour is not up
  // An hour later (the scheduler's clock is what check() is given) it runs again.
  const int64_t wake = rig.scheduler.check(internal::monotonic_now_ns());
  CHECK(wake > internal::monotonic_now_ns() + 3'000'000'000'000);
  rig.scheduler.check(internal::monotonic_now_ns() + 2 * 3'600'000'000'000);
  rig.scheduler.dispatch();
  REQUIRE(rig.worker(0).batches().size() == 1);
  CHECK(rig.front(0).jobs == std::vector<int64_t>{0});
  rig.run_one(0, rig.front(0).seq);
  CHECK(call->outcome(0).value_or(-1) == 0);
  CHECK(call->outcome(1).value_or(-1) == 10);
  CHECK(call->ended_once());

  // Without retry_on, a returned error is the task's outcome (retries are for deaths).
  auto plain = rig.submit(1, chunks(1, /*retries=*/2));
  rig.worker(0).batches().clear();
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 0u);
  rig.worker(0).finish();
  REQUIRE(deliver_results(rig.scheduler, 0,
                          results_frame(seq, 0, {0}, {{0, absl::UnavailableError("busy")}}))
              .ok());
  CHECK(plain->outcome(0).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("a task asked to stop sees it in its page and reports why, whatever it returns") {
  Rig rig(1);
  auto call = rig.submit(3, chunks(3));
  rig.scheduler.dispatch();
  const uint64_t seq = rig.front(0).seq;
  internal::ControlPage& page = rig.worker(0).page();
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 0u);
  CHECK_FALSE(internal::stop_requested(page));
  rig.scheduler.ask_to_stop(call.get(), absl::CancelledError("the call was cancelled"));
  CHECK(internal::stop_requested(page));
  rig.worker(0).finish();
  CHECK_FALSE(internal::stop_requested(page));  // between tasks
  REQUIRE(deliver_results(rig.scheduler, 0, results_frame(seq, 0, {7})).ok());
  CHECK(call->outcome(0).status().code() == absl::StatusCode::kCancelled);
  // The tasks after it in the batch were asked too; no worker was stopped for it.
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 1u);
  CHECK(internal::stop_requested(page));
  rig.worker(0).finish();
  REQUIRE(rig.worker(0).start(seq, internal::monotonic_now_ns()) == 2u);
  rig.worker(0).finish();
  REQUIRE(deliver_results(rig.scheduler, 0, results_frame(seq, 1, {8, 9})).ok());
  CHECK(call->outcome(2).status().code() == absl::StatusCode::kCancelled);
  CHECK(rig.ports[0]->stops().empty());
  // Its batch settled, the request is withdrawn.
  CHECK(page.stop_seq.load() == 0);
}

TEST_CASE("a soft_timeout asks the task to stop; without a cancel_grace its worker is stopped too") {
  Rig rig(1);
  CallSettings settings = chunks(1);
  settings.soft_timeout = absl::Milliseconds(50);
  auto call = rig.submit(1, settings);
  rig.scheduler.dispatch();
  const int64_t start = internal::monotonic_now_ns();
  REQUIRE(rig.worker(0).start(rig.front(0).seq, start) == 0u);
  const int64_t wake = rig.scheduler.check(start);
  CHECK(wake >= start + 50'000'000);
  CHECK_FALSE(internal::stop_requested(rig.worker(0).page()));
  rig.scheduler.check(start + 60'000'000 + internal::coarse_clock_slack_ns());
  CHECK(internal::stop_requested(rig.worker(0).page()));
  REQUIRE(rig.ports[0]->stops().size() == 1);
  CHECK(rig.ports[0]->stops()[0].code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(absl::StrContains(rig.ports[0]->stops()[0].message(), "soft_timeout"));
}


// Without a cancel_grace the worker is stopped at the soft timeout; the task may see the request
// and return just before the kill lands, its result unsent. It reports its soft timeout (and runs
// again when retry_on lists kDeadlineExceeded), not a death after it finished.
TEST_CASE("a task asked to stop that finished as its worker was stopped reports why it was asked") {
  int retries = 0;
  SUBCASE("kDeadlineExceeded not listed") {}
  SUBCASE("retry_on kDeadlineExceeded") { retries = 1; }
  Rig rig(1);
  CallSettings settings = chunks(1, retries);
  settings.soft_timeout = absl::Milliseconds(50);
  if (retries > 0) settings.retry_on = {absl::StatusCode::kDeadlineExceeded};
  auto call = rig.submit(1, settings);
  rig.scheduler.dispatch();
  const int64_t start = internal::monotonic_now_ns();
  REQUIRE(rig.worker(0).start(rig.front(0).seq, start) == 0u);
  rig.scheduler.check(start + 60'000'000 + internal::coarse_clock_slack_ns());
  REQUIRE(rig.ports[0]->stops().size() == 1);
  const absl::Status reason = rig.ports[0]->stops()[0];
  rig.worker(0).finish();  // it saw the request and returned; then the kill
  LostWorker how;
  how.ended = absl::StrCat("worker 0 was stopped: ", reason.message());
  how.running_failure = reason;
  how.retry_allowed = false;
  rig.lose(0, how);
  if (retries == 0) {
    CHECK(call->outcome(0).status().code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(absl::StrContains(call->outcome(0).status().message(), "soft_timeout"));
  } else {
    CHECK(call->count(0) == 0);
    rig.run_all();
    CHECK(call->outcome(0).value_or(-1) == 0);
  }
  CHECK(call->ended_once());
}

}  // namespace
}  // namespace procpool::testing
