#include "lib/link/fork_link.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include <utility>

#include "absl/strings/str_cat.h"
#include "lib/common/child_process.h"
#include "lib/common/clock.h"

namespace procpool::internal {

ForkLink::ForkLink(std::string name, WorkerProcess process, UniqueFd channel,
                   ControlPageMapping page, Limits limits, std::unique_ptr<SharedRegion> region)
    : name_(std::move(name)),
      process_(std::move(process)),
      channel_(std::move(channel)),
      page_(std::move(page)),
      limits_(limits),
      region_(std::move(region)),
      stream_(limits.max_frame_bytes, limits.frame_timeout) {
  if (channel_) (void)set_nonblocking(channel_.get(), true);
}

ForkLink::~ForkLink() {
  if (on_destroy_) on_destroy_();
}

void ForkLink::send(std::unique_ptr<capnp::MessageBuilder> frame) {
  if (ended_ || !channel_) return;
  writer_.push(std::move(frame));
}

void ForkLink::send_copy(kj::ArrayPtr<const capnp::word> frame) {
  if (ended_ || !channel_) return;
  writer_.push_copy(frame);
  flush();
}

void ForkLink::flush() {
  if (ended_ || !channel_ || writer_.empty()) return;
  // A failure means the worker is gone; its pidfd will tell.
  if (!writer_.write_some(channel_.get()).ok()) writer_.clear();
}

void ForkLink::forward_output(UniqueFd stdout_pipe, UniqueFd stderr_pipe) {
  output_[0] = std::make_unique<OutputLines>(std::move(stdout_pipe));
  output_[1] = std::make_unique<OutputLines>(std::move(stderr_pipe));
}

size_t ForkLink::read_output(size_t stream, LinkEvents& events, bool drain) {
  if (output_[stream] == nullptr || !output_[stream]->open()) return 0;
  const ControlPage& page = *page_.get();
  const OutputLines::LineSink sink = [&events, &page, stream](std::span<const std::string_view> lines) {
    // Called once the bytes are read: the task named now started before they were read.
    const uint64_t batch_seq = page.batch_seq.load(std::memory_order_acquire);
    const OutputPlace place{batch_seq, page.task_index.load(std::memory_order_relaxed)};
    events.on_output(/*is_stderr=*/stream == 1, lines, place);
  };
  if (drain) {
    output_[stream]->drain(sink);
    return 0;
  }
  return output_[stream]->read(sink);
}

void ForkLink::add_pollfds(std::vector<pollfd>& fds, bool with_channel) {
  polled_channel_ = with_channel && channel_ && !broken_ && !ended_;
  // A fork server's worker is not our child: the server reports its exit.
  polled_pidfd_ = !ended_ && !process_.adopted() && process_.pidfd() >= 0;
  if (polled_channel_) {
    fds.push_back({channel_.get(), static_cast<short>(POLLIN | (writer_.empty() ? 0 : POLLOUT)), 0});
  }
  if (polled_pidfd_) fds.push_back({process_.pidfd(), POLLIN, 0});
  const int64_t now = output_[0] != nullptr ? monotonic_now_ns() : 0;
  for (size_t stream = 0; stream < 2; ++stream) {
    polled_output_[stream] = !ended_ && !output_paused_ && output_[stream] != nullptr &&
                             output_[stream]->open() && now >= output_rest_until_ns_[stream];
    if (polled_output_[stream]) fds.push_back({output_[stream]->fd(), POLLIN, 0});
  }
  polled_oom_ = !ended_ && cgroup_ && cgroup_->oom_event_fd() >= 0;
  if (polled_oom_) fds.push_back({cgroup_->oom_event_fd(), POLLIN, 0});
}

void ForkLink::service(const pollfd* polled, size_t count, bool with_channel,
                       LinkEvents& events) {
  size_t next = 0;
  const short channel_revents = polled_channel_ && next < count ? polled[next++].revents : 0;
  const bool pumping = channel_revents != 0 && with_channel;
  const size_t pidfd_at = next;
  if (polled_pidfd_) ++next;
  bool output_ready[2] = {false, false};
  for (size_t stream = 0; stream < 2; ++stream) {
    output_ready[stream] = polled_output_[stream] && next < count && polled[next++].revents != 0;
  }
  if (pumping) pump(channel_revents, events);
  // (A pump that read frames read both pipes first.)
  const bool read_by_pump = pumping && (channel_revents & kChannelReadable) != 0;
  for (size_t stream = 0; stream < 2; ++stream) {
    if (output_ready[stream] && !read_by_pump) read_output_now(stream, events);
  }
  if (polled_oom_ && next < count && polled[next++].revents != 0 && !ended_) {
    // The OOM killer acted in its cgroup (v1): the whole worker goes, as under v2's
    // memory.oom.group, and its end says the cap killed it (end, oom_killed).
    // (It wakes as the cgroup runs out, before the OOM killer picks a victim: that kill may
    // never come, ours being first.)
    cgroup_->clear_oom_event();
    out_of_memory_ = true;
    cgroup_->kill();
  }
  next = pidfd_at;
  if (polled_pidfd_ && next < count && polled[next].revents != 0 && !ended_) {
    on_exited(events);
  } else if (watched_by_looking()) {
    look_for_exit(events);
  }
}

void ForkLink::on_exited(LinkEvents& events) {
  // Gone: what it sent before it died is real, read it all first, then what it held.
  read_channel(events, /*to_the_end=*/true);
  stop_tree_at_end();
  if (std::optional<int> status = process_.try_reap()) {
    recover_held(events);
    end(*status, events);
  }
}

bool ForkLink::watched_by_looking() const {
  return !ended_ && !process_.adopted() && process_.pidfd() < 0;
}

void ForkLink::look_for_exit(LinkEvents& events) {
  const int64_t now = monotonic_now_ns();
  if (now < next_look_ns_) return;
  // Its channel closed: it is exiting, and becomes a zombie within moments. On a grid: every
  // worker's look falls on the same wakeup of the loop.
  const int64_t interval = channel_closed_ ? kChildExitingLookIntervalNs : kChildLookIntervalNs;
  next_look_ns_ = (now / interval + 1) * interval;
  // While its channel is open, one waitid for all the pool's workers on this wakeup says whether
  // any child has exited at all (an idle pool of 256 spent 4 % of a core looking at each every
  // 20 ms). Each is still looked at itself now and then: a child that a program reaping its own
  // children (SIGCHLD ignored, a waitpid(-1)) took is no zombie for that waitid to see, and a
  // dead worker's channel stays open while a process it started holds it.
  if (!channel_closed_ && now < next_own_look_ns_ && !any_child_exited(now)) return;
  next_own_look_ns_ = now + kChildOwnLookIntervalNs;
  if (process_.exited()) on_exited(events);
}

void ForkLink::read_output_now(size_t stream, LinkEvents& events) {
  if (read_output(stream, events, /*drain=*/false) >= kOutputFloodBytes) {
    output_rest_until_ns_[stream] = monotonic_now_ns() + kOutputRestNs;
  }
}

void ForkLink::pump(short revents, LinkEvents& events) {
  if (ended_ || !channel_) return;
  if ((revents & POLLOUT) && !writer_.write_some(channel_.get()).ok()) writer_.clear();
  if (revents & kChannelReadable) {
    // Before frames from the worker are read, its output is (its pipes resting or not): a task
    // writes its lines before it sends its outcome, and read now they are read while the
    // worker's record still names that task, not one the outcome's settling lets it start.
    for (size_t stream = 0; stream < 2; ++stream) {
      if (output_[stream] != nullptr && output_[stream]->open()) read_output_now(stream, events);
    }
    read_channel(events);
  }
}

void ForkLink::read_channel(LinkEvents& events, bool to_the_end) {
  if (!channel_ || broken_ || ended_) return;
  const FrameStream::ReadResult read =
      stream_.read(channel_.get(), to_the_end ? 0 : 16, [&](kj::ArrayPtr<const capnp::word> frame) {
        events.on_frame(frame);
        return !broken_ && !ended_;
      });
  if (read.broken && !broken_) {
    broken_ = true;
    events.on_broken_stream(absl::DataLossError(absl::StrCat(name_, " ", read.why.message())));
  }
  // The worker closed its end: it is exiting; its pidfd reports when it is gone (without one,
  // service() looks at once, and soon again).
  if (read.closed) {
    channel_.reset();
    writer_.clear();
    channel_closed_ = true;
    channel_closed_ns_ = monotonic_now_ns();
    next_look_ns_ = 0;
  }
}

void ForkLink::take_held(LinkEvents& events) {
  HeldFrames* held = page_.held();
  uint32_t expected = HeldFrames::kFree;
  // Never wait for the worker: it holds the lock only to append a frame or write what it holds.
  if (!held->lock.compare_exchange_strong(expected, HeldFrames::kParent,
                                          std::memory_order_acquire)) {
    return;
  }
  // Frames it wrote before holding these are in the channel: they go first, all of them. The
  // channel ends: while we hold the lock the worker cannot take its held frames back to write
  // them and what follows.
  read_channel(events, /*to_the_end=*/true);
  const uint32_t taken = held->taken.load(std::memory_order_relaxed);
  const uint32_t bytes = held->bytes.load(std::memory_order_relaxed);
  const bool valid = held_frames_valid(taken, bytes);
  std::vector<unsigned char> copied;
  if (valid) {
    copied.assign(held->data + taken, held->data + bytes);
    held->taken.store(bytes, std::memory_order_relaxed);
    held->since_ns.store(0, std::memory_order_relaxed);
  }
  held->lock.store(HeldFrames::kFree, std::memory_order_release);
  if (!valid) {
    broken_ = true;
    events.on_broken_stream(
        absl::DataLossError(absl::StrCat(name_, " left its held frames in a bad state")));
    return;
  }
  deliver_held(copied, /*recovered=*/false, events);
}

void ForkLink::recover_held(LinkEvents& events) {
  HeldFrames* held = page_.held();
  if (held == nullptr) return;
  // The worker is dead: the area is ours, whatever the lock says. Nothing in it is trusted.
  const uint32_t taken = held->taken.load(std::memory_order_acquire);
  const uint32_t bytes = held->bytes.load(std::memory_order_acquire);
  if (!held_frames_valid(taken, bytes) || taken == bytes) return;
  const std::vector<unsigned char> copied(held->data + taken, held->data + bytes);
  held->bytes.store(0, std::memory_order_relaxed);
  held->taken.store(0, std::memory_order_relaxed);
  deliver_held(copied, /*recovered=*/true, events);
}

void ForkLink::deliver_held(const std::vector<unsigned char>& bytes, bool recovered,
                            LinkEvents& events) {
  if (bytes.empty()) return;
  // The same checks as frames from the channel: sizes against the buffer and the frame limit.
  FrameReader reader(limits_.max_frame_bytes);
  reader.append(bytes.data(), bytes.size());
  while (!ended_ && (recovered || !broken_)) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader.next();
    if (!frame.ok() || (frame->size() == 0 && reader.has_partial_frame())) {
      if (!recovered) {
        broken_ = true;
        events.on_broken_stream(absl::DataLossError(absl::StrCat(
            name_, " held a bad frame: ",
            frame.ok() ? absl::string_view("truncated") : frame.status().message())));
      }
      return;
    }
    if (frame->size() == 0) return;
    if (recovered) {
      events.on_recovered_frame(*frame);
    } else {
      events.on_frame(*frame);
    }
  }
}

int64_t ForkLink::check(int64_t now_ns, LinkEvents& events) {
  int64_t next = INT64_MAX;
  // Without a pidfd (a kernel before 5.3) nothing wakes the loop when our worker exits: it is
  // looked for here (and in service()), at this time. (A loop that services only the links with
  // a descriptor ready would not call service() for it.)
  if (watched_by_looking()) {
    look_for_exit(events);
    if (watched_by_looking()) next = next_look_ns_;
  }
  for (size_t stream = 0; stream < 2; ++stream) {
    // A pipe resting after a read (add_pollfds) is looked at again when its rest ends.
    if (output_[stream] != nullptr && output_[stream]->open() &&
        output_rest_until_ns_[stream] > now_ns) {
      next = std::min(next, output_rest_until_ns_[stream]);
    }
  }
  if (!ended_ && !broken_ && channel_) {
    // Results held by a worker now busy in a long task would wait for the task: take them.
    const HeldFrames* held = page_.held();
    // Written by the worker: clamped, so that no value it writes overflows the sums below or
    // makes a deadline that has always passed.
    const int64_t since =
        std::clamp<int64_t>(held->since_ns.load(std::memory_order_relaxed), 0, now_ns);
    if (held->bytes.load(std::memory_order_relaxed) != held->taken.load(std::memory_order_relaxed) &&
        since != 0) {
      if (now_ns - since >= kTakeHeldAfterNs) {
        take_held(events);
      } else {
        next = since + kTakeHeldAfterNs;
      }
    }
    if (page_->running.load(std::memory_order_relaxed) != 0) {
      next = std::min(next, now_ns + kHeldCheckIntervalNs);
    }
  }
  if (broken_ || ended_) return next;
  // A worker's channel closes as it exits, moments before it is gone. One still there after
  // frame_timeout lives on without it (a task exec'd another program: the channel is
  // close-on-exec; or closed fd 3) and can never report: its stream is broken, and it is stopped.
  if (channel_closed_) {
    const int64_t due = channel_closed_ns_ + to_ns(limits_.frame_timeout);
    if (now_ns < due) return std::min(next, due);
    broken_ = true;
    events.on_broken_stream(absl::DataLossError(
        absl::StrCat(name_, " closed its channel but had not exited ",
                     absl::FormatDuration(limits_.frame_timeout),
                     " later (frame_timeout): did a task exec another program or close fd 3?")));
    return INT64_MAX;
  }
  const absl::Status late = stream_.check(now_ns, next);
  if (late.ok()) return next;
  broken_ = true;
  events.on_broken_stream(absl::DataLossError(absl::StrCat(name_, " ", late.message())));
  return INT64_MAX;
}

WorkerProgress ForkLink::progress() const {
  const ControlPage& page = *page_.get();
  WorkerProgress progress;
  progress.running = page.running.load(std::memory_order_acquire) != 0;
  progress.batch_seq = page.batch_seq.load(std::memory_order_relaxed);
  progress.task_index = page.task_index.load(std::memory_order_relaxed);
  progress.started_ns = page.started_ns.load(std::memory_order_relaxed);
  progress.tasks_done = page.tasks_done.load(std::memory_order_relaxed);
  progress.busy_ns = page.busy_ns.load(std::memory_order_relaxed);
  progress.timeout_ns = page.timeout_ns.load(std::memory_order_relaxed);
  // The worker's own words, which a task may have overwritten: times within [0, 2^61] ns (73
  // years), so that the sums and differences its readers make of them (a start plus a timeout,
  // now less a start) cannot overflow. Whether they are plausible is the readers' to judge.
  constexpr int64_t kFar = int64_t{1} << 61;
  progress.started_ns = std::clamp<int64_t>(progress.started_ns, 0, kFar);
  progress.timeout_ns = std::clamp<int64_t>(progress.timeout_ns, 0, kFar);
  progress.busy_ns = std::clamp<int64_t>(progress.busy_ns, 0, kFar);
  progress.tasks_done = std::max<int64_t>(progress.tasks_done, 0);
  return progress;
}

std::string ForkLink::host() const {
  // Asked once: a host's name does not change under a running pool, as far as it needs to know.
  static const std::string name = [] {
    char buffer[256] = {};
    if (::gethostname(buffer, sizeof(buffer) - 1) != 0) return std::string("localhost");
    return std::string(buffer);
  }();
  return name;
}

size_t ForkLink::resident_bytes() const {
  // RssAnon + RssFile: its own memory, not the shared memory it maps (RssShmem: its blob region,
  // its control page), which it reads and writes for the pool and which is not its to shed.
  std::FILE* status = std::fopen(absl::StrCat("/proc/", process_.pid(), "/status").c_str(), "re");
  if (status == nullptr) return 0;
  size_t kib = 0;
  char line[256];
  while (std::fgets(line, sizeof(line), status) != nullptr) {
    unsigned long value = 0;
    if (std::sscanf(line, "RssAnon: %lu kB", &value) == 1 ||
        std::sscanf(line, "RssFile: %lu kB", &value) == 1) {
      kib += value;
    }
  }
  std::fclose(status);
  return kib << 10;
}

void ForkLink::open_claims(uint32_t slot, uint16_t tag, uint32_t count) {
  internal::open_claims(*page_.get(), slot, tag, count);
}

void ForkLink::revoke(uint32_t slot, uint16_t tag, LinkEvents& events) {
  events.on_revoked(slot, tag,
                    revoke_claims(*page_.get(), slot, tag, page_.worker_opens_claims()));
}

void ForkLink::request_stop(uint64_t seq, uint32_t from, uint32_t to) {
  internal::request_stop(*page_.get(), seq, from, to);
}

void ForkLink::stop(StopMode mode) {
  // Everything the worker started goes with it. Its cgroup holds all of it, even what left its
  // tree, and is killed at its end (or now, for a kill); without one, its descendants are found
  // while it lives (it is their subreaper) and killed before it is.
  const int signal = mode == StopMode::kKill ? SIGKILL : SIGTERM;
  if (cgroup_ && cgroup_->stops_tree()) {
    if (mode == StopMode::kKill) cgroup_->kill();
    process_.kill(signal);
  } else {
    process_.kill_tree(signal);
  }
}

void ForkLink::stop_tree_at_end() {
  if (cgroup_) cgroup_->kill();
  // Its process group: what its tasks started and that is not in a cgroup (kOff, or no
  // cgroup here) nor below it any more (it died: its orphans went to init).
  process_.kill_group(SIGKILL);
}

void ForkLink::on_reaped_by_server(int wait_status, LinkEvents& events) {
  if (ended_) return;
  read_channel(events, /*to_the_end=*/true);
  recover_held(events);
  // Reaped already by the server: its group's number may be another's now; its cgroup is ours.
  if (cgroup_) cgroup_->kill();
  process_.mark_reaped();
  end(wait_status, events);
}

void ForkLink::end(int wait_status, LinkEvents& events) {
  // Whatever it wrote before it died is in its pipes: all of it comes before its end.
  for (size_t stream = 0; stream < 2; ++stream) read_output(stream, events, /*drain=*/true);
  ended_ = true;
  channel_.reset();
  writer_.clear();
  WorkerEnd end{describe_exit(wait_status, page_.get()), clean_exit(wait_status, page_.get())};
  // The kernel's OOM killer sends SIGKILL: the cgroup's count says it was the cap, not a kill
  // of someone else's.
  const bool killed = wait_status == WorkerProcess::kNoWaitStatus ||
                      (WIFSIGNALED(wait_status) && WTERMSIG(wait_status) == SIGKILL);
  if (killed && cgroup_ && (out_of_memory_ || cgroup_->oom_killed())) {
    // (On v1 the killer takes one process, often a child of the task, and the pool the worker.)
    end.cause = absl::ResourceExhaustedError(absl::StrCat(
        name_,
        out_of_memory_ ? " was stopped: the kernel's OOM killer acted in its cgroup, whose memory"
                       : " was killed by the kernel's OOM killer: its memory",
        " reached max_worker_memory_bytes (", cgroup_->memory_bytes(), " bytes, its ",
        cgroup_->cap_name(), ")"));
  }
  // A stack in its page counts only after a death by a signal whose handler writes one: killed
  // by it, or (a program's own handler, chained after ours, that _exits) exited with the page
  // naming it.
  const int signal = WIFSIGNALED(wait_status) && wait_status != WorkerProcess::kNoWaitStatus
                         ? WTERMSIG(wait_status)
                         : page_.get()->fatal_signal.load(std::memory_order_relaxed);
  if (is_crash_signal(signal)) end.crash_stack = crash_stack_text(*page_.get());
  events.on_ended(std::move(end));
}

}  // namespace procpool::internal
