// Supervisor's private parts: a slot (one worker's place in the pool, across its successive
// processes), and the adapters through which its link and the scheduler reach it.

#ifndef PROCPOOL_LIB_SUPERVISION_SLOT_H_
#define PROCPOOL_LIB_SUPERVISION_SLOT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "lib/link/stop_sequence.h"
#include "lib/supervision/supervisor.h"

namespace procpool::internal {

// Where a slot's link reports (worker_link.h).
class Supervisor::Events final : public LinkEvents {
 public:
  Events(Supervisor& owner, Slot& slot) : owner_(owner), slot_(slot) {}
  void on_frame(kj::ArrayPtr<const capnp::word> frame) override { owner_.on_frame(slot_, frame); }
  void on_recovered_frame(kj::ArrayPtr<const capnp::word> frame) override {
    owner_.on_frame(slot_, frame, /*recovered=*/true);
  }
  void on_broken_stream(absl::Status why) override { owner_.on_broken_stream(slot_, why); }
  void on_corrupted_connection(absl::Status why) override {
    owner_.on_corrupted_connection(slot_, std::move(why));
  }
  void on_revoked(uint32_t slot, uint16_t tag, uint32_t claimed) override;
  void on_output(bool is_stderr, std::span<const std::string_view> lines,
                 OutputPlace place) override {
    owner_.on_output(slot_, is_stderr, lines, place);
  }
  void on_ended(WorkerEnd end) override { owner_.on_ended(slot_, std::move(end)); }
  void on_host_leaving() override { owner_.on_host_leaving(slot_); }

 private:
  Supervisor& owner_;
  Slot& slot_;
};

// What the scheduler may do with a slot's worker (scheduler.h).
class Supervisor::Port final : public WorkerPort {
 public:
  Port(Supervisor& owner, Slot& slot) : owner_(owner), slot_(slot) {}
  const std::string& name() const override;
  void send(std::unique_ptr<capnp::MessageBuilder> frame) override;
  void flush() override;
  bool can_borrow() const override;
  SharedRegion* shared_region() override;
  WorkerProgress progress() const override;
  void open_claims(uint32_t slot, uint16_t tag, uint32_t count) override;
  void revoke(uint32_t slot, uint16_t tag) override;
  void stop(absl::Status reason) override;
  void request_stop(uint64_t seq, uint32_t from, uint32_t to) override;

 private:
  Supervisor& owner_;
  Slot& slot_;
};

// What belongs to one worker process of a slot. launch() gives each process a fresh one, whole,
// so nothing of the last process's stop, blame, memory check or exit hook carries over to the
// next; a field added here starts fresh with the rest.
struct Supervisor::ProcessState {
  std::unique_ptr<WorkerLink> link;  // null while none
  int64_t started_ns = 0;
  bool start_failed = false;         // its start failure is counted already
  bool borrowed = false;
  bool recycling = false;
  int64_t last_memory_check_ns = 0;
  std::optional<absl::Status> stop_reason;  // why the pool stops it; set once
  StopSequence stop_sequence;               // SIGTERM, then SIGKILL after kill_grace
  std::optional<std::pair<uint64_t, uint32_t>> blamed;  // the task its stream broke on
  bool blame_at_end = false;  // find that task from its last progress, once it has ended
  absl::Status blamed_failure;
  // A connection to it failed TLS record authentication: nobody's task is to blame, and what it
  // held fails kDataLoss (its stop_reason) or runs again as after a death.
  bool corrupted = false;
  absl::Status exit_hook_status;
  // terminate() with a cancel_grace: stopped once it has begun batch `terminate_after_batch` (the
  // last it was sent) and runs no task, or at terminate_at_ns. Progress learnt late (a remote
  // worker's) says so only from kInexactProgressLagNs after terminate_asked_ns: an older report
  // may miss a task begun since, which is owed its grace.
  int64_t terminate_at_ns = INT64_MAX;
  int64_t terminate_asked_ns = 0;
  uint64_t terminate_after_batch = 0;
  // Told to leave before join (a resize, idle_timeout, a recycling, its host leaving): stopped as
  // join stops one if it is still there then, so that an exit() that hangs cannot keep its place
  // (and the work waiting for it) for good.
  int64_t leave_by_ns = INT64_MAX;
};

// A slot: one worker's place in the pool across its successive processes. Its own fields outlive
// them; those of ProcessState (a base, so that they read as the slot's) are the current one's.
struct Supervisor::Slot : ProcessState {
  Slot(Supervisor& owner, int index)
      : index(index), name(absl::StrCat("worker ", index)), events(owner, *this), port(owner, *this) {}

  const int index;
  const std::string name;  // "worker 3"; the link's name adds the pid
  Events events;
  Port port;
  State state = State::kEmpty;
  uint64_t generation = 0;           // counts the links this slot has had
  int64_t next_start_ns = 0;         // kEmpty: when to start the next one
  bool no_capacity = false;          // its last start failed for want of a host (launch() said)
  // ... and hosts dial in on their own: it waits for one (is_waiting_for_host), no error.
  bool waits_for_host = false;
  std::string last_exit;             // how its last process ended (WorkerEnd::how), for stats
  // Not one of the pool's workers since a resize shrank the pool: its worker leaves once idle
  // and is never replaced (not after a crash either), until a resize takes the slot back.
  bool retired = false;
  // One of the pool's workers that left after idle_timeout: started again when work needs it.
  bool parked = false;
  // idle_timeout's clock: when its worker was last seen with work in hand (check_idle), and
  // whether a batch was sent to it since (work that came and went between two looks).
  int64_t last_active_ns = 0;
  bool sent_since_look = false;
  // The event loop (Supervisor::touch): registered and checked again once something touched it.
  bool in_touched = false;
  bool unsynced = true;
  bool unchecked = true;
  uint64_t polled_generation = 0;  // the link whose descriptors are registered

  // The current process's state, replaced whole when the next one starts.
  ProcessState& process() { return *this; }
  const std::string& display() const { return link ? link->name() : name; }
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_SUPERVISION_SLOT_H_
