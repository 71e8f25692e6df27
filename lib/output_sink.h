// The default log sink (log_to_stderr, pool_options.h) for a worker's forwarded output, taking
// the lines of one read together: what log_to_stderr writes for each line ("[procpool-w3] "
// and the line), written in a few calls for all of them instead of one call, one copy and one
// stdio lock per line (bench/bench_output.cc). The pool uses it when its sink is log_to_stderr.

#ifndef PROCPOOL_LIB_OUTPUT_SINK_H_
#define PROCPOOL_LIB_OUTPUT_SINK_H_

#include <span>
#include <string_view>

#include "procpool/pool_options.h"

namespace procpool::internal {

// Whether `sink` is log_to_stderr itself (the default, or named by the program).
bool is_log_to_stderr(const LogSink& sink);

// Writes each of `lines` as log_to_stderr writes `event` with that line as its message (source
// kStdout or kStderr: to stdout or stderr), in order, each line whole within one write.
void log_lines_to_stderr(const LogEvent& event, std::span<const std::string_view> lines);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_OUTPUT_SINK_H_
