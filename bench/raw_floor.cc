#include "bench/raw_floor.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <utility>

#include "bench/bench_util.h"

namespace procpool_bench {
namespace {

bool read_full(int fd, void* data, size_t size) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t got = ::read(fd, p, size);
    if (got > 0) {
      p += got;
      size -= static_cast<size_t>(got);
    } else if (got == 0 || errno != EINTR) {
      return false;
    }
  }
  return true;
}

bool write_full(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t put = ::write(fd, p, size);
    if (put > 0) {
      p += put;
      size -= static_cast<size_t>(put);
    } else if (put < 0 && errno != EINTR) {
      return false;
    }
  }
  return true;
}

// Forks a child running `child(fd)` on its end of a new socketpair; returns the parent's end.
template <typename Child>
int fork_child(Child child, pid_t* pid) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) die("socketpair");
  std::fflush(nullptr);
  *pid = ::fork();
  if (*pid < 0) die("fork");
  if (*pid == 0) {
    // Keep only our end (and stdio): an inherited end of another child's socketpair would keep
    // that child from ever seeing end of file.
    ::close(fds[0]);
    if (fds[1] > 3) ::syscall(SYS_close_range, 3, fds[1] - 1, 0);
    ::syscall(SYS_close_range, fds[1] + 1, ~0U, 0);
    child(fds[1]);
    ::_exit(0);
  }
  ::close(fds[1]);
  return fds[0];
}

void finish_child(int fd, pid_t pid) {
  ::close(fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
}

}  // namespace

double raw_pingpong_us(int64_t iters, int64_t warmup) {
  pid_t pid;
  int fd = fork_child(
      [](int fd) {
        char buf[16];
        while (read_full(fd, buf, sizeof(buf)) && write_full(fd, buf, sizeof(buf))) {
        }
      },
      &pid);
  char buf[16] = "ping-pong-16byt";
  auto round_trip = [&] {
    if (!write_full(fd, buf, sizeof(buf)) || !read_full(fd, buf, sizeof(buf))) die("raw ping-pong");
  };
  for (int64_t i = 0; i < warmup; ++i) round_trip();
  const int64_t start = now_ns();
  for (int64_t i = 0; i < iters; ++i) round_trip();
  const double us = (now_ns() - start) / 1e3 / static_cast<double>(iters);
  finish_child(fd, pid);
  return us;
}

double raw_copy_seconds(const std::vector<std::string>& payloads, int warmup) {
  size_t largest = 0;
  for (const std::string& p : payloads) largest = std::max(largest, p.size());
  pid_t pid;
  int fd = fork_child(
      [largest](int fd) {
        std::unique_ptr<char[]> buffer(new char[largest]);
        std::memset(buffer.get(), 0, largest);  // a reused, already faulted-in buffer
        uint64_t size;
        while (read_full(fd, &size, sizeof(size))) {
          if (size > largest || !read_full(fd, buffer.get(), size)) break;
          if (!write_full(fd, &size, sizeof(size))) break;
        }
      },
      &pid);
  auto send_one = [fd](const std::string& payload) {
    uint64_t size = payload.size();
    uint64_t answer = 0;
    if (!write_full(fd, &size, sizeof(size)) || !write_full(fd, payload.data(), payload.size()) ||
        !read_full(fd, &answer, sizeof(answer)) || answer != size) {
      die("raw copy");
    }
  };
  for (int i = 0; i < warmup && !payloads.empty(); ++i) send_one(payloads[i % payloads.size()]);
  const int64_t start = now_ns();
  for (const std::string& payload : payloads) send_one(payload);
  const double seconds = (now_ns() - start) / 1e9;
  finish_child(fd, pid);
  return seconds;
}

double raw_map_items_per_s(const std::vector<int64_t>& jobs, int workers, size_t chunk,
                           bool fresh_results) {
  chunk = std::max<size_t>(1, chunk);
  struct Child {
    pid_t pid;
    int fd;
    std::deque<std::pair<size_t, size_t>> in_flight;  // (first, count), in order
  };
  std::vector<Child> children;
  for (int w = 0; w < workers; ++w) {
    Child child;
    child.fd = fork_child(
        [chunk](int fd) {
          std::vector<int64_t> buffer(chunk);
          uint64_t count;
          while (read_full(fd, &count, sizeof(count))) {
            if (count > chunk || !read_full(fd, buffer.data(), count * sizeof(int64_t))) break;
            for (uint64_t i = 0; i < count; ++i) buffer[i] *= buffer[i];
            if (!write_full(fd, &count, sizeof(count)) ||
                !write_full(fd, buffer.data(), count * sizeof(int64_t))) {
              break;
            }
          }
        },
        &child.pid);
    children.push_back(std::move(child));
  }
  std::vector<int64_t> results;
  if (!fresh_results) results.assign(jobs.size(), 0);
  size_t next = 0;
  size_t done = 0;
  auto send_next = [&](Child& child) {
    if (next >= jobs.size()) return;
    const uint64_t count = std::min(chunk, jobs.size() - next);
    if (!write_full(child.fd, &count, sizeof(count)) ||
        !write_full(child.fd, jobs.data() + next, count * sizeof(int64_t))) {
      die("raw map: send");
    }
    child.in_flight.emplace_back(next, count);
    next += count;
  };
  const int64_t start = now_ns();
  // A fresh result array, as a map's is: its pages are faulted in within the time (and, where the
  // allocator reuses memory that the children share since their fork, copied on write).
  if (fresh_results) results.assign(jobs.size(), 0);
  // One chunk in flight per child: with blocking sockets, a second one could deadlock (the parent
  // writing a chunk the child will not read while it writes a result the parent is not reading).
  for (Child& child : children) send_next(child);
  std::vector<pollfd> fds(children.size());
  while (done < jobs.size()) {
    for (size_t i = 0; i < children.size(); ++i) fds[i] = {children[i].fd, POLLIN, 0};
    if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) die("raw map: poll");
    for (size_t i = 0; i < children.size(); ++i) {
      if (!(fds[i].revents & POLLIN)) continue;
      Child& child = children[i];
      uint64_t count;
      if (child.in_flight.empty() || !read_full(child.fd, &count, sizeof(count))) {
        die("raw map: receive");
      }
      auto [first, expected] = child.in_flight.front();
      child.in_flight.pop_front();
      if (count != expected ||
          !read_full(child.fd, results.data() + first, count * sizeof(int64_t))) {
        die("raw map: receive");
      }
      done += count;
      send_next(child);
    }
  }
  const double seconds = (now_ns() - start) / 1e9;
  for (Child& child : children) ::close(child.fd);
  for (Child& child : children) ::waitpid(child.pid, nullptr, 0);
  for (size_t i = 0; i < jobs.size(); i += 997) {
    if (results[i] != jobs[i] * jobs[i]) die("raw map: wrong result");
  }
  return static_cast<double>(jobs.size()) / seconds;
}

double raw_fork_ms(int children) {
  std::fflush(nullptr);
  const int64_t start = now_ns();
  std::vector<pid_t> pids;
  for (int i = 0; i < children; ++i) {
    pid_t pid = ::fork();
    if (pid < 0) die("fork");
    if (pid == 0) ::_exit(0);
    pids.push_back(pid);
  }
  for (pid_t pid : pids) {
    int status;
    ::waitpid(pid, &status, 0);
  }
  return (now_ns() - start) / 1e6;
}

}  // namespace procpool_bench
