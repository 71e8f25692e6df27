// Prometheus text exposition of a PoolStats snapshot (procpool/metrics.h), and the quantiles of
// its run-time histogram (procpool/pool_stats.h).

#include "procpool/metrics.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "procpool/pool_stats.h"

namespace procpool {
namespace {

// Appends `text` with invalid UTF-8 replaced by U+FFFD: the format is UTF-8, and one bad byte in
// a label (a remote host's name, an exit cause) must not make a scraper drop the whole page.
void append_utf8(std::string& out, std::string_view text, bool label) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte < 0x80) {
      if (byte == '\\') {
        out += "\\\\";
      } else if (byte == '\n') {
        out += "\\n";
      } else if (byte == '"' && label) {
        out += "\\\"";
      } else {
        out += static_cast<char>(byte);
      }
      ++i;
      continue;
    }
    // The length of a well-formed sequence starting here (RFC 3629: no overlongs, no surrogates,
    // nothing above U+10FFFF), or 0.
    size_t length = 0;
    if (byte >= 0xC2 && byte <= 0xDF) length = 2;
    else if (byte >= 0xE0 && byte <= 0xEF) length = 3;
    else if (byte >= 0xF0 && byte <= 0xF4) length = 4;
    bool valid = length != 0 && i + length <= text.size();
    for (size_t k = 1; valid && k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      unsigned char low = 0x80, high = 0xBF;
      if (k == 1 && byte == 0xE0) low = 0xA0;
      if (k == 1 && byte == 0xED) high = 0x9F;
      if (k == 1 && byte == 0xF0) low = 0x90;
      if (k == 1 && byte == 0xF4) high = 0x8F;
      valid = next >= low && next <= high;
    }
    if (valid) {
      out.append(text.substr(i, length));
      i += length;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
}

// A float the way Prometheus parses it: short, and exact enough for sums of seconds.
std::string format_double(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  return absl::StrFormat("%.15g", value);
}

// One family at a time: its HELP and TYPE lines, then its samples, each with the pool's label.
class Writer {
 public:
  explicit Writer(std::string_view pool_name) {
    pool_label_ = "pool=\"";
    append_utf8(pool_label_, pool_name, /*label=*/true);
    pool_label_ += '"';
  }

  void family(std::string_view name, std::string_view type, std::string_view help) {
    out_.append("# HELP ").append(name).append(" ");
    append_utf8(out_, help, /*label=*/false);
    out_.append("\n# TYPE ").append(name).append(" ").append(type).append("\n");
  }

  // `labels`: pairs of (name, value) after the pool's.
  template <typename Value>
  void sample(std::string_view name,
              std::initializer_list<std::pair<std::string_view, std::string_view>> labels,
              Value value) {
    out_.append(name).append("{").append(pool_label_);
    for (const auto& [label, text] : labels) {
      out_.append(",").append(label).append("=\"");
      append_utf8(out_, text, /*label=*/true);
      out_ += '"';
    }
    out_ += "} ";
    if constexpr (std::is_floating_point_v<Value>) {
      out_ += format_double(value);
    } else {
      absl::StrAppend(&out_, value);
    }
    out_ += '\n';
  }

  // A family of one sample with only the pool's label.
  template <typename Value>
  void single(std::string_view name, std::string_view type, std::string_view help, Value value) {
    family(name, type, help);
    sample(name, {}, value);
  }

  std::string take() { return std::move(out_); }

 private:
  std::string pool_label_;
  std::string out_;
};

constexpr std::array<WorkerState, 5> kStates = {WorkerState::kStarting, WorkerState::kIdle,
                                                WorkerState::kBusy, WorkerState::kExiting,
                                                WorkerState::kDead};

}  // namespace

absl::Duration RunTimeHistogram::quantile(double q) const {
  if (count <= 0 || !(q >= 0)) return absl::ZeroDuration();
  if (q > 1) q = 1;
  // The rank of the quantile, then the bucket it falls in, and a straight line across that
  // bucket (from 0 for the first), as Prometheus's histogram_quantile.
  const double rank = q * static_cast<double>(count);
  int64_t below = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] == 0 || static_cast<double>(below + counts[i]) < rank) {
      below += counts[i];
      continue;
    }
    if (i == kBoundsNs.size()) return absl::Nanoseconds(kBoundsNs.back());
    const double low = i == 0 ? 0.0 : static_cast<double>(kBoundsNs[i - 1]);
    const double high = static_cast<double>(kBoundsNs[i]);
    const double fraction = (rank - static_cast<double>(below)) / static_cast<double>(counts[i]);
    return absl::Nanoseconds(static_cast<int64_t>(low + (high - low) * fraction));
  }
  return absl::Nanoseconds(kBoundsNs.back());
}

std::string metrics_text(const PoolStats& stats, std::string_view pool_name) {
  Writer out(pool_name);
  out.single("procpool_tasks_submitted_total", "counter",
             "Tasks the pool accepted since it was made.", stats.tasks_submitted);
  out.single("procpool_tasks_done_total", "counter", "Tasks that completed with a value.",
             stats.tasks_done);
  out.single("procpool_tasks_failed_total", "counter",
             "Tasks that completed with an error (any cause).", stats.tasks_failed);
  out.single("procpool_tasks_queued", "gauge",
             "Tasks accepted and not started (in the pool's queue or a worker's batch).",
             stats.tasks_queued);
  out.single("procpool_tasks_running", "gauge", "Tasks running in a worker now.",
             stats.tasks_running);
  out.single("procpool_workers_restarted_total", "counter",
             "Worker processes started in place of one that ended (death, timeout, recycling).",
             stats.workers_restarted);
  out.single("procpool_sent_bytes_total", "counter",
             "Bytes of the frames the pool sent its workers.", stats.bytes_sent);
  out.single("procpool_received_bytes_total", "counter",
             "Bytes of the frames the pool read from its workers.", stats.bytes_received);

  const RunTimeHistogram& run_time = stats.task_run_time;
  out.family("procpool_task_run_seconds", "histogram",
             "Run time of each task, as its worker measured it.");
  int64_t cumulative = 0;
  for (size_t i = 0; i < run_time.counts.size(); ++i) {
    cumulative += run_time.counts[i];
    const std::string le = i < RunTimeHistogram::kBoundsNs.size()
                               ? format_double(static_cast<double>(RunTimeHistogram::kBoundsNs[i]) / 1e9)
                               : "+Inf";
    out.sample("procpool_task_run_seconds_bucket", {{"le", le}}, cumulative);
  }
  out.sample("procpool_task_run_seconds_sum", {}, absl::ToDoubleSeconds(run_time.sum));
  out.sample("procpool_task_run_seconds_count", {}, run_time.count);

  out.family("procpool_workers", "gauge", "Worker slots by host and state.");
  for (const HostStats& host : stats.hosts) {
    for (const WorkerState state : kStates) {
      int count = 0;
      for (const WorkerStats& worker : stats.workers) {
        if (worker.host == host.host && worker.state == state) ++count;
      }
      out.sample("procpool_workers", {{"host", host.host}, {"state", to_string(state)}}, count);
    }
  }

  const auto per_worker = [&](std::string_view name, std::string_view type, std::string_view help,
                              auto value_of, bool known_only) {
    out.family(name, type, help);
    for (const WorkerStats& worker : stats.workers) {
      const auto value = value_of(worker);
      if (known_only && value == 0) continue;
      const std::string slot = absl::StrCat(worker.slot);
      out.sample(name, {{"worker", slot}, {"host", worker.host}}, value);
    }
  };
  per_worker("procpool_worker_tasks_done_total", "counter",
             "Tasks the slot's current process completed (from 0 at each restart).",
             [](const WorkerStats& w) { return w.tasks_done; }, false);
  per_worker("procpool_worker_busy_seconds_total", "counter",
             "Time the slot's current process had work in hand (from 0 at each restart).",
             [](const WorkerStats& w) { return absl::ToDoubleSeconds(w.time_busy); }, false);
  per_worker("procpool_worker_restarts_total", "counter",
             "Processes the slot started after its first.",
             [](const WorkerStats& w) { return w.restarts; }, false);
  per_worker("procpool_worker_resident_bytes", "gauge",
             "Resident memory of the slot's process (RssAnon + RssFile), where known.",
             [](const WorkerStats& w) { return w.resident_bytes; }, true);

  out.family("procpool_worker_last_exit_info", "gauge",
             "1, labelled with how the slot's last process ended.");
  for (const WorkerStats& worker : stats.workers) {
    if (worker.last_exit.empty()) continue;
    const std::string slot = absl::StrCat(worker.slot);
    out.sample("procpool_worker_last_exit_info", {{"worker", slot}, {"cause", worker.last_exit}}, 1);
  }
  return out.take();
}

}  // namespace procpool
