#include "lib/options_check.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "lib/common/socket.h"
#include "lib/metrics_server.h"

namespace procpool::internal {
namespace {

// A token shorter than this is refused: 16 bytes of a password still resist guessing far better
// than "hunter2", and make_token()'s are 64.
constexpr size_t kMinTokenBytes = 16;

absl::Status positive(const char* field, absl::Duration value) {
  if (value > absl::ZeroDuration()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("PoolOptions::", field, " must be positive, not ",
                                                 absl::FormatDuration(value)));
}

absl::Status not_negative(const char* field, absl::Duration value) {
  if (value >= absl::ZeroDuration()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("PoolOptions::", field,
                                                 " must not be negative, not ",
                                                 absl::FormatDuration(value)));
}

absl::Status check_remote_options(const PoolOptions& options, bool remote_allowed) {
  if (!options.remote) return absl::OkStatus();
  const RemoteOptions& remote = *options.remote;
  if (!remote_allowed) {
    return absl::InvalidArgumentError(
        "PoolOptions::remote: procpool::Pool cannot have remote workers (a function's address "
        "means nothing in another program); use ProcessPool<W> with procpool::serve<W>");
  }
  if (options.workers <= 0) {
    return absl::InvalidArgumentError(
        "PoolOptions::workers must be given (more than 0) for remote workers");
  }
  absl::StatusOr<HostPort> listen = parse_host_port(remote.listen);
  if (!listen.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("RemoteOptions::listen: ", listen.status().message()));
  }
  // Empty: the pool makes one (RemoteLauncher). A short one is guessed; a NUL cannot go into a
  // launched worker's environment.
  if (!remote.token.empty() && remote.token.size() < kMinTokenBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RemoteOptions::token must be at least ", kMinTokenBytes, " bytes (it has ",
        remote.token.size(), "): leave it empty for one the pool makes, or use procpool::make_token()"));
  }
  if (remote.token.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError("RemoteOptions::token must not contain a NUL byte");
  }
  if (remote.connect_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("RemoteOptions::connect_timeout must be positive");
  }
  if (remote.heartbeat_timeout < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError("RemoteOptions::heartbeat_timeout must be at least 100ms");
  }
  if (!remote.launch.empty() && remote.launch.front().empty()) {
    return absl::InvalidArgumentError("RemoteOptions::launch: the command (its first word) is empty");
  }
  // Plaintext only where no one else's network carries it.
  if (!remote.encrypt && !is_loopback_host(listen->host)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RemoteOptions::encrypt = false is allowed only with a loopback `listen` address (",
        remote.listen, " is not): jobs and results would cross the network in plaintext"));
  }
  if (remote.tls && (remote.tls->ca_file.empty() || remote.tls->cert_file.empty() ||
                     remote.tls->key_file.empty())) {
    return absl::InvalidArgumentError(
        "RemoteOptions::tls needs all of ca_file, cert_file and key_file");
  }
  if (remote.tls && !remote.encrypt) {
    return absl::InvalidArgumentError("RemoteOptions::tls and encrypt = false contradict each other");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status check_pool_options(const PoolOptions& options, bool remote_allowed) {
  if (absl::Status remote = check_remote_options(options, remote_allowed); !remote.ok()) return remote;
  if (!options.metrics_listen.empty()) {
    if (absl::StatusOr<HostPort> metrics = parse_metrics_listen(options.metrics_listen);
        !metrics.ok()) {
      return metrics.status();
    }
  }
  if (options.workers < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PoolOptions::workers must be 0 (one per CPU) or more, not ", options.workers));
  }
  if (options.workers > kMaxWorkers) {
    return absl::InvalidArgumentError(
        absl::StrCat("PoolOptions::workers is at most ", kMaxWorkers, ", not ", options.workers));
  }
  if (options.max_frame_bytes < kMinFrameBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PoolOptions::max_frame_bytes (%d) is below the smallest that works, %d bytes",
        options.max_frame_bytes, kMinFrameBytes));
  }
  if (options.max_frame_bytes > (size_t{1} << 40)) {
    return absl::InvalidArgumentError("PoolOptions::max_frame_bytes is over 1 TiB");
  }
  if (options.max_tasks_per_worker < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PoolOptions::max_tasks_per_worker must be 0 (never recycle) or more, not ",
        options.max_tasks_per_worker));
  }
  if (options.max_worker_memory_bytes != 0 && options.max_worker_memory_bytes < kMinWorkerMemoryBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PoolOptions::max_worker_memory_bytes (%d) is below %d bytes (16 MiB), too little for any "
        "worker to start; 0 means no cap",
        options.max_worker_memory_bytes, kMinWorkerMemoryBytes));
  }
  if (options.cgroups != Cgroups::kAuto && options.cgroups != Cgroups::kOff) {
    return absl::InvalidArgumentError(absl::StrCat("PoolOptions::cgroups is not a Cgroups value (",
                                                   static_cast<int>(options.cgroups), ")"));
  }
  for (absl::Status s : {not_negative("join_timeout", options.join_timeout),
                         positive("task_timeout", options.task_timeout),
                         positive("enter_timeout", options.enter_timeout),
                         not_negative("kill_grace", options.kill_grace),
                         positive("frame_timeout", options.frame_timeout),
                         not_negative("respawn_delay", options.respawn_delay),
                         not_negative("respawn_max_delay", options.respawn_max_delay)}) {
    if (!s.ok()) return s;
  }
  if (absl::Status grace = not_negative("cancel_grace", options.cancel_grace); !grace.ok()) {
    return grace;
  }
  if (absl::Status idle = positive("idle_timeout", options.idle_timeout); !idle.ok()) {
    return idle;
  }
  // With workers = 0 (one per CPU) the pool's size is known only once it is made: min_workers is
  // then held to it there (a pool never keeps more workers than it has).
  const int max_min_workers = options.workers > 0 ? options.workers : kMaxWorkers;
  if (options.min_workers < 0 || options.min_workers > max_min_workers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PoolOptions::min_workers must be from 0 to workers (", max_min_workers, "), not ",
        options.min_workers));
  }
  if (options.respawn_max_delay < options.respawn_delay) {
    return absl::InvalidArgumentError(
        "PoolOptions::respawn_max_delay must not be less than respawn_delay");
  }
  return absl::OkStatus();
}

absl::Status check_resize(int workers) {
  if (workers >= 1 && workers <= kMaxWorkers) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("resize: a pool has from 1 to ", kMaxWorkers, " workers, not ", workers));
}

absl::Status check_call_settings(const CallSettings& settings) {
  if (settings.retries < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CallOptions::retries must not be negative, not ", settings.retries));
  }
  if (settings.has_task_timeout && settings.task_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("CallOptions::task_timeout must be positive, not ",
                                                   absl::FormatDuration(settings.task_timeout)));
  }
  if (settings.soft_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("CallOptions::soft_timeout must be positive, not ",
                                                   absl::FormatDuration(settings.soft_timeout)));
  }
  for (const absl::StatusCode code : settings.retry_on) {
    // kOk is no failure; kCancelled is the caller's own decision (or terminate's): running the
    // task again would undo it.
    if (code == absl::StatusCode::kOk || code == absl::StatusCode::kCancelled) {
      return absl::InvalidArgumentError(absl::StrCat("CallOptions::retry_on: ",
                                                     absl::StatusCodeToString(code),
                                                     " cannot be retried"));
    }
    if (absl::StatusCodeToString(code).empty()) {
      return absl::InvalidArgumentError(absl::StrCat("CallOptions::retry_on: ",
                                                     static_cast<int>(code),
                                                     " is not an absl::StatusCode"));
    }
  }
  const RetryBackoff& backoff = settings.retry_backoff;
  if (backoff.initial < absl::ZeroDuration() || backoff.initial == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CallOptions::retry_backoff.initial must be finite and not negative, not ",
        absl::FormatDuration(backoff.initial)));
  }
  if (backoff.max < backoff.initial || backoff.max == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CallOptions::retry_backoff.max must be finite and not less than initial, not ",
        absl::FormatDuration(backoff.max)));
  }
  // Written so that a NaN fails too.
  if (!(backoff.multiplier >= 1 && backoff.multiplier <= 1e6)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CallOptions::retry_backoff.multiplier must be from 1 to 1e6, not ", backoff.multiplier));
  }
  if (!(backoff.jitter >= 0 && backoff.jitter <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CallOptions::retry_backoff.jitter must be from 0 to 1, not ", backoff.jitter));
  }
  return absl::OkStatus();
}

}  // namespace procpool::internal
