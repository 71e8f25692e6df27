// Unit tests of the supervisor's rules over fake workers (tests/fake_worker.h): no process, no
// descriptor, every clock reading the test's own. What a user sees of them is tested with real
// processes elsewhere (fault_test, cooperative_cancel_test); here, the timings those cannot pin.

#include "lib/supervision/supervisor.h"

#include <memory>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "lib/common/clock.h"
#include "lib/common/poll_set.h"
#include "lib/scheduler/scheduler.h"
#include "tests/fake_worker.h"

namespace procpool::testing {
namespace {

using internal::CallSettings;
using internal::Scheduler;
using internal::StopMode;
using internal::Supervisor;

// One worker slot, a scheduler and a supervisor over fake links; `now` is the test's clock.
struct Rig {
  explicit Rig(absl::Duration cancel_grace)
      : scheduler(Scheduler::Config{.workers = 1, .max_frame_bytes = size_t{1} << 20}),
        supervisor(Supervisor::Config{.workers = 1,
                                      .max_frame_bytes = size_t{1} << 20,
                                      .enter_timeout = absl::InfiniteDuration(),
                                      .kill_grace = absl::Seconds(1),
                                      .join_timeout = absl::InfiniteDuration(),
                                      .respawn_delay = absl::ZeroDuration(),
                                      .respawn_max_delay = absl::ZeroDuration(),
                                      .cancel_grace = cancel_grace},
                   launcher, scheduler, poll_set) {}

  // The pool loop's turn: a worker starts (and says it is ready), queued tasks go out.
  void turn() {
    supervisor.after_events();
    const int launched = launcher.launches(0);
    supervisor.start_due(now);
    supervisor.check(now);
    if (launcher.launches(0) != launched) launcher.latest(0)->deliver(ready_frame());
    scheduler.dispatch();
  }
  FakeWorkerLink& link() { return *launcher.latest(0); }
  FakeWorker& worker() { return link().worker(); }

  int64_t now = internal::monotonic_now_ns();
  Scheduler scheduler;
  internal::PollSet poll_set;
  FakeLauncher launcher;
  Supervisor supervisor;
};

TEST_CASE("terminate() with a cancel_grace: a late report that the worker's last task returned "
          "is believed only once it is newer than the request to stop") {
  Rig rig(absl::Seconds(5));
  rig.turn();
  CallSettings settings;
  settings.chunksize = 2;
  auto call = std::make_shared<RecordingCall>(2, settings);
  rig.scheduler.submit(call, 0, 2);
  rig.turn();
  REQUIRE(rig.worker().batches().size() == 1);
  const uint64_t seq = rig.worker().batches().front().seq;
  // A remote worker: its reports come late. The last says its first task ran and returned.
  rig.worker().set_exact(false);
  REQUIRE(rig.worker().start(seq, rig.now) == 0u);
  rig.worker().finish();

  rig.supervisor.terminate();
  // That report may be older than the request to stop: the worker may have begun its second
  // task since, which is owed its grace. No stop yet.
  rig.supervisor.check(rig.now);
  CHECK(rig.link().stops().empty());
  // A report as old as the lag allows, still saying so: it returned, and the worker goes now,
  // long before the grace ends.
  rig.now = internal::monotonic_now_ns() + internal::kInexactProgressLagNs;
  rig.supervisor.check(rig.now);
  REQUIRE(rig.link().stops().size() == 1);
  CHECK(rig.link().stops()[0] == StopMode::kTerminate);
}

TEST_CASE("terminate() with a cancel_grace: exact progress that the last task returned ends the "
          "wait at once") {
  Rig rig(absl::Seconds(5));
  rig.turn();
  auto call = std::make_shared<RecordingCall>(1, CallSettings{});
  rig.scheduler.submit(call, 0, 1);
  rig.turn();
  REQUIRE(rig.worker().batches().size() == 1);
  const uint64_t seq = rig.worker().batches().front().seq;
  REQUIRE(rig.worker().start(seq, rig.now) == 0u);
  rig.worker().finish();
  rig.supervisor.terminate();
  rig.supervisor.check(rig.now);
  REQUIRE(rig.link().stops().size() == 1);
  CHECK(rig.link().stops()[0] == StopMode::kTerminate);
}

}  // namespace
}  // namespace procpool::testing
