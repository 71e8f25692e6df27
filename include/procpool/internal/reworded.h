// reworded(): a status with the same code and the same payloads (a crashed worker's stack, which
// procpool::backtrace_of reads) and another message. The one way procpool rewords a status it
// passes on ("job 3: ...", a worker's name before a launch failure, a note after a death), so
// that nothing a status carries is lost on its way to the caller.

#ifndef PROCPOOL_INTERNAL_REWORDED_H_
#define PROCPOOL_INTERNAL_REWORDED_H_

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"

namespace procpool::internal {

inline absl::Status reworded(const absl::Status& status, absl::string_view message) {
  absl::Status out(status.code(), message);
  status.ForEachPayload(
      [&out](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_REWORDED_H_
