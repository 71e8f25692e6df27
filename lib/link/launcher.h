// Launcher: makes the workers of one pool, each behind its WorkerLink.
//
// Supervision asks for a worker for a slot; the launcher makes one (forks it, or has a cluster
// engine start it and waits for it to dial in) and returns its link. Some launchers have
// descriptors of their own (the fork server's reports, a TCP listener and its connections): they
// watch them in the event loop's PollSet themselves, as they open and close them, and hear only
// of those that are ready; what they learn there arrives through LauncherEvents.

#ifndef PROCPOOL_LIB_LINK_LAUNCHER_H_
#define PROCPOOL_LIB_LINK_LAUNCHER_H_


#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"
#include "lib/common/poll_set.h"
#include "lib/link/worker_link.h"

namespace procpool::internal {

// A start that found no worker host free where hosts come when they will (a remote pool without
// a launch command: hosts dial in on their own, as the steps of an elastic job do). Its place
// waits for a host, which is the state such a pool is often in, not a failure to log as one:
// kUnavailable (calls say why when no worker is left at all), marked so.
inline constexpr char kWaitingForHostPayloadUrl[] = "type.procpool/waiting-for-host";
inline absl::Status waiting_for_host(absl::string_view why) {
  absl::Status status = absl::UnavailableError(why);
  status.SetPayload(kWaitingForHostPayloadUrl, absl::Cord());
  return status;
}
inline bool is_waiting_for_host(const absl::Status& status) {
  return status.GetPayload(kWaitingForHostPayloadUrl).has_value();
}

class LauncherEvents {
 public:
  virtual ~LauncherEvents() = default;
  // Where events of `link` go (the launcher learned something about one of its workers).
  virtual LinkEvents& events_of(WorkerLink& link) = 0;
  // The launcher can make workers again (a remote worker dialled in): slots waiting to start
  // one may try now rather than after their delay.
  virtual void on_capacity() = 0;
};

class Launcher {
 public:
  virtual ~Launcher() = default;

  // Makes a worker for `slot`, named `name` ("worker 3"): its link, in the starting state (its
  // READY frame follows), or why none could be made (kResourceExhausted for a full process
  // table, ...). Called from the thread the launcher's rules allow (see implementations).
  virtual absl::StatusOr<std::unique_ptr<WorkerLink>> launch(int slot, const std::string& name) = 0;

  // The event loop. Called once, before anything else: the launcher watches its own descriptors
  // in `set` under `group` (PollSet::watch) from now on, each from when it opens it until just
  // before it closes it. `set` outlives the launcher.
  virtual void watch_with(PollSet& /*set*/, uint32_t /*group*/) {}
  // Its watches the last wait found ready (their keys), and whenever has_pending_events() says
  // it has work without them: what to do then.
  virtual void service(const std::vector<PollSet::Fired>& /*fired*/, LauncherEvents& /*events*/) {}
  // Work the launcher has without its descriptors being ready (reports read ahead, hosts a link
  // let go of): service() is called at the next wake, which comes at once.
  virtual bool has_pending_events() const { return false; }
  // The launcher's deadlines (handshakes, heartbeats); returns when it wants to be called again.
  // Called at every wake: cheap until then.
  virtual int64_t check(int64_t /*now_ns*/, LauncherEvents& /*events*/) { return INT64_MAX; }
  // The pool's size changed (resize()): what the launcher sizes by it follows (the count its
  // workers are told, a remote pool's room for hosts and its wait for new ones to dial in).
  virtual void set_workers(int /*workers*/) {}
  // The pool is done with its workers (join or terminate finished): let go of what is left (idle
  // remote hosts, which then leave), and make no more.
  virtual void finish() {}
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_LAUNCHER_H_
