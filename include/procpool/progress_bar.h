/// \file
/// `ProgressBar`: a ready-made `CallOptions::progress` callback that draws a map's progress.
///
/// ```cpp
/// absl::StatusOr<std::vector<int64_t>> sizes =
///     pool.map(urls, {.progress = procpool::ProgressBar("indexing")});
/// ```
///
/// shows, on stderr,
///
///     indexing [############..................] 120/300  40%  45.2/s  elapsed 2.6s  ETA 4.0s
///
/// redrawn in place (carriage return, clear to end of line) at most every `redraw_interval` when
/// the stream is a terminal; when it is not (a pipe, a file, a CI log), as a plain line at most
/// every `line_interval`:
///
///     indexing: 120/300 (40%) 45.2/s elapsed 2.6s ETA 4.0s
///
/// Either way the final state (done == total) is always drawn, once, and ends with a newline.
/// Rate and elapsed time count from the bar's construction: make one bar per call.
///
/// Copyable: copies share one bar (CallOptions stores a copy). Thread-safe: calls from several
/// threads at once draw one line at a time. The callback runs on the pool's thread, so drawing is
/// kept cheap (a clock read, and at most one `write()` per interval); a stream that blocks (a full
/// pipe nobody reads) would hold up the pool. Write errors are ignored: progress never fails a
/// call.

#ifndef PROCPOOL_PROGRESS_BAR_H_
#define PROCPOOL_PROGRESS_BAR_H_

#include <unistd.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "absl/time/time.h"

namespace procpool {

/// A `CallOptions::progress` callback that draws done/total, rate, elapsed time and ETA (see the
/// file comment). Copies share one bar; thread-safe.
class ProgressBar {
 public:
  /// How the bar is drawn.
  enum class Style {
    kAuto,      ///< kTerminal if the fd is a terminal (isatty), else kPlain
    kTerminal,  ///< one line redrawn in place
    kPlain,     ///< occasional full lines
  };

  /// Where and how often the bar draws. Designated initializers must follow this order.
  struct Options {
    /// Where to draw. Borrowed: it must stay open while the bar is in use.
    int fd = STDERR_FILENO;
    /// How to draw; kAuto asks isatty(fd) once, at construction.
    Style style = Style::kAuto;
    /// Terminal: redraws at most this often.
    absl::Duration redraw_interval = absl::Milliseconds(100);
    /// Plain: a line at most this often.
    absl::Duration line_interval = absl::Seconds(5);
    /// Terminal: characters of the bar between the brackets.
    int width = 30;
    /// The time source; absl::Now when empty. For tests.
    std::function<absl::Time()> clock;
  };

  /// Draws on stderr, its Style found by isatty. `label` starts every line (may be empty). Starts
  /// the bar's clock; draws nothing yet.
  explicit ProgressBar(std::string label = "");
  /// Draws as `options` say. Starts the bar's clock; draws nothing yet.
  ProgressBar(std::string label, Options options);

  /// The progress callback: `done` of `total` tasks have finished. Draws if the interval has
  /// passed since the last drawing, and always when done == total (then ends the line; later
  /// calls draw nothing). Never blocks beyond one `write()`; never fails (write errors are
  /// ignored).
  void operator()(size_t done, size_t total) const;

  /// Whether it draws in place (resolved from Style::kAuto at construction). Never blocks.
  bool terminal() const;

  /// The text of one drawing of (done, total) after `elapsed`, without the carriage return,
  /// line clearing or newline. For tests and custom displays. Draws nothing.
  std::string render(size_t done, size_t total, absl::Duration elapsed) const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace procpool

#endif  // PROCPOOL_PROGRESS_BAR_H_
