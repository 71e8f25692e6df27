// Pieces both ends of a remote worker's connection use: the handshake's limits, reading a frame
// with a deadline, and progress as it crosses hosts.

#ifndef PROCPOOL_LIB_LINK_REMOTE_FRAMES_H_
#define PROCPOOL_LIB_LINK_REMOTE_FRAMES_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/link/worker_link.h"
#include "lib/wire/frame_io.h"
#include "procpool/internal/protocol.capnp.h"

namespace procpool::internal {

// Frames of the handshake are small: a peer that announces more is refused before it is buffered.
inline constexpr size_t kHandshakeFrameBytes = 64 * 1024;
// Frames over a relay's control connection after the handshake (heartbeats, spawns, progress, a
// worker's end, its output), either way: no more is buffered for one. Output goes in frames of
// 64 KiB of lines (relay.cc), or of one piece of a longer line, 64 KiB too: the frame's own words
// need the 1 KiB above that.
inline constexpr size_t kControlFrameBytes = 65 * 1024;

// What the pool tells a relay in its welcome.
struct RelayLimits {
  size_t max_frame_bytes = 0;
  absl::Duration heartbeat_timeout = absl::Seconds(10);
  absl::Duration kill_grace = absl::Seconds(1);
  absl::Duration frame_timeout = absl::Seconds(10);
  std::string name = "procpool";
  bool resident_bytes = false;  // the pool recycles workers by memory: report it
  size_t max_worker_memory_bytes = 0;  // PoolOptions::max_worker_memory_bytes
  bool cgroups_off = false;            // PoolOptions::cgroups is Cgroups::kOff
  bool forward_output = false;  // send the worker's stdout and stderr lines (OutputLines)
  bool crash_backtraces = true;  // the worker records its stack when it crashes
};
void write_welcome(const RelayLimits& limits, wire::Welcome::Builder out);
// Values out of range are clamped into it: a welcome cannot make the relay misbehave.
RelayLimits relay_limits(wire::Welcome::Reader welcome);

// Reads one whole frame from a blocking or non-blocking socket (or TLS channel), waiting at most
// until `deadline` (kDeadlineExceeded), kUnavailable at end of file, kDataLoss for a frame over the
// reader's limit or a TLS record that fails its check.
absl::StatusOr<kj::ArrayPtr<const capnp::word>> read_frame_within(ByteStream stream,
                                                                   FrameReader& reader,
                                                                   absl::Time deadline);

// The relay's refusal of its pool: sent as a `refused` frame; returns kFailedPrecondition(why).
absl::Status refuse_peer(ByteStream stream, const std::string& why);

std::string as_string(capnp::Data::Reader data);

// Text a peer chose (a worker type, a host name, why it refused), fit for a status or a log line:
// its first `max_bytes`, with control characters, backslashes and bytes past ASCII escaped
// ("\x1b"), so that a hostile peer can neither forge log lines nor send escapes to a terminal.
std::string peer_text(capnp::Text::Reader text, size_t max_bytes = 255);

// How many tasks a batch holds (listed, or as words).
uint32_t batch_size(wire::TaskBatch::Reader batch);

// Progress crosses hosts as "running for", since two hosts' clocks never compare: the receiver
// dates the start back from when the message arrived (which is later than the truth, so a
// deadline measured from it is never early).
void write_progress(const WorkerProgress& progress, size_t resident_bytes,
                    wire::Progress::Builder out);
WorkerProgress read_progress(wire::Progress::Reader in, int64_t received_ns);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_REMOTE_FRAMES_H_
