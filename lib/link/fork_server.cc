#include "lib/link/fork_server.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <new>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "lib/common/child_process.h"
#include "lib/fault_injection.h"
#include "lib/link/fork_link.h"
#include "lib/link/worker_process.h"
#include "lib/worker/child_setup.h"
#include "lib/worker/worker_main.h"
#include "procpool/codec.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/internal/worker_body.h"

namespace procpool::internal {
namespace {

// A spawn request carries the worker's environment (PoolOptions::worker_env): room for that.
constexpr size_t kMaxPacket = size_t{64} << 10;
constexpr int kSpawnReplyTimeoutMs = 10'000;

// Sends one Cap'n Proto message as one packet, with `fds` attached.
bool send_packet(int socket, capnp::MessageBuilder& message, const int* fds, size_t fd_count) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  iovec piece{bytes.begin(), bytes.size()};
  msghdr header{};
  header.msg_iov = &piece;
  header.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))] = {};
  if (fd_count > 0) {
    header.msg_control = control;
    header.msg_controllen = CMSG_SPACE(fd_count * sizeof(int));
    cmsghdr* cmsg = CMSG_FIRSTHDR(&header);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(fd_count * sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), fds, fd_count * sizeof(int));
  }
  while (true) {
    if (::sendmsg(socket, &header, MSG_NOSIGNAL) >= 0) return true;
    if (errno != EINTR) return false;
  }
}

// Receives one packet into `words` (word-aligned) and up to four fds. Returns bytes, 0 at EOF,
// -1 on error.
ssize_t receive_packet(int socket, capnp::word* words, int* fds, size_t* fd_count) {
  iovec piece{words, kMaxPacket};
  msghdr header{};
  header.msg_iov = &piece;
  header.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))] = {};
  header.msg_control = control;
  header.msg_controllen = sizeof(control);
  ssize_t got;
  do {
    got = ::recvmsg(socket, &header, MSG_CMSG_CLOEXEC);
  } while (got < 0 && errno == EINTR);
  *fd_count = 0;
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&header); cmsg != nullptr; cmsg = CMSG_NXTHDR(&header, cmsg)) {
    if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
      const size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
        if (*fd_count < 4) {
          fds[(*fd_count)++] = fd;
        } else {
          ::close(fd);
        }
      }
    }
  }
  return got;
}

void report_exit(pid_t pid, int status) {
  capnp::MallocMessageBuilder message(32);
  auto exited = message.initRoot<wire::ForkServerReport>().initExited();
  exited.setPid(pid);
  exited.setWaitStatus(status);
  send_packet(kChildChannelFd, message, nullptr, 0);
}

// The zygote's workers not reaped yet, and the slot each was forked for: a signal the pool asks
// for goes only to one of these (a reaped pid may be reused by then).
std::map<pid_t, uint32_t> live_workers;

void reap_children() {
  int status;
  pid_t pid;
  while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
    live_workers.erase(pid);
    report_exit(pid, status);
  }
}

// Serves one request: a signal for a worker (no reply), or a spawn: forks the worker (which
// never returns here) and reports its pid.
void serve_request(const capnp::word* words, size_t bytes, int* fds, size_t fd_count,
                   const WorkerLaunch& base, int signal_fd) {
  if (take_injected_fork_server_exception()) throw std::bad_alloc();
  capnp::MallocMessageBuilder reply(32);
  auto report = reply.initRoot<wire::ForkServerReport>();
  bool replied = true;
  const absl::Status served = guarded("a malformed spawn request", [&]() -> absl::Status {
    capnp::FlatArrayMessageReader message(kj::arrayPtr(words, bytes / sizeof(capnp::word)));
    auto request = message.getRoot<wire::ForkServerRequest>();
    if (request.getSignal() != 0) {
      replied = false;
      // The slot too: the pool asks for a slot's new worker only after its old one was reported
      // reaped, so a reused pid of the same slot cannot be asked about here.
      const auto worker = live_workers.find(request.getSignalPid());
      if (worker != live_workers.end() && worker->second == request.getSlot()) {
        ::kill(worker->first, request.getSignal());
      }
      return absl::OkStatus();
    }
    // The channel and the page; with forwarded output, the write ends of its stdout and stderr.
    if (fd_count != 2 && fd_count != 4) {
      return absl::InvalidArgumentError("a spawn request needs two descriptors, or four");
    }
    WorkerLaunch launch = base;
    if (fd_count == 4) {
      launch.stdout_fd = fds[2];
      launch.stderr_fd = fds[3];
    }
    launch.slot = static_cast<int>(request.getSlot());
    launch.process_name = request.getName().cStr();
    for (capnp::Text::Reader procs : request.getCgroupProcs()) launch.cgroup_procs.push_back(procs);
    launch.parent_death_signal = true;  // this process is single-threaded and outlives its workers
    launch.placement = placement_from_wire(request.getPlacement());
    const pid_t self = ::getpid();
    absl::StatusOr<pid_t> forked = fork_child("a worker in the fork server");
    const pid_t pid = forked.ok() ? *forked : -1;
    if (pid == 0) {
      ::close(signal_fd);
      absl::StatusOr<ControlPageMapping> page = ControlPageMapping::map(fds[1]);
      if (!page.ok()) ::_exit(kWorkerExitProtocolError);
      ::close(fds[1]);
      // The mapping outlives this scope: the worker never returns.
      worker_main(fds[0], page->release(), launch, self);
    }
    if (pid < 0) return forked.status();
    live_workers[pid] = static_cast<uint32_t>(launch.slot);
    auto spawned = report.initSpawned();
    spawned.setSlot(launch.slot);
    spawned.setPid(pid);
    return absl::OkStatus();
  });
  if (!served.ok()) status_to_wire(served, report.initFailed());
  for (size_t i = 0; i < fd_count; ++i) ::close(fds[i]);
  if (replied) send_packet(kChildChannelFd, reply, nullptr, 0);
}

[[noreturn]] void serve_spawn_requests(int control_fd, const WorkerLaunch& base, pid_t parent_pid,
                                       bool parent_death_signal) {
  prepare_child({.process_name = base.process_name,
                 .parent_death_signal = parent_death_signal,
                 .parent_pid = parent_pid,
                 .pool_pid = base.pool_pid,
                 .channel_fd = control_fd,
                 .page = nullptr});
  constexpr int kControlFd = kChildChannelFd;

  sigset_t child;
  sigemptyset(&child);
  sigaddset(&child, SIGCHLD);
  ::sigprocmask(SIG_BLOCK, &child, nullptr);
  const int signal_fd = ::signalfd(-1, &child, SFD_CLOEXEC | SFD_NONBLOCK);
  if (signal_fd < 0) ::_exit(1);

  alignas(capnp::word) capnp::word packet[kMaxPacket / sizeof(capnp::word)];
  while (true) {
    pollfd fds[2] = {{kControlFd, POLLIN, 0}, {signal_fd, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) continue;
    if (fds[1].revents != 0) {
      signalfd_siginfo info;
      while (::read(signal_fd, &info, sizeof(info)) == sizeof(info)) {
      }
      reap_children();
    }
    if (fds[0].revents != 0) {
      int received[4];
      size_t received_count = 0;
      const ssize_t got = receive_packet(kControlFd, packet, received, &received_count);
      // End of file: the pool is gone. Leaving takes our workers with us (PDEATHSIG).
      if (got <= 0) ::_exit(0);
      serve_request(packet, static_cast<size_t>(got), received, received_count, base, signal_fd);
      reap_children();
    }
  }
}

// The fork server's process, from the moment fork() returns in it. Nothing unwinds past here:
// above this frame is the stack of the program that started the pool, and an exception that got
// there would run a second copy of that program (as worker_main says of a worker). Its own code
// throws where its allocations fail (std::bad_alloc); the pool sees it leave, and its workers
// with it (their parent-death signal), as for any other death of the fork server.
[[noreturn]] void fork_server_main(int control_fd, const WorkerLaunch& base, pid_t parent_pid,
                                   bool parent_death_signal) {
  try {
    serve_spawn_requests(control_fd, base, parent_pid, parent_death_signal);
  } catch (...) {
    report_escaped_exception("fork server");
    ::_exit(kWorkerExitProtocolError);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<ForkServer>> ForkServer::start(const WorkerLaunch& launch) {
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    return absl::ErrnoToStatus(errno, "socketpair for the fork server");
  }
  UniqueFd ours = own_fd(pair[0]);
  UniqueFd theirs = own_fd(pair[1]);
  const pid_t parent = ::getpid();
  absl::StatusOr<pid_t> pid = fork_child("the fork server");
  if (!pid.ok()) return pid.status();
  if (*pid == 0) {
    ours.release();
    fork_server_main(theirs.release(), launch, parent, launch.parent_death_signal);
  }
  auto server = std::unique_ptr<ForkServer>(new ForkServer());
  server->pid_ = *pid;
  server->control_ = std::move(ours);
  server->pidfd_ = open_pidfd(*pid);  // none on a kernel without pidfds: watched by pid
  return server;
}

ForkServer::~ForkServer() {
  control_.reset();  // the zygote sees end of file and exits
  if (pid_ <= 0) return;
  if (!wait_for_child_exit(pid_, pidfd_.get(), 2000)) signal_child(pid_, pidfd_.get(), SIGKILL);
  while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
}

void ForkServer::signal(pid_t pid, int slot, int signal) {
  capnp::MallocMessageBuilder request(32);
  auto root = request.initRoot<wire::ForkServerRequest>();
  root.setSlot(static_cast<uint32_t>(slot));
  root.setSignal(signal);
  root.setSignalPid(pid);
  send_packet(control_.get(), request, nullptr, 0);
}

absl::StatusOr<bool> ForkServer::read_report(int timeout_ms, pid_t* spawned, absl::Status* failed) {
  pollfd ready{control_.get(), POLLIN, 0};
  int polled;
  do {
    polled = ::poll(&ready, 1, timeout_ms);
  } while (polled < 0 && errno == EINTR);
  if (polled == 0) return false;
  alignas(capnp::word) capnp::word packet[kMaxPacket / sizeof(capnp::word)];
  int fds[4];
  size_t fd_count = 0;
  const ssize_t got = receive_packet(control_.get(), packet, fds, &fd_count);
  for (size_t i = 0; i < fd_count; ++i) ::close(fds[i]);
  if (got <= 0) return absl::UnavailableError("the fork server is gone");
  const absl::Status read = guarded("malformed report from the fork server", [&]() -> absl::Status {
    capnp::FlatArrayMessageReader message(kj::arrayPtr(packet, static_cast<size_t>(got) / sizeof(capnp::word)));
    auto report = message.getRoot<wire::ForkServerReport>();
    switch (report.which()) {
      case wire::ForkServerReport::SPAWNED:
        *spawned = report.getSpawned().getPid();
        break;
      case wire::ForkServerReport::EXITED:
        exits_.emplace_back(report.getExited().getPid(), report.getExited().getWaitStatus());
        break;
      case wire::ForkServerReport::FAILED:
        *failed = status_from_wire(report.getFailed());
        break;
    }
    return absl::OkStatus();
  });
  if (!read.ok()) return read;
  return true;
}

absl::StatusOr<ForkServer::Spawned> ForkServer::spawn(const WorkerLaunch& launch) {
  absl::StatusOr<SocketPair> channel = make_socket_pair(kChannelSendBufferBytes);
  if (!channel.ok()) return channel.status();
  absl::StatusOr<ControlPageMapping> page =
      ControlPageMapping::create(absl::StrCat(launch.process_name, "-control"));
  if (!page.ok()) return page.status();
  capnp::MallocMessageBuilder request(32);
  auto root = request.initRoot<wire::ForkServerRequest>();
  root.setSlot(static_cast<uint32_t>(launch.slot));
  root.setName(launch.process_name);
  auto cgroup_procs = root.initCgroupProcs(static_cast<unsigned>(launch.cgroup_procs.size()));
  for (unsigned i = 0; i < cgroup_procs.size(); ++i) cgroup_procs.set(i, launch.cgroup_procs[i]);
  placement_to_wire(launch.placement, root.initPlacement());
  if (capnp::computeSerializedSizeInWords(request) * sizeof(capnp::word) > kMaxPacket) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PoolOptions::worker_env for slot ", launch.slot, " is too large for the fork server (",
        kMaxPacket, " bytes a request)"));
  }
  const int fds[4] = {channel->child_end.get(), page->fd(), launch.stdout_fd, launch.stderr_fd};
  if (!send_packet(control_.get(), request, fds, launch.stdout_fd >= 0 ? 4 : 2)) {
    return absl::ErrnoToStatus(errno, "sending a spawn request to the fork server");
  }
  channel->child_end.reset();
  // The server has its copy (in flight counts): the page's mapping is all we keep.
  page->close_descriptor();
  const absl::Time deadline = absl::Now() + absl::Milliseconds(kSpawnReplyTimeoutMs);
  pid_t pid = -1;
  absl::Status failed;
  while (pid < 0 && failed.ok()) {
    const int left = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (left <= 0) return absl::DeadlineExceededError("the fork server did not answer a spawn request");
    absl::StatusOr<bool> read = read_report(left, &pid, &failed);
    if (!read.ok()) return read.status();
  }
  if (!failed.ok()) return failed;
  return Spawned{pid, std::move(channel->parent_end), *std::move(page)};
}

absl::Status ForkServer::take_exits(std::vector<std::pair<pid_t, int>>& exits) {
  while (true) {
    pid_t spawned = -1;
    absl::Status failed;
    absl::StatusOr<bool> read = read_report(0, &spawned, &failed);
    if (!read.ok()) {
      exits.insert(exits.end(), exits_.begin(), exits_.end());
      exits_.clear();
      return read.status();
    }
    if (!*read) break;
  }
  exits.insert(exits.end(), exits_.begin(), exits_.end());
  exits_.clear();
  return absl::OkStatus();
}

}  // namespace procpool::internal
