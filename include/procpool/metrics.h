/// \file
/// `metrics_text`: a `PoolStats` snapshot as Prometheus text (exposition format 0.0.4), what a
/// pool serves on `GET /metrics` when `PoolOptions::metrics_listen` is set.
///
/// ```cpp
/// procpool::ProcessPool<Squarer> pool({.workers = 4, .metrics_listen = "127.0.0.1:9464"});
/// // curl http://127.0.0.1:9464/metrics, or a Prometheus scrape job with that target; or by hand:
/// std::string text = procpool::metrics_text(pool.stats(), "indexer");
/// ```
///
/// Every series is named `procpool_...` and carries a `pool` label (`pool_name`); counters end in
/// `_total`. What is exported (each with its HELP and TYPE lines; docs/guide.md, "Metrics"):
///
/// | series | type | labels |
/// |---|---|---|
/// | `procpool_tasks_submitted_total`, `procpool_tasks_done_total`, `procpool_tasks_failed_total` | counter | pool |
/// | `procpool_tasks_queued`, `procpool_tasks_running` | gauge | pool |
/// | `procpool_workers_restarted_total` | counter | pool |
/// | `procpool_sent_bytes_total`, `procpool_received_bytes_total` | counter | pool |
/// | `procpool_task_run_seconds` (`_bucket`, `_sum`, `_count`) | histogram | pool, le |
/// | `procpool_workers` | gauge | pool, host, state |
/// | `procpool_worker_tasks_done_total`, `procpool_worker_busy_seconds_total` (per process: they restart at 0 with it) | counter | pool, worker, host |
/// | `procpool_worker_restarts_total` | counter | pool, worker, host |
/// | `procpool_worker_resident_bytes` (where known) | gauge | pool, worker, host |
/// | `procpool_worker_last_exit_info` (1, once a process of the slot ended) | gauge | pool, worker, cause |
///
/// Label values are escaped as the format requires (backslash, double quote, newline) and bytes
/// that are not UTF-8 become U+FFFD, so a host name or exit cause can never break the page.
/// Thread-safe (a pure function); never fails.

#ifndef PROCPOOL_METRICS_H_
#define PROCPOOL_METRICS_H_

#include <string>
#include <string_view>

#include "procpool/pool_stats.h"

namespace procpool {

/// Prometheus text exposition (format 0.0.4) of `stats`, each series labelled
/// `pool` (the value of `pool_name`). Serve it with `Content-Type: text/plain; version=0.0.4`.
std::string metrics_text(const PoolStats& stats, std::string_view pool_name);

}  // namespace procpool

#endif  // PROCPOOL_METRICS_H_
