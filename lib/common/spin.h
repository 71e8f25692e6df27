// Spin-then-block, for waits that usually end within microseconds: an apply's reply, a worker's
// next batch.
//
// Blocking costs a sleep and a wake-up on each side, and on a virtual machine waking an idle
// virtual CPU costs tens of microseconds (the raw socketpair ping-pong is 4x slower between two
// CPUs than on one). Polling for a few microseconds first skips both when the reply comes in
// time. The budget adapts to whether spinning pays: a spin that finds what it waits for keeps the
// full budget, one that finds nothing halves it, down to none; with none, every kRetryAfter-th
// wait tries a full spin again. A failed spin whose blocking wait then ends at once says that the
// other end could only run where we spun (other programs keep the other CPU busy): spinning stops
// for kContendedRetryAfter waits. The budget outlasts the wake-up of an idle virtual CPU (~35 us
// here), so that the first spins, before the other end spins too, do not look like that. Where this process may use one CPU only, the other end cannot
// run while we spin: never spin there.
//
// Not thread-safe: one per waiting thread, or guarded by the caller's lock.

#ifndef PROCPOOL_LIB_COMMON_SPIN_H_
#define PROCPOOL_LIB_COMMON_SPIN_H_

#include <cstdint>

namespace procpool::internal {

class SpinPolicy {
 public:
  static constexpr int64_t kMaxSpinNs = 50'000;

  // Asks how many CPUs this process may use on first use, not here: a forked worker that never
  // spins never pays for the system call.
  SpinPolicy() = default;

  // How long to spin before blocking, now; 0: block at once.
  int64_t budget_ns() {
    init();
    return budget_ns_;
  }
  // False where this process has one CPU: then nothing needs timing for blocked().
  bool enabled() {
    init();
    return enabled_;
  }
  // After a spin: whether it found what it waited for.
  void spun(bool found);
  // After a blocking wait (whether or not a spin came first).
  void blocked(int64_t waited_ns);

  // Lets the CPU know we spin (a pause); cheap.
  static void relax();

 private:
  static constexpr int kRetryAfter = 64;
  static constexpr int kContendedRetryAfter = 4096;
  // The blocking wait after a failed spin ended sooner than this: the spin was in the way.
  static constexpr int64_t kContendedWaitNs = 10'000;
  void init() {
    if (!initialized_) initialize();
  }
  void initialize();
  bool initialized_ = false;
  bool enabled_ = false;
  int64_t budget_ns_ = 0;
  int waits_until_retry_ = 0;
  bool last_spin_failed_ = false;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_SPIN_H_
