#include "lib/worker/worker_main.h"

#include "lib/wire/frame_io.h"
#include "lib/worker/child_setup.h"
#include "lib/worker/task_server.h"

namespace procpool::internal {
namespace {

// Frames over the inherited socketpair: blocking reads and writes, nothing else to wait for.
class ChannelTransport final : public WorkerTransport {
 public:
  ChannelTransport(int fd, size_t max_frame_bytes) : fd_(fd), reader_(max_frame_bytes) {}
  absl::StatusOr<kj::ArrayPtr<const capnp::word>> next_frame() override {
    return reader_.read_blocking(fd_);
  }
  bool send(capnp::MessageBuilder& message) override { return write_frame(fd_, message).ok(); }
  // The reader's buffer is ours alone.
  bool frames_writable() const override { return true; }

 private:
  int fd_;
  FrameReader reader_;
};

}  // namespace

void worker_main(int channel_fd, ControlPage* page, const WorkerLaunch& launch, pid_t parent_pid) {
  prepare_child({.process_name = launch.process_name,
                 .parent_death_signal = launch.parent_death_signal,
                 .parent_pid = parent_pid,
                 .pool_pid = launch.pool_pid,
                 .channel_fd = channel_fd,
                 .page = page});
  ChannelTransport transport(kChildChannelFd, launch.max_frame_bytes);
  leave(run_worker(*launch.factory, transport, *page, launch.max_frame_bytes));
}

}  // namespace procpool::internal
