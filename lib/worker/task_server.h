// The worker's side of the protocol, the same whatever carries the frames (a socketpair from a
// fork, or a TCP connection): make the user's worker, run enter(), report ready, then run the
// batches the parent sends, claiming each task before it starts (control_page.h) and sending
// outcomes in pieces, until told to shut down (exit() runs) or until the parent is gone.
//
// A worker never sends a frame the parent would refuse: a result that would make its frame larger
// than max_frame_bytes becomes that task's kResourceExhausted error instead.

#ifndef PROCPOOL_LIB_WORKER_TASK_SERVER_H_
#define PROCPOOL_LIB_WORKER_TASK_SERVER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "capnp/message.h"
#include "lib/wire/control_page.h"
#include "lib/wire/shared_region.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {

// How a worker reads and writes frames. Used from one thread, the one that runs run_worker (the
// task thread), except post().
class WorkerTransport {
 public:
  virtual ~WorkerTransport() = default;
  // From any other thread of the worker (a thread a task started): a frame to go out after
  // those sent so far. The task thread writes what was posted before its own next frame (so a
  // record a task's thread logged reaches the parent before that task's outcome), or at once
  // when it waits for the parent (posting wakes it). Where frames are held in shared memory (a
  // forked worker), it is put there when it fits, so that the parent finds it even if the worker
  // dies right after; else it waits in a queue. Takes a lock around that, never waits for the
  // parent. False, and nothing queued, once the frames queued hold kMaxPostedBytes (the task
  // thread is busy and other threads post faster than that).
  virtual bool post(std::unique_ptr<capnp::MessageBuilder> message) = 0;
  static constexpr size_t kMaxPostedBytes = size_t{8} << 20;
  // The next frame from the parent, borrowed until the next call. kUnavailable when the parent
  // is gone; another error when the stream cannot be read.
  virtual absl::StatusOr<kj::ArrayPtr<const capnp::word>> next_frame() = 0;
  // Sends one frame whole, after any frames held. False when the parent is gone.
  virtual bool send(capnp::MessageBuilder& message) = 0;
  // Output coalescing: keeps a copy of the frame to go out in one write with the next send() or
  // flush(). The default sends it at once.
  virtual bool hold(capnp::MessageBuilder& message) { return send(message); }
  // Sends the frames held, if any. False when the parent is gone.
  virtual bool flush() { return true; }
  // A growing frame: results published one at a time without a frame each (a timed batch's
  // scalar results, task_server.cc). hold_growing() holds `message`, a results piece with room
  // for `room` word results, more than it counts, whose `count` field and first result word lie
  // in its one segment. grow() then writes results [from, from + n) into the held copy and makes
  // it count `count`, in place (results before the count that covers them: the copy is whole
  // whenever the worker stops). grow() is false once the copy cannot grow (the parent took it, it
  // was written, or another frame was held after it): what it counted reaches the parent as it
  // is, and further results need a frame of their own. Without a held-frames area (the default)
  // hold_growing() is false and holds nothing.
  virtual bool hold_growing(capnp::MessageBuilder& /*message*/, const void* /*count_field*/,
                            const uint64_t* /*first_word*/, uint32_t /*room*/) {
    return false;
  }
  virtual bool grow(uint32_t /*count*/, const uint64_t* /*words*/, uint32_t /*from*/,
                    uint32_t /*n*/) {
    return false;
  }
  // When the oldest frame held was held (CLOCK_MONOTONIC ns), or 0 if none is.
  virtual int64_t held_since_ns() const { return 0; }
  // True if next_frame() has a whole frame already and will not wait for one.
  virtual bool frame_buffered() const { return false; }
  // A hint for the next next_frame(): the parent's caller waited for the batch just answered
  // (TaskBatch.awaited), so another may follow within microseconds; the transport may poll for it
  // a little before it sleeps (lib/common/spin.h).
  virtual void expect_next_frame_soon(bool /*soon*/) {}
  // True if the worker may overwrite the frame next_frame() returned, until the next call (it is
  // a buffer of this thread's own): the word path then computes its results in place.
  virtual bool frames_writable() const { return false; }
};

// Runs the worker to its end and returns the exit status to leave with (child_setup.h): OK after
// an orderly shutdown, kWorkerExitEnterFailed, kWorkerExitExitHookFailed, or
// kWorkerExitProtocolError. A parent that is gone ends it with kWorkerExitOk at once, without
// exit(): nobody waits for the hook.
// `region`: where the parent leaves large byte strings of jobs and finds those of results
// (lib/wire/shared_region.h); null where there is none (blobs then travel in frames).
// `refused`: why this worker cannot serve, found before it started (an RLIMIT_AS that leaves it no
// room): if not OK, it is sent as enter()'s failure, without making W, and the worker leaves with
// kWorkerExitEnterFailed.
int run_worker(const WorkerBodyFactory& factory, WorkerTransport& transport, ControlPage& page,
               size_t max_frame_bytes, SharedRegion* region = nullptr,
               const absl::Status& refused = absl::OkStatus());

// procpool::log in a worker (include/procpool/logging.h): sends a `log` frame to the pool on the
// worker's stream (after any results held, so order is kept), stamped with the task the control
// page says runs, `message` cut to 64 KiB (and to what max_frame_bytes allows); from a thread
// other than the task thread, posted (WorkerTransport::post). False when this process is not a
// worker serving tasks (the program itself, or a process a task forked), or the posted records
// are too many: nothing is sent then. Not reentrant within a thread (a record logged while the
// same thread sends one is not sent).
bool send_worker_log(int severity, std::string_view message);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WORKER_TASK_SERVER_H_
