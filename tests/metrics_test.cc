// Metrics a user relies on: what stats() counts, metrics_text's Prometheus text (checked line by
// line), and the GET /metrics endpoint of PoolOptions::metrics_listen, with real workers (forked,
// or remote over loopback in metrics_tcp_test) and real sockets, hostile clients included.

#include "procpool/metrics.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/process_pool.h"
#include "tests/http_client.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

using testing::http_body;
using testing::http_exchange;
using testing::http_get;
using testing::http_status;
using testing::sample_value;

// Jobs: "square N" returns N*N; "wait PATH" returns 0 once PATH exists (giving up after 60 s);
// "die" SIGKILLs its own worker.
struct MetricsWorker {
  using Job = std::string;
  using Result = int64_t;
  absl::StatusOr<int64_t> run(const std::string& job) {
    if (job == "die") ::raise(SIGKILL);
    if (absl::StartsWith(job, "wait ")) {
      const std::string path = job.substr(5);
      testing::wait_until([&] { return testing::file_exists(path); }, absl::Seconds(60));
      return 0;
    }
    int64_t n = 0;
    if (!absl::SimpleAtoi(job.substr(job.find(' ') + 1), &n)) return absl::InvalidArgumentError(job);
    return n * n;
  }
};

std::vector<std::string> squares(int n) {
  std::vector<std::string> jobs;
  for (int i = 0; i < n; ++i) jobs.push_back(absl::StrCat("square ", i));
  return jobs;
}

// Checks the exposition format line by line (Prometheus text format 0.0.4): every line is a HELP,
// a TYPE or a sample; a family's HELP and TYPE come before its samples, once; every sample has
// the pool label first; counters end in _total; histogram samples are _bucket/_sum/_count.
void check_format(const std::string& text, const std::string& pool_label) {
  REQUIRE(!text.empty());
  CHECK(text.back() == '\n');
  std::set<std::string> helped, typed;
  std::string family, type;
  for (const absl::string_view line : absl::StrSplit(text.substr(0, text.size() - 1), '\n')) {
    INFO("line: ", std::string(line));
    if (absl::StartsWith(line, "# HELP ")) {
      const std::vector<absl::string_view> words = absl::StrSplit(line, absl::MaxSplits(' ', 3));
      REQUIRE(words.size() == 4);
      family = std::string(words[2]);
      CHECK(helped.insert(family).second);
      CHECK(absl::StartsWith(family, "procpool_"));
      continue;
    }
    if (absl::StartsWith(line, "# TYPE ")) {
      const std::vector<std::string> words = absl::StrSplit(line, ' ');
      REQUIRE(words.size() == 4);
      CHECK(words[2] == family);  // right after its HELP
      CHECK(typed.insert(words[2]).second);
      type = words[3];
      CHECK((type == "counter" || type == "gauge" || type == "histogram"));
      if (type == "counter") CHECK(absl::EndsWith(family, "_total"));
      if (type != "counter") CHECK(!absl::EndsWith(family, "_total"));
      continue;
    }
    CHECK(!absl::StartsWith(line, "#"));
    const size_t brace = line.find('{');
    REQUIRE(brace != absl::string_view::npos);
    const std::string name(line.substr(0, brace));
    if (type == "histogram") {
      CHECK((name == family + "_bucket" || name == family + "_sum" || name == family + "_count"));
    } else {
      CHECK(name == family);
    }
    CHECK(absl::StartsWith(line.substr(brace + 1), pool_label));
    const size_t close = line.rfind("} ");
    REQUIRE(close != absl::string_view::npos);
    double value = 0;
    CHECK(absl::SimpleAtod(line.substr(close + 2), &value));
  }
  CHECK(helped == typed);
}

PoolStats example_stats() {
  PoolStats stats;
  stats.tasks_submitted = 12;
  stats.tasks_done = 7;
  stats.tasks_failed = 2;
  stats.tasks_queued = 2;
  stats.tasks_running = 1;
  stats.workers_restarted = 3;
  stats.bytes_sent = 4096;
  stats.bytes_received = 2048;
  stats.task_run_time.add(4, absl::Microseconds(4 * 300));   // 300 us each: (250us, 500us]
  stats.task_run_time.add(1, absl::Seconds(2));               // (1s, 2.5s]
  WorkerStats busy;
  busy.slot = 0;
  busy.pid = 100;
  busy.state = WorkerState::kBusy;
  busy.tasks_done = 5;
  busy.time_busy = absl::Milliseconds(1500);
  busy.host = "node-a";
  busy.resident_bytes = 1 << 20;
  busy.restarts = 3;
  busy.last_exit = "was killed by signal 9 (SIGKILL)";
  WorkerStats idle = busy;
  idle.slot = 1;
  idle.state = WorkerState::kIdle;
  idle.host = "node-b";
  idle.resident_bytes = 0;  // unknown: no sample
  idle.restarts = 0;
  idle.last_exit = "";
  stats.workers = {busy, idle};
  stats.hosts = {HostStats{.host = "node-a", .workers = 1, .busy = 1},
                 HostStats{.host = "node-b", .workers = 1}};
  return stats;
}

TEST_CASE("metrics_text is Prometheus text: HELP and TYPE per family, a pool label, counters _total") {
  const std::string text = metrics_text(example_stats(), "indexer");
  check_format(text, "pool=\"indexer\"");
  const std::vector<std::string> lines = absl::StrSplit(text, '\n');
  const auto has = [&](const std::string& line) {
    INFO("missing: ", line);
    CHECK(std::find(lines.begin(), lines.end(), line) != lines.end());
  };
  has("# TYPE procpool_tasks_done_total counter");
  has("procpool_tasks_submitted_total{pool=\"indexer\"} 12");
  has("procpool_tasks_done_total{pool=\"indexer\"} 7");
  has("procpool_tasks_failed_total{pool=\"indexer\"} 2");
  has("procpool_tasks_queued{pool=\"indexer\"} 2");
  has("procpool_tasks_running{pool=\"indexer\"} 1");
  has("procpool_workers_restarted_total{pool=\"indexer\"} 3");
  has("procpool_sent_bytes_total{pool=\"indexer\"} 4096");
  has("procpool_received_bytes_total{pool=\"indexer\"} 2048");
  has("procpool_workers{pool=\"indexer\",host=\"node-a\",state=\"busy\"} 1");
  has("procpool_workers{pool=\"indexer\",host=\"node-a\",state=\"idle\"} 0");
  has("procpool_workers{pool=\"indexer\",host=\"node-b\",state=\"idle\"} 1");
  has("procpool_worker_tasks_done_total{pool=\"indexer\",worker=\"0\",host=\"node-a\"} 5");
  has("procpool_worker_busy_seconds_total{pool=\"indexer\",worker=\"0\",host=\"node-a\"} 1.5");
  has("procpool_worker_restarts_total{pool=\"indexer\",worker=\"0\",host=\"node-a\"} 3");
  has("procpool_worker_resident_bytes{pool=\"indexer\",worker=\"0\",host=\"node-a\"} 1048576");
  has("procpool_worker_last_exit_info{pool=\"indexer\",worker=\"0\","
      "cause=\"was killed by signal 9 (SIGKILL)\"} 1");
  // Unknown memory and a slot whose process never ended have no sample, rather than a false 0.
  CHECK(!sample_value(text, "procpool_worker_resident_bytes", "worker=\"1\""));
  CHECK(!sample_value(text, "procpool_worker_last_exit_info", "worker=\"1\""));
}

TEST_CASE("metrics_text escapes label values and replaces bytes that are not UTF-8") {
  PoolStats stats = example_stats();
  stats.workers[0].last_exit = "said \"no\"\nthen \\ left";
  stats.workers[1].host = "caf\xC3\xA9-\xFF\xC3";  // valid é, then a stray byte and a cut sequence
  stats.hosts[1].host = stats.workers[1].host;
  const std::string text = metrics_text(stats, "a\"b\\c\nd");
  check_format(text, "pool=\"a\\\"b\\\\c\\nd\"");
  CHECK(absl::StrContains(text, "cause=\"said \\\"no\\\"\\nthen \\\\ left\"} 1\n"));
  CHECK(absl::StrContains(text, "host=\"caf\xC3\xA9-\xEF\xBF\xBD\xEF\xBF\xBD\""));
  // Nothing raw is left: every line is one sample or comment.
  CHECK(!absl::StrContains(text, "\xFF"));
}

TEST_CASE("the run-time histogram is cumulative up to +Inf, with _sum and _count, and gives quantiles") {
  PoolStats stats;
  RunTimeHistogram& h = stats.task_run_time;
  h.add(100, absl::Microseconds(100 * 1500));  // 1.5 ms each: the (1ms, 2.5ms] bucket
  h.add(1, absl::Seconds(20));                 // (10s, 30s]
  h.add(1, absl::Hours(2));                    // over every bound
  h.add(0, absl::Seconds(1));                  // nothing
  CHECK(h.count == 102);
  CHECK(h.sum == absl::Microseconds(150'000) + absl::Seconds(20) + absl::Hours(2));
  CHECK(h.counts[3] == 0);
  CHECK(h.counts[4] == 100);
  CHECK(h.counts.back() == 1);
  // The median lies in (1ms, 2.5ms], interpolated; the top quantile is capped at the last bound.
  const absl::Duration median = h.quantile(0.5);
  CHECK(median > absl::Milliseconds(1));
  CHECK(median <= absl::Microseconds(2500));
  CHECK(absl::AbsDuration(h.quantile(0.5) - absl::Nanoseconds(1'765'000)) < absl::Microseconds(1));
  CHECK(h.quantile(1.0) == absl::Hours(1));
  CHECK(RunTimeHistogram().quantile(0.9) == absl::ZeroDuration());

  const std::string text = metrics_text(stats, "p");
  check_format(text, "pool=\"p\"");
  double last = -1;
  int buckets = 0;
  for (const absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, "procpool_task_run_seconds_bucket{")) continue;
    double value = 0;
    REQUIRE(absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &value));
    CHECK(value >= last);
    last = value;
    ++buckets;
  }
  CHECK(buckets == static_cast<int>(RunTimeHistogram::kBoundsNs.size()) + 1);
  CHECK(sample_value(text, "procpool_task_run_seconds_bucket", "le=\"0.001\"") == 0);
  CHECK(sample_value(text, "procpool_task_run_seconds_bucket", "le=\"0.0025\"") == 100);
  CHECK(sample_value(text, "procpool_task_run_seconds_bucket", "le=\"30\"") == 101);
  CHECK(sample_value(text, "procpool_task_run_seconds_bucket", "le=\"+Inf\"") == 102);
  CHECK(sample_value(text, "procpool_task_run_seconds_count") == 102);
  CHECK(sample_value(text, "procpool_task_run_seconds_sum") == doctest::Approx(7220.15));
}

TEST_CASE("stats() counts queued and running tasks, hosts, restarts, the last exit and memory") {
  testing::TempDir dir;
  const std::string flag = dir.file("go");
  ProcessPool<MetricsWorker> pool(
      testing::on_link({.workers = 1, .metrics_listen = "127.0.0.1:0"}));
  REQUIRE(pool.apply("square 3").value() == 9);

  // One task holds the only worker: the rest wait.
  auto held = pool.map_async({absl::StrCat("wait ", flag), "square 2", "square 3", "square 4"},
                             {.chunksize = 1});
  PoolStats stats;
  CHECK(testing::wait_until([&] {
    stats = pool.stats();
    return stats.tasks_running == 1 && stats.tasks_queued == 3;
  }, absl::Seconds(60)));
  CHECK(stats.workers[0].state == WorkerState::kBusy);
  testing::append_line(flag, "go");
  REQUIRE(held.get().ok());
  stats = pool.stats();
  CHECK(stats.tasks_running == 0);
  CHECK(stats.tasks_queued == 0);
  CHECK(stats.tasks_done == 5);
  CHECK(stats.task_run_time.count == 5);

  // The worker dies: its slot counts a restart and says how the last one ended.
  CHECK(pool.apply("die").status().code() == absl::StatusCode::kAborted);
  CHECK(testing::wait_until([&] {
    stats = pool.stats();
    return stats.workers[0].restarts == 1 && stats.workers[0].resident_bytes > 0;
  }, absl::Seconds(60)));
  CHECK(stats.workers_restarted == 1);
  CHECK(absl::StrContains(stats.workers[0].last_exit, "signal 9"));
  CHECK(stats.tasks_failed == 1);
  CHECK(stats.tasks_running + stats.tasks_queued == 0);
  REQUIRE(stats.hosts.size() == 1);
  CHECK(!stats.hosts[0].host.empty());
  CHECK(stats.hosts[0].host == stats.workers[0].host);
  CHECK(stats.hosts[0].workers == 1);
  CHECK(stats.hosts[0].restarts == 1);
  CHECK(stats.hosts[0].resident_bytes == stats.workers[0].resident_bytes);
  CHECK(stats.bytes_sent > 0);
  CHECK(stats.bytes_received > 0);
}

TEST_CASE("GET /metrics serves the pool's counters: tasks done equal the tasks it ran") {
  ProcessPool<MetricsWorker> pool(
      testing::on_link({.workers = 2, .name = "scraped", .metrics_listen = "127.0.0.1:0"}));
  const std::string address = pool.metrics_address();
  REQUIRE(absl::StartsWith(address, "127.0.0.1:"));
  CHECK(!absl::EndsWith(address, ":0"));

  REQUIRE(pool.map(squares(300)).ok());
  const std::string answer = http_get(address, "/metrics");
  REQUIRE(http_status(answer) == 200);
  CHECK(absl::StrContains(answer, "Content-Type: text/plain; version=0.0.4"));
  const std::string body = http_body(answer);
  check_format(body, "pool=\"scraped\"");
  CHECK(sample_value(body, "procpool_tasks_done_total") == 300);
  CHECK(sample_value(body, "procpool_tasks_submitted_total") == 300);
  CHECK(sample_value(body, "procpool_tasks_failed_total") == 0);
  CHECK(sample_value(body, "procpool_task_run_seconds_count") == 300);
  CHECK(sample_value(body, "procpool_task_run_seconds_bucket", "le=\"+Inf\"") == 300);
  CHECK(*sample_value(body, "procpool_sent_bytes_total") > 0);
  CHECK(*sample_value(body, "procpool_received_bytes_total") > 0);
  // Two slots, by state and host.
  INFO(body);
  CHECK(testing::sample_sum(body, "procpool_workers") == 2);
  // Each worker's own count (a remote worker's comes with its heartbeats: wait for it).
  CHECK(testing::wait_until(
      [&] {
        return testing::sample_sum(http_body(http_get(address, "/metrics")),
                                   "procpool_worker_tasks_done_total") == 300;
      },
      absl::Seconds(60)));

  // A later scrape sees later work; HEAD gets the head alone.
  REQUIRE(pool.map(squares(20)).ok());
  CHECK(sample_value(http_body(http_get(address, "/metrics?x=1")), "procpool_tasks_done_total") ==
        320);
  const std::string head = http_exchange(address, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(http_status(head) == 200);
  CHECK(http_body(head).empty());
  // The absolute form, which a server must accept (RFC 9112, 3.2.2) and a proxy sends.
  const std::string absolute = http_exchange(
      address, absl::StrCat("GET http://", address, "/metrics?x=1 HTTP/1.1\r\nHost: ", address,
                            "\r\n\r\n"));
  CHECK(http_status(absolute) == 200);
  CHECK(sample_value(http_body(absolute), "procpool_tasks_done_total") == 320);
  CHECK(http_status(http_exchange(address, "GET HTTP://x/metrics HTTP/1.1\r\n\r\n")) == 200);
}

TEST_CASE("the metrics endpoint answers 404 for other paths, 405, 400 and 431 for bad requests") {
  ProcessPool<MetricsWorker> pool(testing::on_link({.workers = 1, .metrics_listen = "127.0.0.1:0"}));
  const std::string address = pool.metrics_address();
  CHECK(http_status(http_get(address, "/")) == 404);
  CHECK(http_status(http_get(address, "/metricsx")) == 404);
  CHECK(http_status(http_get(address, "/api/v1/query")) == 404);
  CHECK(http_status(http_get(address, "http://x")) == 404);  // absolute form, path "/"
  CHECK(http_status(http_get(address, "http://x?metrics")) == 404);
  CHECK(http_status(http_get(address, "http://x/other/metrics")) == 404);
  CHECK(http_status(http_get(address, "ftp://x/metrics")) == 404);
  CHECK(http_status(http_exchange(address, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")) ==
        405);
  CHECK(http_status(http_exchange(address, "garbage\r\n\r\n")) == 400);
  CHECK(http_status(http_exchange(address, "GET /metrics SMTP\r\n\r\n")) == 400);
  // A head that never ends is cut at 8 KiB, not buffered without bound.
  CHECK(http_status(http_exchange(address, "GET /metrics HTTP/1.1\r\nX: " +
                                               std::string(100'000, 'a'))) == 431);
  // The pool is none the worse.
  CHECK(http_status(http_get(address, "/metrics")) == 200);
  CHECK(pool.apply("square 5").value() == 25);
}

TEST_CASE("a HEAD request gets no body, also when it is answered 400, 404 or 431") {
  // A client reads nothing after the head of a HEAD response (RFC 9112, 6.3); a 400 or a 431
  // used to carry its body anyway (found by tests/fuzz/metrics_request_fuzzer.cc).
  ProcessPool<MetricsWorker> pool(testing::on_link({.workers = 1, .metrics_listen = "127.0.0.1:0"}));
  const std::string address = pool.metrics_address();
  SUBCASE("a bad request line: 400") {
    const std::string answer = http_exchange(address, "HEAD /metrics HTTP/2.0\r\n\r\n");
    CHECK(http_status(answer) == 400);
    CHECK(http_body(answer).empty());
  }
  SUBCASE("another path: 404") {
    const std::string answer = http_exchange(address, "HEAD /other HTTP/1.1\r\n\r\n");
    CHECK(http_status(answer) == 404);
    CHECK(http_body(answer).empty());
  }
  SUBCASE("a head too long: 431") {
    const std::string answer = http_exchange(
        address, "HEAD /metrics HTTP/1.1\r\nX: " + std::string(100'000, 'a'));
    CHECK(http_status(answer) == 431);
    CHECK(http_body(answer).empty());
  }
  SUBCASE("GET still gets the body of a 400 and of a 431") {
    CHECK(http_body(http_exchange(address, "GET /metrics HTTP/2.0\r\n\r\n")) == "bad request\n");
    CHECK(http_body(http_exchange(address, "GET /metrics HTTP/1.1\r\nX: " +
                                               std::string(100'000, 'a'))) ==
          "request too large\n");
  }
}

TEST_CASE("clients that connect and send nothing stall neither map() nor the next scrape") {
  ProcessPool<MetricsWorker> pool(testing::on_link({.workers = 2, .metrics_listen = "127.0.0.1:0"}));
  const std::string address = pool.metrics_address();
  // More silent connections than the server holds, and one that stops mid-request.
  std::vector<int> silent;
  for (int i = 0; i < 40; ++i) {
    const int fd = testing::connect_to(address);
    REQUIRE(fd >= 0);
    silent.push_back(fd);
  }
  const int partial = testing::connect_to(address);
  REQUIRE(partial >= 0);
  const std::string half = "GET /metr";
  REQUIRE(::send(partial, half.data(), half.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(half.size()));

  REQUIRE(pool.map(squares(200)).ok());
  // The newest connection pushes out the oldest silent one: a scraper always gets in.
  const std::string answer = http_get(address, "/metrics");
  REQUIRE(http_status(answer) == 200);
  CHECK(sample_value(http_body(answer), "procpool_tasks_done_total") == 200);
  for (const int fd : silent) ::close(fd);
  ::close(partial);
}

TEST_CASE("a metrics_listen that is not an address is kInvalidArgument; a port in use says so") {
  SUBCASE("not an address") {
    for (const char* bad : {"localhost", "127.0.0.1:99999", "1.2.3.4:x", "::1:80"}) {
      INFO(bad);
      ProcessPool<MetricsWorker> pool(testing::on_link({.workers = 1, .metrics_listen = bad}));
      const absl::Status status = pool.apply("square 2").status();
      CHECK(status.code() == absl::StatusCode::kInvalidArgument);
      CHECK(absl::StrContains(status.message(), "metrics_listen"));
      CHECK(pool.metrics_address().empty());
    }
  }
  SUBCASE("a port in use") {
    ProcessPool<MetricsWorker> first(testing::on_link({.workers = 1, .metrics_listen = "127.0.0.1:0"}));
    ProcessPool<MetricsWorker> second(
        testing::on_link({.workers = 1, .metrics_listen = first.metrics_address()}));
    const absl::Status status = second.apply("square 2").status();
    CHECK(status.code() == absl::StatusCode::kUnavailable);
    CHECK(absl::StrContains(status.message(), "metrics_listen"));
    CHECK(absl::StrContains(status.message(), first.metrics_address()));
    CHECK(absl::StrContains(absl::AsciiStrToLower(status.message()), "in use"));
    CHECK(first.apply("square 2").value() == 4);
  }
  SUBCASE("a bare port means loopback") {
    ProcessPool<MetricsWorker> pool(testing::on_link({.workers = 1, .metrics_listen = ":0"}));
    CHECK(absl::StartsWith(pool.metrics_address(), "127.0.0.1:"));
    CHECK(pool.apply("square 2").value() == 4);
  }
}

}  // namespace
}  // namespace procpool
