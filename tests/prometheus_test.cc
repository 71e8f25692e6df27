// A real Prometheus scrapes a pool's GET /metrics (PoolOptions::metrics_listen): it is started
// with a scrape config pointing at the pool, the pool runs N tasks, and Prometheus's own HTTP API
// must then answer procpool_tasks_done_total == N. Needs the `prometheus` binary (Debian's
// package, installed by tools/install_deps.sh; PROCPOOL_PROMETHEUS names another); without it the
// case says so and passes.

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "doctest/doctest.h"
#include "procpool/metrics.h"
#include "procpool/process_pool.h"
#include "tests/http_client.h"
#include "tests/test_link.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

struct Squarer {
  using Job = int64_t;
  using Result = int64_t;
  int64_t run(int64_t x) { return x * x; }
};

std::string find_prometheus() {
  if (const char* named = std::getenv("PROCPOOL_PROMETHEUS"); named != nullptr && *named != '\0') {
    return ::access(named, X_OK) == 0 ? named : "";
  }
  for (const char* path : {"/usr/bin/prometheus", "/usr/local/bin/prometheus"}) {
    if (::access(path, X_OK) == 0) return path;
  }
  return "";
}

// A loopback port nobody listens on now (bound, read, closed: another process could take it in
// between, which would make Prometheus fail to start and this test say so).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(addr);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) != 0) {
    if (fd >= 0) ::close(fd);
    return 0;
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

// A Prometheus server run for one test: started with `args`, its output in `log`; stopped with
// SIGTERM (SIGKILL after 10 s) and reaped when destroyed.
class PrometheusProcess {
 public:
  PrometheusProcess(const std::vector<std::string>& args, const std::string& log) {
    std::vector<char*> argv;
    for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (out >= 0) {
        ::dup2(out, STDOUT_FILENO);
        ::dup2(out, STDERR_FILENO);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ~PrometheusProcess() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (::waitpid(pid_, nullptr, WNOHANG) == 0) {
      if (absl::Now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
        break;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  bool started() const { return pid_ > 0; }
  // False once it exited (it could not start: its log says why).
  bool running() const {
    int status = 0;
    return pid_ > 0 && ::waitpid(pid_, &status, WNOHANG) == 0;
  }

 private:
  pid_t pid_ = -1;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The value of an instant query's single result from Prometheus's JSON
// ({"status":"success","data":{"resultType":"vector","result":[{"metric":{...},"value":[1700000000.123,"300"]}]}}),
// or -1 when there is none yet.
double query_value(const std::string& json) {
  const size_t value = json.find("\"value\":[");
  if (value == std::string::npos) return -1;
  const size_t open = json.find('"', json.find(',', value));
  const size_t close = json.find('"', open + 1);
  double number = -1;
  if (open == std::string::npos || close == std::string::npos ||
      !absl::SimpleAtod(json.substr(open + 1, close - open - 1), &number)) {
    return -1;
  }
  return number;
}

TEST_CASE("a real Prometheus scrapes the pool: procpool_tasks_done_total equals the tasks run") {
  const std::string prometheus = find_prometheus();
  if (prometheus.empty()) {
    MESSAGE("skipped: no prometheus binary (apt-get install prometheus, or set PROCPOOL_PROMETHEUS)");
    return;
  }
  testing::TempDir dir;
  ProcessPool<Squarer> pool(
      testing::on_link({.workers = 2, .name = "scraped", .metrics_listen = "127.0.0.1:0"}));
  const std::string target = pool.metrics_address();
  REQUIRE(!target.empty());

  const std::string config = dir.file("prometheus.yml");
  std::ofstream(config) << "global:\n"
                           "  scrape_interval: 1s\n"
                           "  scrape_timeout: 1s\n"
                           "scrape_configs:\n"
                           "  - job_name: procpool\n"
                           "    static_configs:\n"
                           "      - targets: ['" << target << "']\n";
  const int port = free_port();
  REQUIRE(port > 0);
  const std::string web = absl::StrCat("127.0.0.1:", port);
  const std::string log = dir.file("prometheus.log");
  PrometheusProcess server({prometheus, absl::StrCat("--config.file=", config),
                            absl::StrCat("--storage.tsdb.path=", dir.file("data")),
                            absl::StrCat("--web.listen-address=", web), "--log.level=warn"},
                           log);
  REQUIRE(server.started());

  constexpr int kTasks = 500;
  std::vector<int64_t> jobs(kTasks);
  for (int i = 0; i < kTasks; ++i) jobs[i] = i;
  REQUIRE(pool.map(jobs).ok());

  // Scraped every second; the answer must come within a minute even on a loaded machine.
  const std::string query =
      "/api/v1/query?query=procpool_tasks_done_total%7Bpool%3D%22scraped%22%2Cjob%3D%22procpool%22%7D";
  std::string last;
  const bool seen = testing::wait_until(
      [&] {
        if (!server.running()) return false;
        last = testing::http_body(testing::http_get(web, query));
        if (query_value(last) == kTasks) return true;
        absl::SleepFor(absl::Milliseconds(200));
        return false;
      },
      absl::Seconds(60));
  if (!seen) {
    INFO("prometheus log: ", read_file(log));
    INFO("last answer: ", last);
    INFO("targets: ", testing::http_body(testing::http_get(web, "/api/v1/targets")));
    CHECK(server.running());
  }
  CHECK(seen);
  // The histogram made it through Prometheus's parser too.
  const std::string count = testing::http_body(testing::http_get(
      web, "/api/v1/query?query=procpool_task_run_seconds_count%7Bpool%3D%22scraped%22%7D"));
  CHECK(query_value(count) == kTasks);
}

}  // namespace
}  // namespace procpool
