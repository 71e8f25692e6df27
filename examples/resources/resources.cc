// Resources: a worker that opens something once, uses it for every job, and closes it at the end.
//
// Each worker process builds its own Writer (from the factory, after fork), then:
//   enter()    once: opens its own file <dir>/worker-<pid>.txt
//   run(job)   per job: appends one line to that file and returns the line's length
//   exit()     once, at shutdown: flushes and closes the file
// Leaving the pool's scope is close() then join(): the destructor returns only after every
// worker's exit() has finished, so the main program can then read the files back, complete.
//
// Every step logs one line, "[+<seconds since start>s pid <pid>] ...", written with a single
// write(2) so lines from different processes never mix.
//
//   bazel run //examples/resources

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "procpool/procpool.h"

namespace {

// Set by main before the pool forks, so every worker measures from the same start.
std::chrono::steady_clock::time_point g_start;

// One line to stdout, prefixed with the time since start and this process's pid, in one write.
void log_line(const std::string& message) {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
  char prefix[64];
  std::snprintf(prefix, sizeof prefix, "[+%.3fs pid %d] ", seconds, static_cast<int>(getpid()));
  const std::string line = absl::StrCat(prefix, message, "\n");
  (void)!::write(STDOUT_FILENO, line.data(), line.size());
}

class Writer {
 public:
  using Job = int64_t;
  using Result = int64_t;

  explicit Writer(std::string dir) : dir_(std::move(dir)) {}

  absl::Status enter() {
    path_ = absl::StrCat(dir_, "/worker-", getpid(), ".txt");
    out_.open(path_, std::ios::out | std::ios::trunc);
    if (!out_) return absl::UnavailableError(absl::StrCat("cannot open ", path_));
    log_line(absl::StrCat("enter: opened ", path_));
    return absl::OkStatus();
  }

  int64_t run(int64_t job) {
    log_line(absl::StrCat("run: job ", job));
    const std::string line = absl::StrCat("job ", job, " squared is ", job * job);
    out_ << line << "\n";
    ++lines_;
    // Pretend each job takes a moment, so the jobs spread over the workers.
    usleep(20 * 1000);
    return static_cast<int64_t>(line.size());
  }

  absl::Status exit() {
    out_.flush();
    const bool flushed = out_.good();
    out_.close();
    if (!flushed || out_.fail()) return absl::DataLossError(absl::StrCat("cannot write ", path_));
    log_line(absl::StrCat("exit: flushed ", lines_, " lines, closed"));
    return absl::OkStatus();
  }

 private:
  std::string dir_;
  std::string path_;
  std::ofstream out_;
  int lines_ = 0;
};

int count_lines(const std::filesystem::path& path) {
  std::ifstream in(path);
  int lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  return lines;
}

}  // namespace

int main() {
  g_start = std::chrono::steady_clock::now();
  char dir_template[] = "/tmp/procpool-resources-XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string dir = dir_template;
  log_line(absl::StrCat("main: writing into ", dir));

  std::vector<int64_t> jobs;
  for (int64_t i = 0; i < 9; ++i) jobs.push_back(i);

  int status = 0;
  {
    procpool::ProcessPool<Writer> pool({.workers = 3}, [dir] { return Writer(dir); });
    absl::StatusOr<std::vector<int64_t>> lengths = pool.map(jobs, {.chunksize = 1});
    if (lengths.ok()) {
      log_line(absl::StrCat("main: map returned line lengths ", absl::StrJoin(*lengths, " ")));
    } else {
      log_line(absl::StrCat("main: map failed: ", lengths.status().ToString()));
      status = 1;
    }
    log_line("main: leaving the pool's scope (close, then join: each worker runs exit())");
  }
  log_line("main: pool destroyed; every worker's exit() has finished");

  int total = 0;
  int files = 0;
  std::vector<std::filesystem::path> paths;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) paths.push_back(entry.path());
  std::sort(paths.begin(), paths.end());
  for (const std::filesystem::path& path : paths) {
    const int lines = count_lines(path);
    log_line(absl::StrCat("main: ", path.filename().string(), " has ", lines, " lines"));
    total += lines;
    ++files;
  }
  log_line(absl::StrCat("main: ", files, " files, ", total, " lines in all for ", jobs.size(),
                        " jobs"));
  if (files != 3 || total != static_cast<int>(jobs.size())) status = 1;

  std::filesystem::remove_all(dir);
  log_line(absl::StrCat("main: removed ", dir));
  return status;
}
