#include "lib/common/child_process.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>

#include "lib/common/syscall_numbers.h"

namespace procpool::internal {
namespace {

// Whether the kernel has a call: learnt from the first answer, and kept. Relaxed is enough: every
// thread that has not seen the answer yet asks the kernel, which answers the same.
class KernelCall {
 public:
  bool maybe_available() const { return known_missing_.load(std::memory_order_relaxed) == 0; }
  void learn_missing() { known_missing_.store(1, std::memory_order_relaxed); }

 private:
  std::atomic<int> known_missing_{0};
};

KernelCall pidfd_open_call;
KernelCall pidfd_send_signal_call;
KernelCall close_range_call;

void sleep_ms(int ms) {
  timespec pause{0, ms * 1'000'000L};
  while (::nanosleep(&pause, &pause) != 0 && errno == EINTR) {
  }
}

// Closes the descriptors from `first` that /proc/self/fd lists. False if it cannot be read.
bool close_listed_descriptors(int first) {
  const int directory = ::open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (directory < 0) return false;
  alignas(dirent64) char buffer[4096];
  // Closing while the directory is read may make the reading skip entries: read it again from
  // the start until a whole pass closes nothing.
  for (bool closed_any = true; closed_any;) {
    closed_any = false;
    ::lseek(directory, 0, SEEK_SET);
    while (true) {
      const long got = ::syscall(SYS_getdents64, directory, buffer, sizeof(buffer));
      if (got <= 0) break;
      for (long offset = 0; offset < got;) {
        const dirent64* entry = reinterpret_cast<const dirent64*>(buffer + offset);
        offset += entry->d_reclen;
        int fd = 0;
        const char* digit = entry->d_name;
        if (*digit == '\0') continue;
        for (; *digit >= '0' && *digit <= '9' && fd < (1 << 30); ++digit) fd = fd * 10 + (*digit - '0');
        if (*digit != '\0' || fd < first || fd == directory) continue;  // ".", ".."
        ::close(fd);
        closed_any = true;
      }
    }
  }
  ::close(directory);
  return true;
}

}  // namespace

UniqueFd open_pidfd(pid_t pid) {
  if (!pidfd_open_call.maybe_available()) {
    errno = ENOSYS;
    return UniqueFd();
  }
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0 && (errno == ENOSYS || errno == EPERM)) {
    const int error = errno;
    pidfd_open_call.learn_missing();
    errno = error;
  }
  return own_fd(fd);
}

bool pidfds_available() { return pidfd_open_call.maybe_available(); }

ChildState child_state(pid_t pid) {
  siginfo_t info{};
  while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0) {
    if (errno != EINTR) return ChildState::kGone;  // ECHILD
  }
  // WNOHANG: si_pid stays 0 while the child runs.
  return info.si_pid == 0 ? ChildState::kRunning : ChildState::kExited;
}

bool any_child_exited(int64_t now_ns) {
  struct Seen {
    int64_t at_ns = 0;
    bool valid = false;
    bool exited = false;
  };
  thread_local Seen seen;
  if (seen.valid && now_ns >= seen.at_ns && now_ns - seen.at_ns < kAnyChildExitedReuseNs) {
    return seen.exited;
  }
  siginfo_t info{};
  int result;
  do {
    result = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT);
  } while (result != 0 && errno == EINTR);
  // ECHILD (no child at all: each look says so itself) or an exited child (si_pid set).
  const bool exited = result != 0 || info.si_pid != 0;
  seen = Seen{now_ns, true, exited};
  return exited;
}

bool signal_through_pidfd(int pidfd, int signal) {
  if (!pidfd_send_signal_call.maybe_available()) return false;
  if (::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0) == 0 || errno != ENOSYS) {
    return true;
  }
  pidfd_send_signal_call.learn_missing();
  return false;
}

void signal_child(pid_t pid, int pidfd, int signal) {
  if (pid <= 0) return;
  if (pidfd >= 0 && signal_through_pidfd(pidfd, signal)) return;
  // Not reaped between the look and the kill unless the program reaps our children itself, from
  // another thread, within these microseconds (and the pid is reused within them too).
  if (child_state(pid) == ChildState::kRunning) ::kill(pid, signal);
}

bool wait_for_child_exit(pid_t pid, int pidfd, int timeout_ms) {
  if (pidfd >= 0) {
    pollfd exited{pidfd, POLLIN, 0};
    int polled;
    do {
      polled = ::poll(&exited, 1, timeout_ms);
    } while (polled < 0 && errno == EINTR);
    return polled != 0;
  }
  constexpr int kStepMs = 2;
  for (int waited = 0;; waited += kStepMs) {
    if (child_state(pid) != ChildState::kRunning) return true;
    if (waited >= timeout_ms) return false;
    sleep_ms(kStepMs);
  }
}

void close_descriptors_from(int first) {
  if (close_range_call.maybe_available()) {
    if (::syscall(SYS_close_range, static_cast<unsigned>(first), ~0U, 0) == 0) return;
    if (errno == ENOSYS || errno == EPERM) close_range_call.learn_missing();
  }
  if (close_listed_descriptors(first)) return;
  // No /proc: every number the limit allows.
  rlimit limit{};
  const rlim_t top = ::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
                         ? std::min<rlim_t>(limit.rlim_cur, rlim_t{1} << 20)
                         : rlim_t{1} << 16;
  for (rlim_t fd = static_cast<rlim_t>(first); fd < top; ++fd) ::close(static_cast<int>(fd));
}

}  // namespace procpool::internal
