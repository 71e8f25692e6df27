// ForkLink: the WorkerLink of a forked worker process (worker_link.h).
//
// Frames go over a socketpair, non-blocking on this side. The worker's exit is seen on a pidfd
// (or, for a worker forked by the fork server, reported by the server; on a kernel without
// pidfds, by service() looking: lib/common/child_process.h); its progress and claims live in a
// control page shared with it (control_page.h); it is stopped with signals sent through the pidfd
// (without one, by pid while it is unreaped, or by its fork server). A frame the worker begins must complete within frame_timeout, or the stream is
// reported broken: a worker cannot wedge the pool by writing half a frame.

#ifndef PROCPOOL_LIB_LINK_FORK_LINK_H_
#define PROCPOOL_LIB_LINK_FORK_LINK_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "lib/common/cgroup.h"
#include "lib/common/unique_fd.h"
#include "lib/link/worker_link.h"
#include "lib/link/worker_process.h"
#include "lib/wire/control_page.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/frame_stream.h"
#include "lib/wire/output_lines.h"

namespace procpool::internal {

// Frames a worker has held back longer than this are taken by the pool from shared memory (the
// worker is busy with a long task); a worker that runs a task is looked at this often for them.
inline constexpr int64_t kTakeHeldAfterNs = 2'000'000;
inline constexpr int64_t kHeldCheckIntervalNs = 10'000'000;

// The send buffer each end of a worker's socketpair asks for (the kernel doubles it, up to
// net.core.wmem_max; 4 MiB on Debian): a batch of 1 MiB of jobs, or a piece of results, crosses
// in one write instead of five rounds through the default 208 KiB. Kernel memory is used only by
// what is in flight.
inline constexpr int kChannelSendBufferBytes = 2 << 20;

// Forwarded output: after a read of at least kOutputFloodBytes from a worker's pipe, the link
// leaves it kOutputRestNs before it looks again. A line printed now and then arrives at once; a
// flood is read in batches, one wake of the pool's thread per millisecond and pipe rather than
// one per line (the pipe, up to 1 MiB, holds what comes meanwhile; a worker that fills it waits).
// Reads smaller than a flood leave the pipe watched: each line is read as it comes, while the
// worker's record still names the task that wrote it (OutputPlace).
inline constexpr int64_t kOutputRestNs = 1'000'000;
// The poll events on which pump() reads the channel (and the output pipes before it).
inline constexpr short kChannelReadable = POLLIN | POLLHUP | POLLERR;
inline constexpr size_t kOutputFloodBytes = 4096;

class ForkLink final : public WorkerLink {
 public:
  struct Limits {
    size_t max_frame_bytes = 0;
    absl::Duration frame_timeout = absl::Seconds(10);
  };
  // `channel` is the parent's end (made non-blocking here).
  ForkLink(std::string name, WorkerProcess process, UniqueFd channel, ControlPageMapping page,
           Limits limits, std::unique_ptr<SharedRegion> region = nullptr);
  ~ForkLink() override;

  const std::string& name() const override { return name_; }
  int pid() const override { return process_.pid(); }
  void send(std::unique_ptr<capnp::MessageBuilder> frame) override;
  void flush() override;
  bool has_unsent() const override { return !writer_.empty(); }
  bool can_borrow() const override { return true; }
  void release_borrowed(const void* borrower) override { writer_.release_borrowed(borrower); }
  SharedRegion* shared_region() override { return region_.get(); }
  void add_pollfds(std::vector<pollfd>& fds, bool with_channel) override;
  void service(const pollfd* polled, size_t count, bool with_channel,
               LinkEvents& events) override;
  int64_t check(int64_t now_ns, LinkEvents& events) override;
  int channel_fd() const override { return channel_.get(); }
  void pump(short revents, LinkEvents& events) override;
  WorkerProgress progress() const override;
  size_t resident_bytes() const override;
  std::string host() const override;
  void open_claims(uint32_t slot, uint16_t tag, uint32_t count) override;
  void revoke(uint32_t slot, uint16_t tag, LinkEvents& events) override;
  void request_stop(uint64_t seq, uint32_t from, uint32_t to) override;
  void stop(StopMode mode) override;

  // Queues a copy of a whole frame read elsewhere (a relay passing the pool's frames on).
  void send_copy(kj::ArrayPtr<const capnp::word> frame);
  // For a worker forked by the fork server: the server reaped it with `wait_status`.
  void on_reaped_by_server(int wait_status, LinkEvents& events);
  // The worker's cgroups (lib/common/cgroup.h): its tree is stopped through them, and they are
  // removed with the link, after the worker was reaped.
  void set_cgroup(WorkerCgroup cgroup) { cgroup_ = std::move(cgroup); }
  // Called when the link is destroyed (the fork server's launcher forgets the pid).
  void on_destroy(std::function<void()> callback) { on_destroy_ = std::move(callback); }
  // Forwarded output: the read ends of the pipes the worker's stdout and stderr are. Their lines
  // go to LinkEvents::on_output as they come, and the rest when the worker ends, before on_ended.
  void forward_output(UniqueFd stdout_pipe, UniqueFd stderr_pipe);
  // While paused, add_pollfds leaves the output pipes out: whoever takes the lines is behind, and
  // the worker blocks when its pipe fills (back-pressure). Its end still drains them.
  void pause_output(bool paused) { output_paused_ = paused; }

 private:
  // Reads and delivers what the channel holds: at most 16 reads (a flood from one worker must not
  // starve the others), or, `to_the_end`, until it is empty — before held frames are delivered,
  // which come after everything the worker wrote into the channel.
  void read_channel(LinkEvents& events, bool to_the_end = false);
  // Held frames (control_page.h): takes those a live worker has held for long (after reading the
  // channel, so order is kept), or recovers those of a dead one.
  void take_held(LinkEvents& events);
  void recover_held(LinkEvents& events);
  // `bytes`: a copy of held frames, taken while the area was ours (the worker may reuse it).
  void deliver_held(const std::vector<unsigned char>& bytes, bool recovered, LinkEvents& events);
  void end(int wait_status, LinkEvents& events);
  // Our worker has exited: reads what it sent, reaps it, recovers what it held, ends.
  void on_exited(LinkEvents& events);
  // Without a pidfd (lib/common/child_process.h) its exit is looked for, from service(): whether
  // it has exited, at most every kChildLookIntervalNs (check() says when the next look is due).
  bool watched_by_looking() const;
  void look_for_exit(LinkEvents& events);
  // The worker has exited and is not reaped yet: what it started goes too.
  void stop_tree_at_end();
  // Reads the output pipes (`drain`: everything, the worker is gone).
  // Returns how many bytes it read.
  size_t read_output(size_t stream, LinkEvents& events, bool drain);
  // Reads what the pipe holds now; after a flood (kOutputFloodBytes), leaves it resting.
  void read_output_now(size_t stream, LinkEvents& events);

  const std::string name_;
  WorkerProcess process_;
  UniqueFd channel_;
  ControlPageMapping page_;
  const Limits limits_;
  std::unique_ptr<SharedRegion> region_;  // unmapped and closed with the link
  FrameWriter writer_;
  FrameStream stream_;  // the channel's frames, with its partial-frame clock
  bool broken_ = false;           // the stream was reported broken: read no more of it
  bool ended_ = false;
  bool polled_channel_ = false;   // what add_pollfds added, for service()
  bool polled_pidfd_ = false;
  bool channel_closed_ = false;   // the worker closed its end of the channel
  int64_t channel_closed_ns_ = 0;  // when we saw that (check() gives it frame_timeout to exit)
  int64_t next_look_ns_ = 0;      // without a pidfd: when to look for the worker's exit again
  int64_t next_own_look_ns_ = 0;  // ... at it alone, whatever any_child_exited() says (look_for_exit)
  std::unique_ptr<OutputLines> output_[2];  // stdout, stderr; null unless forwarded
  bool polled_output_[2] = {false, false};
  bool polled_oom_ = false;  // its cgroup's OOM watch (WorkerCgroup::oom_event_fd)
  bool out_of_memory_ = false;  // that watch woke: the pool killed it for the cap
  int64_t output_rest_until_ns_[2] = {0, 0};
  bool output_paused_ = false;
  std::function<void()> on_destroy_;
  std::optional<WorkerCgroup> cgroup_;  // last: removed first, the worker being reaped
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_FORK_LINK_H_
