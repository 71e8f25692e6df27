// Seeing inside workers: what a worker prints (forwarded to the pool's log sink, line by line,
// with the worker's name), what its code logs (procpool::log, delivered before the task's
// result), the stack of a worker that crashes (on the task's status, and in one error event), and
// the pool's metrics, served for Prometheus (PoolOptions::metrics_listen) and scraped once here.
//
//   bazel run //examples/observability
//
// Prints, among the pool's own lines:
//   [parser-w0] parsing record 3                     <- the worker's printf, forwarded
//   [procpool +0.004s parser-w1 pid 4242 task 2] info: record 2 has 2 fields
//   task 5 crashed: ... was killed by signal 11 (SIGSEGV) while running this task
//   #0 0x... crash_here(long)                        <- its stack, symbolized
//   #1 0x... Parser::run(long)
//   metrics at 127.0.0.1:41234/metrics:              <- a free port: metrics_address() says which
//   procpool_tasks_done_total{pool="parser"} 7

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "procpool/procpool.h"

// Not inlined, so that the crash's stack names it.
[[gnu::noinline]] int64_t crash_here(int64_t record) {
  volatile int64_t* nowhere = nullptr;
  *nowhere = record;  // SIGSEGV
  return record;
}

// What Prometheus would read: GET /metrics from "host:port", the whole answer ("" if none came).
std::string scrape(const std::string& address) {
  const size_t colon = address.rfind(':');
  addrinfo* found = nullptr;
  if (colon == std::string::npos ||
      ::getaddrinfo(address.substr(0, colon).c_str(), address.substr(colon + 1).c_str(), nullptr,
                    &found) != 0) {
    return "";
  }
  const int fd = ::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  std::string answer;
  if (fd >= 0 && ::connect(fd, found->ai_addr, found->ai_addrlen) == 0) {
    const std::string request =
        absl::StrCat("GET /metrics HTTP/1.1\r\nHost: ", address, "\r\nConnection: close\r\n\r\n");
    const ssize_t sent = ::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
    char buffer[4096];
    ssize_t got = 0;
    while (sent == static_cast<ssize_t>(request.size()) &&
           (got = ::recv(fd, buffer, sizeof(buffer), 0)) > 0) {
      answer.append(buffer, static_cast<size_t>(got));
    }
  }
  if (fd >= 0) ::close(fd);
  ::freeaddrinfo(found);
  return answer;
}

struct Parser {
  void enter() { procpool::log(procpool::LogSeverity::kInfo, "parser ready"); }
  int64_t run(int64_t record) {
    std::printf("parsing record %lld\n", static_cast<long long>(record));
    procpool::log(procpool::LogSeverity::kInfo,
                  absl::StrCat("record ", record, " has ", record % 3, " fields"));
    if (record == 5) return crash_here(record);
    return record % 3;
  }
};

int main() {
  // The default sink (log_to_stderr) prints forwarded lines to this program's stdout/stderr with
  // the worker's name, records of procpool::log whatever their severity, and the pool's warnings
  // and errors (the crash's stack among them).
  // metrics_listen: GET /metrics on that address, on port 0 a free one (metrics_address()).
  procpool::ProcessPool<Parser> pool({.workers = 2,
                                      .name = "parser",
                                      .worker_output = procpool::WorkerOutput::kForward,
                                      .metrics_listen = "127.0.0.1:0"});
  std::vector<int64_t> records = {0, 1, 2, 3, 4, 5, 6, 7};
  int failed = 0;
  for (absl::StatusOr<int64_t> fields : pool.imap(records)) {
    if (fields.ok()) continue;
    ++failed;
    std::printf("a task crashed: %s\n", std::string(fields.status().message()).c_str());
    if (std::optional<std::string> stack = procpool::backtrace_of(fields.status())) {
      std::printf("its stack:\n%s", stack->c_str());
    }
  }
  // One scrape, as Prometheus would make it: the tasks done so far, in its text format.
  const std::string address = pool.metrics_address();
  const std::string metrics = scrape(address);
  std::printf("metrics at %s/metrics:\n", address.c_str());
  bool counted = false;
  for (absl::string_view line : absl::StrSplit(metrics, '\n')) {
    if (!absl::StartsWith(line, "procpool_tasks_done_total")) continue;
    std::printf("%.*s\n", static_cast<int>(line.size()), line.data());
    counted = true;
  }
  std::fflush(stdout);
  return failed == 1 && counted ? 0 : 1;
}
