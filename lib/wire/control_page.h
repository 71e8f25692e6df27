// ControlPage: a few words of memory shared by one worker and the parent, and the claim protocol
// that decides, without a message, whether a task sent to a worker may still start.
//
// Stamps. The worker writes which task of which batch it is running, and since when, before each
// task; the parent reads them without a syscall to tell, after a crash, which task died and which
// never started, and to enforce task timeouts. At its end the worker records its exit status, or
// the fatal signal that is killing it, so a death is described right even when the program
// reaps its own children (SIGCHLD ignored, or waitpid(-1) in a handler) and waitpid cannot.
//
// Claims. Each batch in flight at a worker owns one claim word: (tag, limit, next). The parent
// writes (tag, count, 0) before it sends the batch; the worker claims tasks in order with a
// compare-and-swap that advances `next` while `next < limit`; the parent takes unstarted tasks
// back with a compare-and-swap that lowers `limit` to `next`. Whichever lands first wins, so a
// task is either started by the worker or taken back by the parent, never both, and the parent
// learns exactly where the worker stopped. The tag (the batch's number at that worker, mod 2^16)
// keeps a worker that reads a batch late from claiming in a slot reused by a later batch.
//
// Held frames. After the page, in the same mapping, a worker on a fork link keeps the results it
// holds back to write several in one go (WorkerTransport::hold, task_server.h): held there, they
// survive the worker. The parent takes them from the area when the worker dies, or when they have
// waited long (the worker is busy in a long task), and the worker writes only what the parent has
// not taken. Every byte of it is read like a frame from the channel: size-checked, untrusted.
//
// Stop requests. The parent (for a remote worker, its relay) asks the running task to stop
// (procpool::this_task::stop_requested) by naming tasks [from, to) of batch `stop_seq`; the task
// reads it with a relaxed load of `stop_seq`, which is 0 (nothing asked) almost always, and
// compares with its own stamps only when it is not. A request names a batch and tasks, not "now":
// one that arrives after its task ended stops nothing that follows. kStopEveryTask asks every
// task to stop (the pool terminates). Advisory only: a worker that ignores it is killed by the
// parent when cancel_grace ends, never trusted to have stopped.
//
// One page per worker, its own MAP_SHARED mapping of a memfd: a worker can scribble only on its
// own page, and the parent never trusts it for more than the decisions above. No other process
// forked by the parent inherits it (lib/common/shared_memory.h): a sibling cannot reach it, and
// it is freed when the worker and its link are gone.
//
// Crash stack. A worker killed by a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) writes
// the crashing thread's stack into `crash_stack` from its signal handler, then stores its length
// in `crash_stack_bytes` (release): whoever maps the page (the pool, or a remote worker's relay;
// the same host) reads it once the worker is dead and names the functions (crash_stack_text).
// Written by the worker only, once; untrusted like everything it writes. Its form: one line
// "@<n> <path>" for each file the frames are in (n from 0), then one line a frame, innermost
// first, "#<i> 0x<address> <n>+0x<offset in that file>", or "#<i> 0x<address> ?" for a frame in
// no file.
//
// A remote worker shares its page with its relay, not with the pool (lib/link/relay.h), and its
// batches come straight from the pool: the worker opens each batch's claims itself when it reads
// it (`worker_opens_claims`), and the relay revokes on the pool's behalf. A revoke that comes
// before its batch marks the word (tag, taken back before it came), so the worker, arriving
// later, starts none of it: still never both.

#ifndef PROCPOOL_LIB_WIRE_CONTROL_PAGE_H_
#define PROCPOOL_LIB_WIRE_CONTROL_PAGE_H_

#include <signal.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {

struct ControlPage {
  static constexpr uint64_t kNoBatch = ~uint64_t{0};
  static constexpr int32_t kNoExit = -1;
  static constexpr uint32_t kClaimSlots = 64;
  // The most tasks one batch may hold (the claim word's 24-bit fields).
  static constexpr uint32_t kMaxBatchTasks = (uint32_t{1} << 24) - 1;

  // Written by the worker only.
  std::atomic<uint64_t> batch_seq{kNoBatch};  // batch of the task below
  std::atomic<uint32_t> task_index{0};        // index in that batch of the last task started
  std::atomic<uint32_t> running{0};           // 1 while that task runs
  std::atomic<int64_t> started_ns{0};         // CLOCK_MONOTONIC(_COARSE) when it started
  std::atomic<int64_t> tasks_done{0};
  std::atomic<int64_t> busy_ns{0};            // total time spent in tasks
  std::atomic<int64_t> timeout_ns{0};         // the running batch's task timeout (0: none), for
                                              // a remote worker's watchdog (lib/link/relay.h)
  std::atomic<int32_t> exit_status{kNoExit};  // the status of a clean _exit, set just before it
  std::atomic<int32_t> fatal_signal{0};       // set by the worker's fatal-signal handler

  // Set before the worker starts: it opens its batches' claims itself (a remote worker).
  std::atomic<uint32_t> worker_opens_claims{0};

  // Written by the parent (or a remote worker's relay) only: stop requests (see the top).
  static constexpr uint64_t kStopEveryTask = ~uint64_t{0} - 1;
  std::atomic<uint64_t> stop_seq{0};    // the batch whose tasks should stop; 0: none
  std::atomic<uint64_t> stop_range{0};  // [from, to) of its tasks, as from << 32 | to

  // Written by both, by compare-and-swap only.
  std::atomic<uint64_t> claims[kClaimSlots] = {};

  // Written by the worker's fatal-signal handler only (see the top of this file).
  static constexpr uint32_t kCrashStackBytes = 3072;
  std::atomic<uint32_t> crash_stack_bytes{0};
  char crash_stack[kCrashStackBytes] = {};
};

// Held frames of one worker (see the top of this file). The worker appends whole frames at
// `bytes`; frames [taken, bytes) are held: written by neither side yet. A side changes the area
// only while it owns `lock` (a compare-and-swap from 0), except the parent once the worker is dead.
struct HeldFrames {
  static constexpr uint32_t kFree = 0;
  static constexpr uint32_t kWorker = 1;
  static constexpr uint32_t kParent = 2;
  // The mapping holds the page, then this; the frames fill the rest of kControlMappingBytes.
  static constexpr size_t kOffset = 4096;

  std::atomic<uint32_t> lock{kFree};
  std::atomic<uint32_t> bytes{0};
  std::atomic<uint32_t> taken{0};
  std::atomic<int64_t> since_ns{0};  // CLOCK_MONOTONIC when the oldest held frame was held; 0: none
  alignas(64) unsigned char data[1];  // really capacity() bytes

  static constexpr size_t capacity();
};

static_assert(sizeof(ControlPage) <= HeldFrames::kOffset, "the page must end before the held frames");

// The fatal signals whose deaths come with a crash stack: the worker's handlers record one for
// these only, and only a death by one of them is described with the stack found in its page (a
// stack there after any other death was written by no handler).
inline constexpr int kCrashSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
constexpr bool is_crash_signal(int signal) {
  for (const int crash : kCrashSignals) {
    if (crash == signal) return true;
  }
  return false;
}

// The stack a dead worker recorded in `page` (see the top of this file), or "" if none, one frame
// a line: "#3 0x55d0c2a1b2c3 Crasher::run(long)" (symbolize_crash_stack). Every byte but a
// newline or a printable ASCII character is replaced by '?' (it may be garbage, and goes into
// logs and statuses). clean_crash_stack does that (and cuts at kCrashStackBytes) to text a relay
// sent (`raw`).
std::string crash_stack_text(const ControlPage& page);
std::string clean_crash_stack(std::string_view raw);
// Names each frame of a stack in the page's form: "#3 0x55d0c2a1b2c3 1+0x1b2c3" becomes
// "#3 0x55d0c2a1b2c3 Crasher::run(long)", from the symbol table of file 1 (elf_symbols.h), or
// "#3 0x55d0c2a1b2c3 (unknown) /path/of/file+0x1b2c3" when it has none there; a frame in no
// file is "(unknown)". The "@" lines go; any line of another form stays as it is.
std::string symbolize_crash_stack(std::string_view stack);

// Size of a worker's control mapping: the page, the held frames.
inline constexpr size_t kControlMappingBytes = size_t{64} << 10;
constexpr size_t HeldFrames::capacity() {
  return kControlMappingBytes - kOffset - offsetof(HeldFrames, data);
}

// Whether a worker's `taken` and `bytes` (read from its HeldFrames, which it may have scribbled
// on) describe frames the parent may copy: data[taken, bytes) lies in the area, and both ends are
// on the 8-byte word boundaries every frame starts and ends on. The one check of them: a parent
// that takes the frames of a live worker and one that recovers those of a dead worker agree.
constexpr bool held_frames_valid(uint32_t taken, uint32_t bytes) {
  return taken <= bytes && bytes <= HeldFrames::capacity() && taken % 8 == 0 && bytes % 8 == 0;
}

// The held frames in the same mapping as `page` (a page mapped by ControlPageMapping only).
inline HeldFrames* held_frames(ControlPage* page) {
  return reinterpret_cast<HeldFrames*>(reinterpret_cast<char*>(page) + HeldFrames::kOffset);
}

// A claim word: [tag:16][limit:24][next:24].
constexpr uint64_t pack_claim(uint16_t tag, uint32_t limit, uint32_t next) {
  return (uint64_t{tag} << 48) | (uint64_t{limit & ControlPage::kMaxBatchTasks} << 24) |
         (next & ControlPage::kMaxBatchTasks);
}
constexpr uint16_t claim_tag(uint64_t word) { return static_cast<uint16_t>(word >> 48); }
constexpr uint32_t claim_limit(uint64_t word) {
  return static_cast<uint32_t>(word >> 24) & ControlPage::kMaxBatchTasks;
}
constexpr uint32_t claim_next(uint64_t word) {
  return static_cast<uint32_t>(word) & ControlPage::kMaxBatchTasks;
}

// Parent, before sending a batch of `count` tasks in claim slot `slot` with tag `tag`.
void open_claims(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t count);

// Worker with `worker_opens_claims`, on reading a batch: opens its claims, unless the batch was
// taken back before it came.
void open_claims_on_arrival(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t count);

// Worker, before starting task `next` of the batch in (`slot`, `tag`): claims up to `want` tasks
// from `next` on and returns how many it got. 0 means the batch ends before `next`: the parent
// took the rest back (or the slot holds another batch: this one was taken back whole).
uint32_t claim_tasks(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t next, uint32_t want);

// Parent: ends the batch in (`slot`, `tag`) after the tasks already claimed, and returns how many
// were claimed; the worker will start none of the rest. If `worker_opens` (its worker opens its
// batches' claims: `worker_opens_claims` as the parent set it, never as read back from the page,
// which the worker's tasks can overwrite), a batch the worker has not read yet is taken back whole
// (0). Otherwise a word the parent opened that now holds another batch's tag was overwritten:
// kMaxBatchTasks (every task counts as claimed; the caller bounds it by the batch's size).
uint32_t revoke_claims(ControlPage& page, uint32_t slot, uint16_t tag, bool worker_opens);

// Parent (or relay): asks tasks [from, to) of batch `seq` to stop (`seq` kStopEveryTask: every
// task), replacing any request before; `seq` 0 withdraws it.
void request_stop(ControlPage& page, uint64_t seq, uint32_t from, uint32_t to);

// Worker: whether the task it runs (its stamps: batch_seq, task_index) is asked to stop. A relaxed
// load when nothing is asked.
inline bool stop_requested(const ControlPage& page) {
  const uint64_t seq = page.stop_seq.load(std::memory_order_relaxed);
  if (seq == 0) return false;
  if (seq == ControlPage::kStopEveryTask) return true;
  std::atomic_thread_fence(std::memory_order_acquire);  // the range written before the seq
  if (seq != page.batch_seq.load(std::memory_order_relaxed) ||
      page.running.load(std::memory_order_relaxed) == 0) {
    return false;
  }
  const uint64_t range = page.stop_range.load(std::memory_order_relaxed);
  const uint32_t index = page.task_index.load(std::memory_order_relaxed);
  return index >= static_cast<uint32_t>(range >> 32) && index < static_cast<uint32_t>(range);
}

// Owns one mapping of a ControlPage, and (in the parent) the memfd behind it.
class ControlPageMapping {
 public:
  // A fresh page in a new memfd named `name` (what /proc/<pid>/maps shows), mapped here only: no
  // process forked afterwards inherits it, not even the worker it is for (map_in_worker).
  static absl::StatusOr<ControlPageMapping> create(const std::string& name = "procpool-control");
  // Maps the page of an existing memfd (in a worker forked by the fork server). Does not take
  // `fd`: the caller closes it; the mapping stays.
  static absl::StatusOr<ControlPageMapping> map(int fd);
  ControlPageMapping() = default;
  ControlPageMapping(ControlPageMapping&& other) noexcept;
  ControlPageMapping& operator=(ControlPageMapping&& other) noexcept;
  ~ControlPageMapping();

  // In the worker just forked from the process that created this page: maps it again at the same
  // address (get() stays valid), and lets the descriptor close with the other inherited ones. On
  // failure the worker has no page and must exit.
  absl::Status map_in_worker();

  ControlPage* get() const { return page_; }
  HeldFrames* held() const { return page_ == nullptr ? nullptr : held_frames(page_); }
  ControlPage* operator->() const { return page_; }
  int fd() const { return fd_.get(); }
  // In the parent, once the worker has its own copy of the descriptor (it was forked, or the fork
  // server was sent it): closes ours; the mapping stays. A worker's page then costs the parent no
  // descriptor (a pool of many workers stays within 2 a worker: bench/bench_scale.cc).
  void close_descriptor() { fd_.reset(); }
  // Forgets the mapping without unmapping it (a worker that never returns keeps it).
  ControlPage* release();

  // Before the worker starts: it opens its batches' claims itself (ControlPage::
  // worker_opens_claims). The parent keeps its own copy, which no task can overwrite: what
  // revoke_claims is told.
  void set_worker_opens_claims();
  bool worker_opens_claims() const { return worker_opens_claims_; }

 private:
  ControlPage* page_ = nullptr;
  UniqueFd fd_;
  bool worker_opens_claims_ = false;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WIRE_CONTROL_PAGE_H_
