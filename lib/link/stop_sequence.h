// StopSequence: the one way a worker is stopped by force — SIGTERM, then SIGKILL once kill_grace
// has passed without its end (reproc's reproc_stop: one chain, each step with its deadline).
//
// Supervision holds one for each worker process it starts, a relay one for each worker it forks;
// both call stop() to begin and check() from their loop. It acts on the worker through its link
// (WorkerLink::stop: signals through a pidfd, or a stop request to a remote worker's relay), so it
// never sees a pid. A fresh one goes with each process: nothing of one worker's stop carries over
// to the next. Not thread-safe.

#ifndef PROCPOOL_LIB_LINK_STOP_SEQUENCE_H_
#define PROCPOOL_LIB_LINK_STOP_SEQUENCE_H_

#include <cstdint>

#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/link/worker_link.h"

namespace procpool::internal {

class StopSequence {
 public:
  // kTerminate: asks the worker to end (SIGTERM); the first time, the kill is set for `grace`
  // after `now_ns` (asked again, the signal goes again and the deadline stays). kKill: kills it
  // at once. Once it is killed, nothing more is sent.
  void stop(WorkerLink& link, StopMode mode, absl::Duration grace, int64_t now_ns) {
    if (killed_) return;
    if (mode == StopMode::kKill) return kill(link);
    link.stop(StopMode::kTerminate);
    if (kill_at_ns_ == 0) kill_at_ns_ = now_ns + to_ns(grace);
  }

  // Kills the worker once its grace has passed. Returns when to be called again: the kill's
  // deadline, or INT64_MAX when none is pending.
  int64_t check(WorkerLink& link, int64_t now_ns) {
    if (killed_ || kill_at_ns_ == 0) return INT64_MAX;
    if (now_ns < kill_at_ns_) return kill_at_ns_;
    kill(link);
    return INT64_MAX;
  }

  // When the kill is due; INT64_MAX when none is pending (not asked, or killed already).
  int64_t kill_at_ns() const { return killed_ || kill_at_ns_ == 0 ? INT64_MAX : kill_at_ns_; }
  bool killed() const { return killed_; }

 private:
  void kill(WorkerLink& link) {
    killed_ = true;
    link.stop(StopMode::kKill);
  }

  int64_t kill_at_ns_ = 0;  // 0: no SIGTERM was sent
  bool killed_ = false;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_STOP_SEQUENCE_H_
