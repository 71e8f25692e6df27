#include "lib/worker/worker_main.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <sched.h>
#include <time.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

#include "capnp/serialize.h"

#include "lib/common/cgroup.h"
#include "lib/common/clock.h"
#include "lib/common/mutex.h"
#include "lib/common/process_tree.h"
#include "lib/common/spin.h"
#include "lib/wire/frame_io.h"
#include "lib/worker/child_setup.h"
#include "lib/worker/task_context.h"
#include "lib/worker/task_server.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {
namespace {

// Frames over the inherited socketpair (or a remote worker's TCP connection): blocking reads and
// writes, nothing else to wait for. Frames held for one write wait in the shared held-frames area
// (control_page.h), where the parent finds them if this worker dies, or takes them if they wait
// long; without that area (`held` null) every frame is written at once.
class ChannelTransport final : public WorkerTransport {
 public:
  ChannelTransport(int fd, size_t max_frame_bytes, HeldFrames* held, TlsChannel* tls,
                   bool flush_stdout, bool await_output_read)
      : fd_(fd), stream_(fd), reader_(max_frame_bytes, /*huge_buffers=*/true), held_(held),
        flush_stdout_(flush_stdout) {
    if (tls != nullptr) stream_ = ByteStream(*tls);
    if (await_output_read) {
      // Now, before any code of the user's runs: 1 and 2 are the pipes its relay reads.
      for (int stream = 0; stream < 2; ++stream) {
        struct stat pipe {};
        if (::fstat(stream + 1, &pipe) == 0 && S_ISFIFO(pipe.st_mode)) {
          output_pipes_[stream] = {stream + 1, pipe.st_dev, pipe.st_ino};
        }
      }
    }
    // Made now, before any code of the user's runs (which may have closed 0-2 by then).
    absl::StatusOr<UniqueFd> wake = make_event_fd();
    if (wake.ok()) posted_wake_ = *std::move(wake);
    struct stat made {};
    if (posted_wake_ && ::fstat(posted_wake_.get(), &made) == 0) {
      wake_device_ = made.st_dev;
      wake_inode_ = made.st_ino;
    }
  }
  ~ChannelTransport() override {
    // Its number may be a descriptor of the user's by now: never closed from here.
    if (wake_lost_.load(std::memory_order_relaxed)) (void)posted_wake_.release();
  }

  bool post(std::unique_ptr<capnp::MessageBuilder> message) override {
    const size_t size = capnp::computeSerializedSizeInWords(*message) * sizeof(capnp::word);
    {
      MutexLock lock(posted_mu_);
      // Among the frames held, where the parent finds it even if this worker dies next (a thread
      // that logs, then crashes it), unless frames posted before it wait (they go first) or it
      // does not fit. The task thread is woken all the same, to write them out.
      if (!posted_.empty() || !hold_posted(*message, size)) {
        if (posted_bytes_ + size > kMaxPostedBytes) return false;
        posted_bytes_ += size;
        posted_.push_back(std::move(message));
      }
      // Only the first frame of a batch wakes the task thread: one write for many records.
      if (any_posted_.exchange(true, std::memory_order_release)) return true;
    }
    const uint64_t one = 1;
    if (posted_wake_ && !wake_lost_.load(std::memory_order_relaxed)) {
      (void)!::write(posted_wake_.get(), &one, sizeof(one));
    }
    return true;
  }

  absl::StatusOr<kj::ArrayPtr<const capnp::word>> next_frame() override {
    reap_children_if_due(/*waiting=*/false);
    if (spin_next_ && !reader_.has_complete_frame() && spin_.budget_ns() > 0) {
      // The next batch usually follows within microseconds (spin.h).
      const int64_t until = monotonic_now_ns() + spin_.budget_ns();
      do {
        absl::StatusOr<FrameReader::Fill> filled = reader_.fill(stream_, /*dont_wait=*/true);
        if (!filled.ok()) return filled.status();
        if (*filled == FrameReader::Fill::kEndOfFile) {
          return absl::UnavailableError("the peer closed the channel");
        }
        if (*filled == FrameReader::Fill::kWouldBlock) SpinPolicy::relax();
      } while (!reader_.has_complete_frame() && monotonic_now_ns() < until);
      spin_.spun(reader_.has_complete_frame());
    }
    while (!reader_.has_complete_frame()) {
      // Wait in poll() for input only, never in read(): a reader blocked in read() is woken each
      // time the parent consumes what this worker sent (the kernel signals write space on the
      // same wait queue), a context switch for nothing per result frame. poll() filters those.
      // Frames other threads post while this one waits wake it (post()).
      const bool wake = posted_wake_ && !wake_lost_.load(std::memory_order_relaxed);
      pollfd readable[2] = {{fd_, POLLIN, 0}, {posted_wake_.get(), POLLIN, 0}};
      // Only waits for a batch that may come soon count towards spinning (and none ask the
      // kernel how many CPUs there are before one does).
      const bool timed = spin_next_ && spin_.enabled();
      const int64_t waiting_since = timed ? monotonic_now_ns() : 0;
      // Over TLS, what the session holds already poll() does not see: take it first.
      const bool in_hand = stream_.tls != nullptr && stream_.tls->buffered();
      if (!in_hand) {
        if (!any_posted_.load(std::memory_order_acquire)) {
          // While it has children, an idle worker still reaps those that exit now and then.
          const int timeout_ms = reap_children_if_due(/*waiting=*/true) ? kIdleReapMs : -1;
          const int polled = ::poll(readable, wake ? 2 : 1, timeout_ms);
          if (polled < 0 && errno != EINTR) {
            return absl::ErrnoToStatus(errno, "waiting for the parent");
          }
          // (A wake-up may be for frames sent already, with this thread's own.)
          if (polled > 0 && wake && readable[1].revents != 0) {
            if (wake_still_ours()) {
              uint64_t count = 0;
              (void)!::read(posted_wake_.get(), &count, sizeof(count));
            } else {
              // User code closed it (or closed it and opened something else there): polled
              // again, it would be ready at once, every time, and the idle worker would spin.
              // Frames other threads post now go with the task thread's next frame.
              wake_lost_.store(true, std::memory_order_relaxed);
            }
          }
        }
        if (any_posted_.load(std::memory_order_acquire) && !flush()) {
          return absl::UnavailableError("the peer closed the channel");
        }
        // Nothing to read yet: the read below would block, deaf to what is posted meanwhile.
        if (readable[0].revents == 0) continue;
      }
      if (timed) spin_.blocked(monotonic_now_ns() - waiting_since);
      absl::StatusOr<FrameReader::Fill> filled = reader_.fill(stream_);
      if (!filled.ok()) return filled.status();
      if (*filled == FrameReader::Fill::kEndOfFile) {
        return absl::UnavailableError("the peer closed the channel");
      }
    }
    return reader_.next();
  }

  bool send(capnp::MessageBuilder& message) override {
    sent_since_reap_ = true;
    flush_stdout();
    await_output_read();
    return send_posted() && send_now(message);
  }

  bool hold(capnp::MessageBuilder& message) override {
    return send_posted() && hold_now(message);
  }

  bool hold_growing(capnp::MessageBuilder& message, const void* count_field,
                    const uint64_t* first_word, uint32_t room) override {
    if (held_ == nullptr) return false;
    if (!send_posted()) return false;
    auto segments = message.getSegmentsForOutput();
    const size_t size = capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word);
    if (segments.size() != 1 || size > HeldFrames::capacity()) return false;
    const auto* begin = reinterpret_cast<const unsigned char*>(segments[0].begin());
    const auto* end = reinterpret_cast<const unsigned char*>(segments[0].end());
    const auto* count_at = static_cast<const unsigned char*>(count_field);
    const auto* words_at = reinterpret_cast<const unsigned char*>(first_word);
    const size_t room_bytes = size_t{room} * sizeof(uint64_t);
    if (count_at < begin || count_at + sizeof(uint32_t) > end || words_at < begin ||
        words_at > end || room_bytes > static_cast<size_t>(end - words_at)) {
      return false;
    }
    lock();
    std::optional<uint32_t> at = append_locked(message, size);
    if (at) {
      // The one segment follows a table of two entries (one word).
      const uint32_t segment_at = *at + sizeof(capnp::word);
      growing_ = Growing{.frame_at = *at,
                         .frame_end = *at + static_cast<uint32_t>(size),
                         .count_at = segment_at + static_cast<uint32_t>(count_at - begin),
                         .words_at = segment_at + static_cast<uint32_t>(words_at - begin),
                         .words_end = segment_at + static_cast<uint32_t>(words_at - begin) +
                                      static_cast<uint32_t>(room_bytes)};
    }
    unlock();
    return at.has_value();
  }

  bool grow(uint32_t count, const uint64_t* words, uint32_t from, uint32_t n) override {
    // A frame posted meanwhile goes before these results: they take a frame of their own.
    if (!growing_ || any_posted_.load(std::memory_order_relaxed)) return false;
    lock();
    const bool intact = held_->taken.load(std::memory_order_relaxed) <= growing_->frame_at &&
                        held_->bytes.load(std::memory_order_relaxed) == growing_->frame_end &&
                        growing_->words_at + (size_t{from} + n) * sizeof(uint64_t) <=
                            growing_->words_end;
    if (intact) {
      std::memcpy(held_->data + growing_->words_at + size_t{from} * sizeof(uint64_t), words,
                  size_t{n} * sizeof(uint64_t));
      // Little-endian, as Cap'n Proto lays out a UInt32 field.
      std::memcpy(held_->data + growing_->count_at, &count, sizeof(count));
    } else {
      growing_.reset();
    }
    unlock();
    return intact;
  }

  bool flush() override {
    sent_since_reap_ = true;
    flush_stdout();  // called before the worker waits for the parent, too
    await_output_read();
    if (!send_posted()) return false;
    if (held_ == nullptr || held_->bytes.load(std::memory_order_relaxed) == 0) return true;
    return write_held(nullptr);
  }

  int64_t held_since_ns() const override {
    return held_ == nullptr || held_->bytes.load(std::memory_order_relaxed) == 0
               ? 0
               : held_->since_ns.load(std::memory_order_relaxed);
  }
  bool frame_buffered() const override { return reader_.has_complete_frame(); }
  void expect_next_frame_soon(bool soon) override { spin_next_ = soon; }
  // The reader's buffer is ours alone.
  bool frames_writable() const override { return true; }

 private:
  // Whether the wake-up descriptor's number still names the eventfd made for it.
  bool wake_still_ours() const {
    struct stat now {};
    return ::fstat(posted_wake_.get(), &now) == 0 && now.st_dev == wake_device_ &&
           now.st_ino == wake_inode_;
  }

  bool send_now(capnp::MessageBuilder& message) {
    if (held_ == nullptr) return write_frame(stream_, message).ok();
    return write_held(&message);
  }

  bool hold_now(capnp::MessageBuilder& message) {
    if (held_ == nullptr) return send_now(message);
    const size_t size = capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word);
    if (size > HeldFrames::capacity()) return send_now(message);
    lock();
    const bool held = append_locked(message, size).has_value();
    unlock();
    return held;
  }

  // What other threads posted, in the order posted, ahead of this thread's next frame: held
  // with the frames held (written with them), or written. One relaxed load when there is none.
  bool send_posted() {
    if (!any_posted_.load(std::memory_order_acquire)) return true;
    std::vector<std::unique_ptr<capnp::MessageBuilder>> posted;
    {
      MutexLock lock(posted_mu_);
      posted.swap(posted_);
      posted_bytes_ = 0;
      any_posted_.store(false, std::memory_order_relaxed);
    }
    for (const std::unique_ptr<capnp::MessageBuilder>& message : posted) {
      if (!hold_now(*message)) return false;
    }
    return true;
  }

  // Forwarded output (PoolOptions::worker_output): stdout is a pipe, so stdio buffers it whole
  // (a write per line would cost a tiny task several times its run). What a task printed goes
  // out with its results, and before the worker waits for more work: lines of a task reach the
  // pool no later than its outcome is sent. (stderr is unbuffered.)
  void flush_stdout() {
    if (flush_stdout_) std::fflush(stdout);
  }

  // The worker's exited children are reaped (reap_exited_children: orphans its tasks left, which
  // come to it as their subreaper) before it waits for work after tasks ran (a frame went out
  // since), and every kReapIntervalNs while it is busy: a waitpid() that finds none costs well
  // under a microsecond. Returns whether children were left (living).
  bool reap_children_if_due(bool waiting) {
    const int64_t now = monotonic_now_ns();
    if ((waiting && sent_since_reap_) || now - last_reap_ns_ >= kReapIntervalNs) {
      children_left_ = reap_exited_children();
      last_reap_ns_ = now;
      sent_since_reap_ = false;
    }
    return children_left_;
  }

  // A remote worker's output is read by its relay, its frames by the pool: unless the relay reads
  // the lines of a task before the pool has its outcome, the pool may start the next task first,
  // and the relay then reads them while the record names that one. So before a frame goes out,
  // each pipe that holds output is given up to kAwaitOutputReadNs to be emptied: one ioctl a pipe
  // when it is empty (as after tasks that print nothing). A flood is not waited for (it is read
  // in batches, its lines placed by the record then), nor a relay that does not read.
  void await_output_read() {
    for (const OutputPipe& pipe : output_pipes_) {
      if (pipe.fd < 0) continue;
      int pending = 0;
      if (::ioctl(pipe.fd, FIONREAD, &pending) != 0 || pending <= 0) continue;
      // Still the pipe it was (the user's code may have put something else on 1 or 2)?
      struct stat now {};
      if (pending > kAwaitOutputMaxBytes || ::fstat(pipe.fd, &now) != 0 ||
          now.st_dev != pipe.device || now.st_ino != pipe.inode) {
        continue;
      }
      // The relay usually reads within microseconds: a few yields, then short sleeps, so that a
      // relay that is slow to run costs this worker no CPU while it waits.
      const int64_t until = monotonic_now_ns() + kAwaitOutputReadNs;
      for (int round = 0; ::ioctl(pipe.fd, FIONREAD, &pending) == 0 && pending > 0 &&
                          monotonic_now_ns() < until;
           ++round) {
        if (round < 16) {
          ::sched_yield();
        } else {
          const timespec pause{0, 50'000};
          ::nanosleep(&pause, nullptr);
        }
      }
    }
  }

  // The parent takes the lock only briefly and never waits for it.
  void lock() {
    uint32_t expected = HeldFrames::kFree;
    while (!held_->lock.compare_exchange_weak(expected, HeldFrames::kWorker,
                                             std::memory_order_acquire)) {
      expected = HeldFrames::kFree;
      ::sched_yield();
    }
  }
  void unlock() { held_->lock.store(HeldFrames::kFree, std::memory_order_release); }

  // Appends `message` (`size` bytes serialized) to the frames held, writing those first if it
  // does not fit; returns where it begins in the area, or nothing when the parent is gone. Called
  // and returns with the lock held.
  std::optional<uint32_t> append_locked(capnp::MessageBuilder& message, size_t size) {
    growing_.reset();  // a frame held after it: the growing frame can grow no more
    uint32_t bytes = held_->bytes.load(std::memory_order_relaxed);
    if (bytes + size > HeldFrames::capacity()) {
      unlock();
      const bool flushed = flush();
      lock();
      if (!flushed) return std::nullopt;
      bytes = held_->bytes.load(std::memory_order_relaxed);
    }
    put_locked(message, bytes, size);
    return bytes;
  }

  // From a thread other than the task thread (post): appends `message` to the frames held if it
  // fits as they are (it cannot write them out). Leaves growing_ (the task thread's) alone: grow()
  // sees that the area changed.
  // Only if the area is free now: the task thread may hold it while it writes to the parent.
  bool hold_posted(capnp::MessageBuilder& message, size_t size) {
    if (held_ == nullptr || size > HeldFrames::capacity()) return false;
    uint32_t expected = HeldFrames::kFree;
    if (!held_->lock.compare_exchange_strong(expected, HeldFrames::kWorker,
                                             std::memory_order_acquire)) {
      return false;
    }
    const uint32_t bytes = held_->bytes.load(std::memory_order_relaxed);
    const bool fits = bytes + size <= HeldFrames::capacity();
    if (fits) put_locked(message, bytes, size);
    unlock();
    return fits;
  }

  // Writes `message` (`size` bytes) into the area at `bytes`, its end, and makes it count there.
  void put_locked(capnp::MessageBuilder& message, uint32_t bytes, size_t size) {
    if (bytes == held_->taken.load(std::memory_order_relaxed)) {
      held_->since_ns.store(monotonic_now_ns(), std::memory_order_relaxed);
    }
    unsigned char* at = held_->data + bytes;
    auto segments = message.getSegmentsForOutput();
    // The segment table: count - 1, each size, padded to a whole word.
    const size_t table_entries = (segments.size() + 2) & ~size_t{1};
    auto* table = reinterpret_cast<uint32_t*>(at);
    table[0] = static_cast<uint32_t>(segments.size() - 1);
    for (size_t i = 0; i < segments.size(); ++i) table[i + 1] = segments[i].size();
    if (table_entries > segments.size() + 1) table[table_entries - 1] = 0;
    at += table_entries * sizeof(uint32_t);
    for (auto segment : segments) {
      std::memcpy(at, segment.begin(), segment.size() * sizeof(capnp::word));
      at += segment.size() * sizeof(capnp::word);
    }
    held_->bytes.store(bytes + static_cast<uint32_t>(size), std::memory_order_release);
  }

  // Writes the frames held that the parent has not taken, then `message` if any, in one write,
  // and empties the area: all under the lock, so the parent never takes a frame written here.
  bool write_held(capnp::MessageBuilder* message) {
    lock();
    const uint32_t taken = held_->taken.load(std::memory_order_relaxed);
    const uint32_t bytes = held_->bytes.load(std::memory_order_relaxed);
    const kj::ArrayPtr<const kj::byte> prefix(held_->data + taken, bytes - taken);
    bool sent = true;
    if (message != nullptr) {
      sent = write_frame(fd_, *message, prefix).ok();
    } else {
      for (size_t at = 0; sent && at < prefix.size();) {
        const ssize_t put = ::send(fd_, prefix.begin() + at, prefix.size() - at, MSG_NOSIGNAL);
        if (put > 0) {
          at += static_cast<size_t>(put);
        } else if (put < 0 && errno != EINTR) {
          sent = false;
        }
      }
    }
    held_->since_ns.store(0, std::memory_order_relaxed);
    held_->taken.store(0, std::memory_order_relaxed);
    held_->bytes.store(0, std::memory_order_release);
    growing_.reset();  // written: it can grow no more
    unlock();
    return sent;
  }

  int fd_;
  ByteStream stream_;  // fd_, or the TLS session over it (a remote worker: never holds frames)
  FrameReader reader_;
  HeldFrames* held_;  // null: nothing is held
  // The growing frame held last (hold_growing), by offsets into the area.
  struct Growing {
    uint32_t frame_at;   // its segment table
    uint32_t frame_end;
    uint32_t count_at;   // its ResultBatch.count
    uint32_t words_at;   // its first word result
    uint32_t words_end;  // the end of its room for word results
  };
  std::optional<Growing> growing_;
  SpinPolicy spin_;
  bool spin_next_ = false;  // the parent's caller waited for the last batch (TaskBatch.awaited)
  const bool flush_stdout_;  // stdout is forwarded: what a task printed goes with its frames
  // The pipes 1 and 2 were when the worker started, where its relay reads them
  // (await_output_read); fd -1: none.
  struct OutputPipe {
    int fd = -1;
    dev_t device = 0;
    ino_t inode = 0;
  };
  OutputPipe output_pipes_[2];
  // reap_children_if_due.
  static constexpr int64_t kReapIntervalNs = 10'000'000;
  static constexpr int kIdleReapMs = 100;
  int64_t last_reap_ns_ = 0;
  bool sent_since_reap_ = false;
  bool children_left_ = false;
  static constexpr int kAwaitOutputMaxBytes = 64 << 10;
  static constexpr int64_t kAwaitOutputReadNs = 2'000'000;
  // Frames other threads posted (post()), not yet sent.
  Mutex posted_mu_;
  std::vector<std::unique_ptr<capnp::MessageBuilder>> posted_ ABSL_GUARDED_BY(posted_mu_);
  size_t posted_bytes_ ABSL_GUARDED_BY(posted_mu_) = 0;
  std::atomic<bool> any_posted_{false};  // posted_ is not empty; set under posted_mu_
  UniqueFd posted_wake_;                 // an eventfd: written when posted_ stops being empty
  dev_t wake_device_ = 0;                // what fstat() said of it when it was made
  ino_t wake_inode_ = 0;
  std::atomic<bool> wake_lost_{false};   // user code closed posted_wake_'s number
};

}  // namespace

std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  return cpus;
}

int spread_cpu(const std::vector<int>& cpus, int slot) {
  if (cpus.empty() || slot < 0) return -1;
  return cpus[static_cast<size_t>(slot) % cpus.size()];
}

namespace {

// Who this worker is, and what it starts with, before W's constructor (this_worker.h). A CPU that
// cannot be had (a cpuset changed since) leaves the worker unpinned: placement is a preference,
// not a reason to fail.
void apply_placement(const WorkerLaunch& launch) {
  const WorkerPlacement& placement = launch.placement;
  for (const auto& [name, value] : placement.env) ::setenv(name.c_str(), value.c_str(), 1);
  int cpu = placement.cpu;
  if (placement.spread_cpus) cpu = spread_cpu(allowed_cpus(), launch.slot);
  if (cpu >= 0 && cpu < CPU_SETSIZE) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    (void)::sched_setaffinity(0, sizeof(set), &set);
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  set_this_worker(WorkerInfo{.slot = launch.slot,
                             .generation = placement.generation,
                             .pid = static_cast<int>(::getpid()),
                             .host = host,
                             .pool_name = placement.pool_name,
                             .workers = placement.workers});
}

// An exception escaped the worker's own code: says so on its stderr (where the pool forwards it)
// and leaves. Describing it may fail as the throw did (an allocation): then a fixed line.
[[noreturn]] void leave_after_exception() {
  report_escaped_exception("worker");
  try {
    end_own_tree();  // what its tasks started goes too
  } catch (...) {
  }
  leave(kWorkerExitProtocolError);
}

// The address space this process has mapped (VmSize), in bytes; 0 if /proc cannot say. Reads
// with open/read/close only.
size_t mapped_bytes() {
  char text[128];
  const int fd = ::open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  const ssize_t n = ::read(fd, text, sizeof(text) - 1);
  ::close(fd);
  if (n <= 0) return 0;
  text[n] = '\0';
  const unsigned long long pages = std::strtoull(text, nullptr, 10);
  return static_cast<size_t>(pages) * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

// max_worker_memory_bytes as RLIMIT_AS (no memory cgroup caps this worker; 0: none). RLIMIT_AS
// counts the address space the worker inherited, the program's own (its heap, its threads'
// stacks and malloc arenas, a runtime's reservations): a cap that leaves less than
// kMinWorkerMemoryBytes above that would fail every allocation the worker makes, its own before
// its tasks'. Such a worker sets no limit and refuses to start, saying why (run_worker sends it as
// enter()'s failure, so the tasks sent to it fail with it).
absl::Status limit_address_space(size_t limit) {
  if (limit == 0) return absl::OkStatus();
  const size_t mapped = mapped_bytes();
  if (mapped > limit || limit - mapped < kMinWorkerMemoryBytes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "max_worker_memory_bytes (", limit, ") is this worker's RLIMIT_AS (no memory cgroup holds ",
        "it), which counts the address space it inherited from the program: ", mapped,
        " bytes at its start, so the cap leaves it less than ", kMinWorkerMemoryBytes,
        " bytes to allocate. Raise max_worker_memory_bytes above the program's address space, or ",
        "run where a memory cgroup can be made (see PoolOptions::cgroups)"));
  }
  const rlimit as_limit{limit, limit};
  ::setrlimit(RLIMIT_AS, &as_limit);
  return absl::OkStatus();
}

[[noreturn]] void serve_as_worker(int channel_fd, ControlPage* page, const WorkerLaunch& launch,
                                  pid_t parent_pid, SharedRegion* region, TlsChannel* tls) {
  prepare_child({.process_name = launch.process_name,
                 .parent_death_signal = launch.parent_death_signal,
                 .parent_pid = parent_pid,
                 .pool_pid = launch.pool_pid,
                 .channel_fd = channel_fd,
                 .page = page,
                 .crash_backtraces = launch.crash_backtraces,
                 .stdout_fd = launch.stdout_fd,
                 .stderr_fd = launch.stderr_fd});
  // Before anything that could fork: whatever the worker starts is in its cgroups and below it.
  if (!join_cgroups(launch.cgroup_procs)) leave(kWorkerExitProtocolError);
  become_tree_root();
  end_tree_with_parent(launch.cgroup_procs);
  const absl::Status refused = limit_address_space(launch.address_space_limit);
  apply_placement(launch);
  if (tls != nullptr) tls->moved_to(kChildChannelFd);
  ChannelTransport transport(kChildChannelFd, launch.max_frame_bytes,
                             launch.hold_results ? held_frames(page) : nullptr, tls,
                             /*flush_stdout=*/launch.stdout_fd >= 0,
                             /*await_output_read=*/launch.output_read_elsewhere);
  const int status =
      run_worker(*launch.factory, transport, *page, launch.max_frame_bytes, region, refused);
  end_own_tree();
  leave(status);
}

}  // namespace

void worker_main(int channel_fd, ControlPage* page, const WorkerLaunch& launch, pid_t parent_pid,
                 SharedRegion* region, TlsChannel* tls) {
  // Nothing unwinds past here: above this frame is the stack of the program that forked the worker
  // (or of the fork server), and an exception that got there would run a second copy of that
  // program. The worker's own code throws where its allocations fail (std::bad_alloc under
  // RLIMIT_AS, which counts the address space it inherited); user code is caught nearer.
  try {
    serve_as_worker(channel_fd, page, launch, parent_pid, region, tls);
  } catch (...) {
    leave_after_exception();
  }
}

}  // namespace procpool::internal
