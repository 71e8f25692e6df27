#include "lib/link/remote_frames.h"

#include <poll.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/common/cgroup.h"
#include "lib/common/clock.h"
#include "lib/wire/tls_channel.h"
#include "procpool/internal/packed.h"

namespace procpool::internal {

void write_welcome(const RelayLimits& limits, wire::Welcome::Builder out) {
  out.setMaxFrameBytes(limits.max_frame_bytes);
  out.setHeartbeatTimeoutNs(to_ns(limits.heartbeat_timeout));
  out.setKillGraceNs(to_ns(limits.kill_grace));
  out.setFrameTimeoutNs(to_ns(limits.frame_timeout));
  out.setName(limits.name);
  out.setResidentBytes(limits.resident_bytes);
  out.setMaxWorkerMemoryBytes(limits.max_worker_memory_bytes);
  out.setCgroupsOff(limits.cgroups_off);
  out.setForwardOutput(limits.forward_output);
  out.setCrashBacktraces(limits.crash_backtraces);
}

RelayLimits relay_limits(wire::Welcome::Reader welcome) {
  auto clamp_ns = [](int64_t ns, absl::Duration low, absl::Duration high) {
    return std::clamp(absl::Nanoseconds(ns), low, high);
  };
  RelayLimits limits;
  limits.max_frame_bytes = std::clamp<uint64_t>(welcome.getMaxFrameBytes(), 4096, uint64_t{1} << 40);
  limits.heartbeat_timeout =
      clamp_ns(welcome.getHeartbeatTimeoutNs(), absl::Milliseconds(100), absl::Hours(24));
  limits.kill_grace = clamp_ns(welcome.getKillGraceNs(), absl::ZeroDuration(), absl::Hours(1));
  limits.frame_timeout = clamp_ns(welcome.getFrameTimeoutNs(), absl::Milliseconds(10), absl::Hours(24));
  std::string name = welcome.getName();
  limits.name = name.empty() ? "procpool" : name.substr(0, 12);
  limits.resident_bytes = welcome.getResidentBytes();
  // 0, or at least what options_check allows (a smaller cap would keep any worker from starting).
  const uint64_t memory = welcome.getMaxWorkerMemoryBytes();
  limits.max_worker_memory_bytes = memory == 0 ? 0 : std::max<uint64_t>(memory, kMinWorkerMemoryBytes);
  limits.cgroups_off = welcome.getCgroupsOff();
  limits.forward_output = welcome.getForwardOutput();
  limits.crash_backtraces = welcome.getCrashBacktraces();
  return limits;
}

absl::StatusOr<kj::ArrayPtr<const capnp::word>> read_frame_within(ByteStream stream,
                                                                   FrameReader& reader,
                                                                   absl::Time deadline) {
  while (true) {
    absl::StatusOr<kj::ArrayPtr<const capnp::word>> frame = reader.next();
    if (!frame.ok() || frame->size() > 0) return frame;
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) return absl::DeadlineExceededError("the peer did not answer in time");
    // What a TLS session holds already, poll() does not see.
    if (stream.tls == nullptr || !stream.tls->buffered()) {
      pollfd ready{stream.fd, POLLIN, 0};
      if (::poll(&ready, 1, static_cast<int>(std::min<int64_t>(left_ms, 1000))) <= 0) continue;
    }
    absl::StatusOr<FrameReader::Fill> filled = reader.fill(stream);
    if (!filled.ok()) return filled.status();
    if (*filled == FrameReader::Fill::kEndOfFile) {
      return absl::UnavailableError("the peer closed the connection");
    }
  }
}

absl::Status refuse_peer(ByteStream stream, const std::string& why) {
  capnp::MallocMessageBuilder message(64);
  message.initRoot<wire::FromWorker>().setRefused(why);
  (void)write_frame(stream, message);
  return absl::FailedPreconditionError(why);
}

std::string as_string(capnp::Data::Reader data) {
  return std::string(reinterpret_cast<const char*>(data.begin()), data.size());
}

std::string peer_text(capnp::Text::Reader text, size_t max_bytes) {
  std::string out;
  for (const char c : absl::string_view(text.begin(), std::min(text.size(), max_bytes))) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte >= 0x7f || c == '\\') {
      absl::StrAppend(&out, "\\x", absl::Hex(byte, absl::kZeroPad2));
    } else {
      out.push_back(c);
    }
  }
  return out;
}

uint32_t batch_size(wire::TaskBatch::Reader batch) {
  if (batch.hasWordJobs()) return batch.getWordJobs().size() / sizeof(uint64_t);
  return batch.getJobs().size();
}

void write_progress(const WorkerProgress& progress, size_t resident_bytes,
                    wire::Progress::Builder out) {
  out.setBatchSeq(progress.batch_seq);
  out.setTaskIndex(progress.task_index);
  out.setRunning(progress.running);
  out.setRunningForNs(progress.running ? std::max<int64_t>(0, monotonic_now_ns() - progress.started_ns)
                                       : 0);
  out.setTasksDone(progress.tasks_done);
  out.setBusyNs(progress.busy_ns);
  out.setResidentBytes(resident_bytes);
}

WorkerProgress read_progress(wire::Progress::Reader in, int64_t received_ns) {
  WorkerProgress progress;
  progress.batch_seq = in.getBatchSeq();
  progress.task_index = in.getTaskIndex();
  progress.running = in.getRunning();
  progress.started_ns = received_ns - std::clamp<int64_t>(in.getRunningForNs(), 0, received_ns);
  progress.tasks_done = in.getTasksDone();
  progress.busy_ns = in.getBusyNs();
  progress.exact = false;
  return progress;
}

}  // namespace procpool::internal
