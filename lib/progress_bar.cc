// ProgressBar (include/procpool/progress_bar.h): formatting and throttled drawing.

#include "procpool/progress_bar.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace procpool {
namespace {

// "0.8s", "12.3s", "4m05s", "2h03m": short enough for a status line.
std::string short_duration(absl::Duration d) {
  if (d < absl::ZeroDuration()) d = absl::ZeroDuration();
  const double seconds = absl::ToDoubleSeconds(d);
  if (seconds < 60) return absl::StrFormat("%.1fs", seconds);
  const int64_t whole = static_cast<int64_t>(seconds);
  if (whole < 3600) return absl::StrFormat("%dm%02ds", whole / 60, whole % 60);
  return absl::StrFormat("%dh%02dm", whole / 3600, (whole % 3600) / 60);
}

void write_all(int fd, const std::string& text) {
  size_t written = 0;
  while (written < text.size()) {
    const ssize_t n = ::write(fd, text.data() + written, text.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // progress never fails a call
    written += static_cast<size_t>(n);
  }
}

}  // namespace

struct ProgressBar::State {
  std::string label;
  Options options;
  bool terminal = false;
  absl::Time start;

  std::mutex mu;
  absl::Time last_drawn;  // guarded by mu
  bool finished = false;  // guarded by mu

  absl::Time now() const { return options.clock ? options.clock() : absl::Now(); }
};

ProgressBar::ProgressBar(std::string label) : ProgressBar(std::move(label), Options()) {}

ProgressBar::ProgressBar(std::string label, Options options) : state_(std::make_shared<State>()) {
  state_->label = std::move(label);
  state_->options = std::move(options);
  switch (state_->options.style) {
    case Style::kAuto:
      state_->terminal = ::isatty(state_->options.fd) == 1;
      break;
    case Style::kTerminal:
      state_->terminal = true;
      break;
    case Style::kPlain:
      state_->terminal = false;
      break;
  }
  state_->options.width = std::max(1, state_->options.width);
  state_->start = state_->now();
  state_->last_drawn = state_->start;
}

bool ProgressBar::terminal() const { return state_->terminal; }

std::string ProgressBar::render(size_t done, size_t total, absl::Duration elapsed) const {
  const State& s = *state_;
  const double fraction =
      total == 0 ? 1.0 : std::min(1.0, static_cast<double>(done) / static_cast<double>(total));
  const double seconds = absl::ToDoubleSeconds(elapsed);
  const double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0.0;
  std::string eta = "?";
  if (done >= total) {
    eta = "0.0s";
  } else if (rate > 0) {
    eta = short_duration(absl::Seconds(static_cast<double>(total - done) / rate));
  }
  const std::string numbers = absl::StrFormat("%d/%d", done, total);
  const int percent = static_cast<int>(std::floor(fraction * 100));
  const std::string prefix = s.label.empty() ? "" : s.label;
  if (s.terminal) {
    const int filled = static_cast<int>(fraction * s.options.width);
    return absl::StrCat(prefix, prefix.empty() ? "" : " ", "[", std::string(filled, '#'),
                        std::string(s.options.width - filled, '.'), "] ", numbers,
                        absl::StrFormat(" %3d%%  %.1f/s  elapsed %s  ETA %s", percent, rate,
                                        short_duration(elapsed), eta));
  }
  return absl::StrCat(prefix, prefix.empty() ? "" : ": ", numbers,
                      absl::StrFormat(" (%d%%) %.1f/s elapsed %s ETA %s", percent, rate,
                                      short_duration(elapsed), eta));
}

void ProgressBar::operator()(size_t done, size_t total) const {
  State& s = *state_;
  const absl::Time now = s.now();
  const bool last = done >= total;
  std::lock_guard lock(s.mu);
  if (s.finished) return;
  const absl::Duration interval = s.terminal ? s.options.redraw_interval : s.options.line_interval;
  if (!last && now - s.last_drawn < interval) return;
  s.last_drawn = now;
  s.finished = last;
  const std::string line = render(done, total, now - s.start);
  // A terminal line is redrawn in place: carriage return, the line, clear what is left of the
  // previous one. A plain line stands alone.
  const std::string text = s.terminal ? absl::StrCat("\r", line, "\033[K", last ? "\n" : "")
                                      : absl::StrCat(line, "\n");
  // Written under the lock, so two threads' drawings never interleave or arrive out of order.
  write_all(s.options.fd, text);
}

}  // namespace procpool
