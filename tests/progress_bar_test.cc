// ProgressBar: plain lines to a file or pipe, a line redrawn in place on a terminal (a real pty),
// throttling against a clock the test controls, thread safety, and use with a real map.

#include "procpool/progress_bar.h"

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <termios.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "doctest/doctest.h"
#include "procpool/procpool.h"
#include "tests/test_support.h"

namespace procpool {
namespace {

// A clock that moves only when the test says so.
class FakeClock {
 public:
  absl::Time now() {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }
  std::function<absl::Time()> source() {
    return [this] { return now(); };
  }

 private:
  absl::Mutex mu_;
  absl::Time now_ = absl::FromUnixSeconds(1'000'000);
};

// Everything written to a file so far.
std::string contents(const std::string& path) {
  std::string text;
  for (const std::string& line : testing::read_lines(path)) absl::StrAppend(&text, line, "\n");
  return text;
}

// A file opened for the bar, closed at the end of the test.
struct OutputFile {
  explicit OutputFile(const testing::TempDir& dir)
      : path(dir.file("progress")), fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644)) {}
  ~OutputFile() { ::close(fd); }
  std::string path;
  int fd;
};

TEST_CASE("to a file it writes plain lines, at most one per interval, and always the final one") {
  testing::TempDir dir;
  OutputFile out(dir);
  FakeClock clock;
  ProgressBar bar("indexing", {.fd = out.fd, .clock = clock.source()});
  CHECK_FALSE(bar.terminal());  // a file is no terminal

  bar(1, 10);                     // too soon: nothing
  clock.advance(absl::Seconds(6));  // past the 5 s default line interval
  bar(2, 10);
  bar(3, 10);                     // too soon after that one
  clock.advance(absl::Seconds(2));
  bar(10, 10);                    // the final state: always drawn
  bar(10, 10);                    // and only once
  CHECK(contents(out.path) ==
        "indexing: 2/10 (20%) 0.3/s elapsed 6.0s ETA 24.0s\n"
        "indexing: 10/10 (100%) 1.2/s elapsed 8.0s ETA 0.0s\n");
}

TEST_CASE("to a pipe it writes plain lines too, and long times read as minutes and hours") {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  FakeClock clock;
  ProgressBar bar("", {.fd = fds[1], .line_interval = absl::Minutes(1), .clock = clock.source()});
  CHECK_FALSE(bar.terminal());
  clock.advance(absl::Minutes(2) + absl::Seconds(5));
  bar(1, 100);
  clock.advance(absl::Hours(2));
  bar(100, 100);
  ::close(fds[1]);
  std::string text;
  char buffer[512];
  for (ssize_t n; (n = ::read(fds[0], buffer, sizeof(buffer))) > 0;) text.append(buffer, n);
  ::close(fds[0]);
  CHECK(text ==
        "1/100 (1%) 0.0/s elapsed 2m05s ETA 3h26m\n"
        "100/100 (100%) 0.0/s elapsed 2h02m ETA 0.0s\n");
}

// Reads what is available on `fd` within `timeout`, until `done(text)` holds.
template <typename Done>
std::string read_until(int fd, Done done, absl::Duration timeout = absl::Seconds(10)) {
  std::string text;
  const absl::Time deadline = absl::Now() + timeout;
  while (!done(text) && absl::Now() < deadline) {
    pollfd ready{fd, POLLIN, 0};
    if (::poll(&ready, 1, 100) <= 0) continue;
    char buffer[512];
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n > 0) text.append(buffer, n);
  }
  return text;
}

TEST_CASE("on a terminal it redraws one line in place and ends it with a newline") {
  int master = -1;
  int slave = -1;
  REQUIRE(::openpty(&master, &slave, nullptr, nullptr, nullptr) == 0);
  termios raw{};
  REQUIRE(::tcgetattr(slave, &raw) == 0);
  ::cfmakeraw(&raw);  // no \n -> \r\n translation: see the bytes as written
  REQUIRE(::tcsetattr(slave, TCSANOW, &raw) == 0);

  FakeClock clock;
  ProgressBar bar("copy", {.fd = slave, .width = 10, .clock = clock.source()});
  CHECK(bar.terminal());  // found by isatty
  clock.advance(absl::Seconds(1));
  bar(1, 4);
  bar(2, 4);  // within the 100 ms redraw interval: skipped
  clock.advance(absl::Seconds(1));
  bar(3, 4);
  bar(4, 4);
  const std::string text =
      read_until(master, [](const std::string& t) { return t.find('\n') != std::string::npos; });
  ::close(slave);
  ::close(master);
  CHECK(text ==
        "\rcopy [##........] 1/4  25%  1.0/s  elapsed 1.0s  ETA 3.0s\033[K"
        "\rcopy [#######...] 3/4  75%  1.5/s  elapsed 2.0s  ETA 0.7s\033[K"
        "\rcopy [##########] 4/4 100%  2.0/s  elapsed 2.0s  ETA 0.0s\033[K\n");
}

TEST_CASE("the style can be forced either way") {
  testing::TempDir dir;
  OutputFile out(dir);
  FakeClock clock;
  ProgressBar forced("f", {.fd = out.fd, .style = ProgressBar::Style::kTerminal, .width = 4,
                           .clock = clock.source()});
  CHECK(forced.terminal());
  forced(2, 2);
  CHECK(contents(out.path) == "\rf [####] 2/2 100%  0.0/s  elapsed 0.0s  ETA 0.0s\033[K\n");
  CHECK_FALSE(ProgressBar("p", {.fd = out.fd, .style = ProgressBar::Style::kPlain}).terminal());
}

TEST_CASE("several threads may report at once; lines never mix and the final one comes once") {
  testing::TempDir dir;
  OutputFile out(dir);
  ProgressBar bar("mt", {.fd = out.fd, .line_interval = absl::ZeroDuration()});
  constexpr size_t kTotal = 4000;
  std::atomic<size_t> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (size_t done; (done = next.fetch_add(1) + 1) <= kTotal;) bar(done, kTotal);
    });
  }
  for (std::thread& thread : threads) thread.join();
  int finals = 0;
  std::vector<std::string> lines = testing::read_lines(out.path);
  CHECK(lines.size() >= 1);
  for (const std::string& line : lines) {
    CHECK(line.rfind("mt: ", 0) == 0);
    CHECK(line.find("ETA") != std::string::npos);
    CHECK(line.find("mt: ", 1) == std::string::npos);
    if (line.rfind("mt: 4000/4000 (100%)", 0) == 0) ++finals;
  }
  CHECK(finals == 1);
  CHECK(lines.back().rfind("mt: 4000/4000 (100%)", 0) == 0);
}

struct Squarer {
  int64_t run(int64_t x) { return x * x; }
};

TEST_CASE("a map reports through a ProgressBar given as its progress option") {
  testing::TempDir dir;
  OutputFile out(dir);
  ProcessPool<Squarer> pool({.workers = 2, .log_sink = nullptr});
  std::vector<int64_t> jobs(100, 3);
  absl::StatusOr<std::vector<int64_t>> squares =
      pool.map(jobs, {.chunksize = 5, .progress = ProgressBar("squares", {.fd = out.fd})});
  REQUIRE(squares.ok());
  std::vector<std::string> lines = testing::read_lines(out.path);
  REQUIRE_FALSE(lines.empty());
  CHECK(lines.back().rfind("squares: 100/100 (100%) ", 0) == 0);
  CHECK(contents(out.path).back() == '\n');
}

// A progress function runs on the pool's own thread, which holds the pool while it runs: a call
// of the pool from there must be refused, not left waiting for itself (which wedged the pool, its
// destructor included, for ever).
TEST_CASE("a progress function that calls back into its pool is refused, and the map goes on") {
  ProcessPool<Squarer> pool({.workers = 1, .log_sink = nullptr});
  std::vector<absl::Status> seen;
  std::vector<int64_t> workers_seen;
  AsyncResult<std::vector<int64_t>> squares = pool.map_async(
      std::vector<int64_t>{1, 2, 3}, {.chunksize = 1, .progress = [&](size_t done, size_t) {
        if (done != 1) return;
        seen.push_back(pool.apply(4).status());
        seen.push_back(pool.resize(2));
        seen.push_back(pool.close());
        seen.push_back(pool.join());
        workers_seen.push_back(static_cast<int64_t>(pool.stats().workers.size()));
      }});
  if (!squares.wait(absl::Seconds(30))) {
    std::fprintf(stderr, "the map did not end: its progress function waits for its own pool\n");
    std::fflush(stderr);
    std::_Exit(1);  // the pool's thread is wedged: its destructor would wait for ever
  }
  REQUIRE(squares.get().ok());
  REQUIRE(seen.size() == 4);
  for (const absl::Status& status : seen) {
    CHECK(status.code() == absl::StatusCode::kFailedPrecondition);
    CHECK_MESSAGE(absl::StrContains(status.message(), "pool's own thread"), status.ToString());
  }
  CHECK(workers_seen == std::vector<int64_t>{0});
  // Refused there, everything works from here.
  CHECK(pool.apply(5).value_or(0) == 25);
  CHECK(pool.resize(2).ok());
  CHECK(pool.close().ok());
  CHECK(pool.join().ok());
}

}  // namespace
}  // namespace procpool
