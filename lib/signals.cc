// Signal handling (include/procpool/signals.h) and the registry of live pools it acts on.

#include "procpool/signals.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "lib/pool_registry.h"
#include "lib/common/unique_fd.h"

namespace procpool {
namespace {

std::mutex& registry_mutex() {
  static std::mutex mu;
  return mu;
}
std::vector<internal::PoolCore*>& registry() {
  static std::vector<internal::PoolCore*> pools;
  return pools;
}

// Written by the handler, read by the signal thread.
std::atomic<int> signal_write_fd{-1};
std::atomic<int> first_signal{0};

void on_signal(int signal) {
  const int saved_errno = errno;
  const unsigned char byte = static_cast<unsigned char>(signal);
  const int fd = signal_write_fd.load(std::memory_order_relaxed);
  if (fd >= 0) (void)!::write(fd, &byte, 1);
  errno = saved_errno;
}

struct Installed {
  SignalOptions options;
  std::map<int, struct sigaction> previous;
  internal::UniqueFd read_end;
  internal::UniqueFd write_end;
  std::thread thread;
};

std::mutex install_mu;
Installed* installed = nullptr;  // guarded by install_mu

void serve(Installed* state) {
  int count = 0;
  while (true) {
    unsigned char byte;
    ssize_t got = ::read(state->read_end.get(), &byte, 1);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0 || byte == 0) return;  // closed, or the stop byte from uninstall
    const int signal = byte;
    int expected = 0;
    first_signal.compare_exchange_strong(expected, signal);
    ++count;
    {
      std::lock_guard lock(registry_mutex());
      for (internal::PoolCore* pool : registry()) {
        if (count == 1) {
          pool->log(LogSeverity::kWarning,
                    absl::StrCat("signal ", signal, ": closing, cancelling queued tasks"));
          pool->close().IgnoreError();
          pool->cancel_pending(absl::CancelledError(
              absl::StrCat("cancelled: the program received signal ", signal)));
        } else if (count == 2) {
          pool->log(LogSeverity::kWarning, absl::StrCat("signal ", signal, " again: terminating"));
          pool->terminate();
        }
      }
    }
    if (state->options.on_signal) state->options.on_signal(signal);
    if (count >= 3) {
      struct sigaction fallback {};
      fallback.sa_handler = SIG_DFL;
      ::sigaction(signal, &fallback, nullptr);
      ::raise(signal);
    }
  }
}

}  // namespace

namespace internal {

void register_pool(PoolCore* pool) {
  std::lock_guard lock(registry_mutex());
  registry().push_back(pool);
}

void unregister_pool(PoolCore* pool) {
  std::lock_guard lock(registry_mutex());
  std::erase(registry(), pool);
}

}  // namespace internal

absl::Status install_signal_handlers(SignalOptions options) {
  std::lock_guard lock(install_mu);
  if (installed != nullptr) return absl::AlreadyExistsError("signal handlers are already installed");
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return absl::ErrnoToStatus(errno, "pipe2 for signal handling");
  auto state = new Installed{std::move(options), {}, internal::UniqueFd(fds[0]),
                             internal::UniqueFd(fds[1]), {}};
  signal_write_fd.store(state->write_end.get());
  first_signal.store(0);
  for (int signal : state->options.signals) {
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    struct sigaction previous {};
    if (::sigaction(signal, &action, &previous) != 0) {
      const int error = errno;
      for (auto& [restored, old] : state->previous) ::sigaction(restored, &old, nullptr);
      signal_write_fd.store(-1);
      delete state;
      return absl::ErrnoToStatus(error, absl::StrCat("sigaction(", signal, ")"));
    }
    state->previous[signal] = previous;
  }
  state->thread = std::thread(serve, state);
  installed = state;
  return absl::OkStatus();
}

void uninstall_signal_handlers() {
  std::lock_guard lock(install_mu);
  if (installed == nullptr) return;
  for (auto& [signal, previous] : installed->previous) ::sigaction(signal, &previous, nullptr);
  const unsigned char stop = 0;
  (void)!::write(installed->write_end.get(), &stop, 1);
  installed->thread.join();
  signal_write_fd.store(-1);
  delete installed;
  installed = nullptr;
}

int stop_signal() { return first_signal.load(); }

}  // namespace procpool
