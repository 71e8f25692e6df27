/// \file
/// Graceful shutdown on SIGINT and SIGTERM for every pool in the process.
///
/// ```cpp
/// int main() {
///   procpool::install_signal_handlers().IgnoreError();  // once; before or after pools are made
///   procpool::ProcessPool<Indexer> pool({.workers = 4});
///   absl::StatusOr<std::vector<int64_t>> sizes = pool.map(urls);  // Ctrl-C: kCancelled
///   if (procpool::stop_signal() != 0) return 130;
/// }  // close-then-join: every worker's exit() runs
/// ```
///
/// What a signal means, by count:
///
///   1. every pool closes (no new work) and cancels its queued tasks that no worker has started
///      (they fail with kCancelled); tasks already running finish, so the blocked calls return
///      soon; then the program's own close-then-join (a pool's destructor) runs every exit().
///   2. every pool terminates: workers get SIGTERM, then SIGKILL after kill_grace; no exit hooks.
///   3. the signal's default action is restored and the signal re-raised: the process dies.
///
/// Workers never act on these signals themselves: they ignore SIGINT, and ignore SIGTERM unless
/// it comes from their pool, so a terminal's Ctrl-C or a `kill` of the process group cannot kill
/// a task midway; the parent decides. The handlers only write to a pipe; a thread of the library
/// does the rest. Thread-safe.

#ifndef PROCPOOL_SIGNALS_H_
#define PROCPOOL_SIGNALS_H_

#include <csignal>
#include <functional>
#include <vector>

#include "absl/status/status.h"

namespace procpool {

/// What `install_signal_handlers` handles, and what it also calls. Designated initializers must
/// follow this order.
struct SignalOptions {
  /// The signals that close (1st), terminate (2nd) and kill (3rd): SIGINT and SIGTERM by default.
  std::vector<int> signals = {SIGINT, SIGTERM};
  /// Called (on the library's signal thread, after the pools were told) with each signal, e.g. to
  /// stop the program's own loops. Must not block for long.
  std::function<void(int signal)> on_signal;
};

/// Installs the handlers and starts the library's signal thread; acts on every pool of the
/// process, made before or after. Never blocks. kAlreadyExists if installed already; an
/// errno-based status if a pipe or a `sigaction()` fails (then nothing is installed).
absl::Status install_signal_handlers(SignalOptions options = {});

/// Restores the handlers that were there before and stops the signal thread; blocks until that
/// thread has finished acting on a signal it was handling. No-op if none is installed.
void uninstall_signal_handlers();

/// The first signal received since install, or 0. Never blocks.
int stop_signal();

}  // namespace procpool

#endif  // PROCPOOL_SIGNALS_H_
