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
  void on_revoked(uint32_t slot, uint16_t tag, uint32_t claimed) override;
  void on_ended(WorkerEnd end) override { owner_.on_ended(slot_, std::move(end)); }

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

 private:
  Supervisor& owner_;
  Slot& slot_;
};

struct Supervisor::Slot {
  Slot(Supervisor& owner, int index)
      : index(index), name(absl::StrCat("worker ", index)), events(owner, *this), port(owner, *this) {}

  const int index;
  const std::string name;  // "worker 3"; the link's name adds the pid
  Events events;
  Port port;
  std::unique_ptr<WorkerLink> link;  // null while none
  State state = State::kEmpty;
  uint64_t generation = 0;           // counts the links this slot has had
  int64_t next_start_ns = 0;         // kEmpty: when to start the next one
  int64_t started_ns = 0;
  bool start_failed = false;         // its start failure is counted already
  bool no_capacity = false;          // its last start failed for want of a host (launch() said)
  bool borrowed = false;
  bool recycling = false;
  int64_t last_memory_check_ns = 0;
  std::optional<absl::Status> stop_reason;  // why the pool stops it; set once
  int64_t kill_at_ns = 0;                   // SIGKILL once passed (after a SIGTERM); 0: none
  bool killed = false;
  std::optional<std::pair<uint64_t, uint32_t>> blamed;  // the task its stream broke on
  bool blame_at_end = false;  // find that task from its last progress, once it has ended
  absl::Status blamed_failure;
  absl::Status exit_hook_status;

  const std::string& display() const { return link ? link->name() : name; }
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_SUPERVISION_SLOT_H_
