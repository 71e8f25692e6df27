// StopSequence (lib/link/stop_sequence.h): the one SIGTERM-grace-SIGKILL chain that supervision
// and the relay share, driven with a clock the test sets, over a link that records what it is
// asked. Real workers ignoring SIGTERM are stopped by it in fault_test and remote_test.

#include "lib/link/stop_sequence.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "doctest/doctest.h"

namespace procpool::internal {
namespace {

// A link that only records the stops it is asked for.
class RecordingLink final : public WorkerLink {
 public:
  std::vector<StopMode> stops;

  const std::string& name() const override { return name_; }
  int pid() const override { return 0; }
  void send(std::unique_ptr<capnp::MessageBuilder>) override {}
  void flush() override {}
  bool has_unsent() const override { return false; }
  void add_pollfds(std::vector<pollfd>&, bool) override {}
  void service(const pollfd*, size_t, bool, LinkEvents&) override {}
  int64_t check(int64_t, LinkEvents&) override { return INT64_MAX; }
  int channel_fd() const override { return -1; }
  void pump(short, LinkEvents&) override {}
  WorkerProgress progress() const override { return {}; }
  size_t resident_bytes() const override { return 0; }
  void open_claims(uint32_t, uint16_t, uint32_t) override {}
  void revoke(uint32_t, uint16_t, LinkEvents&) override {}
  void stop(StopMode mode) override { stops.push_back(mode); }

 private:
  const std::string name_ = "recording link";
};

constexpr int64_t kSecond = 1'000'000'000;

TEST_CASE("a terminated worker gets SIGTERM at once and SIGKILL when its grace has passed") {
  RecordingLink link;
  StopSequence sequence;
  CHECK(sequence.check(link, 0) == INT64_MAX);  // nothing asked: nothing due
  sequence.stop(link, StopMode::kTerminate, absl::Seconds(2), 10 * kSecond);
  CHECK(link.stops == std::vector<StopMode>{StopMode::kTerminate});
  CHECK(sequence.kill_at_ns() == 12 * kSecond);
  CHECK(sequence.check(link, 12 * kSecond - 1) == 12 * kSecond);
  CHECK(link.stops.size() == 1);
  CHECK(sequence.check(link, 12 * kSecond) == INT64_MAX);
  CHECK(link.stops == std::vector<StopMode>{StopMode::kTerminate, StopMode::kKill});
  CHECK(sequence.killed());
  // Killed: nothing more is sent, whatever is asked.
  CHECK(sequence.check(link, 20 * kSecond) == INT64_MAX);
  sequence.stop(link, StopMode::kTerminate, absl::Seconds(2), 20 * kSecond);
  sequence.stop(link, StopMode::kKill, absl::Seconds(2), 20 * kSecond);
  CHECK(link.stops.size() == 2);
}

TEST_CASE("asked again to terminate, the signal goes again but the first deadline stays") {
  RecordingLink link;
  StopSequence sequence;
  sequence.stop(link, StopMode::kTerminate, absl::Seconds(2), 0);
  sequence.stop(link, StopMode::kTerminate, absl::Seconds(2), 1 * kSecond);
  CHECK(link.stops == std::vector<StopMode>{StopMode::kTerminate, StopMode::kTerminate});
  CHECK(sequence.kill_at_ns() == 2 * kSecond);
  CHECK(sequence.check(link, 2 * kSecond) == INT64_MAX);
  CHECK(link.stops.back() == StopMode::kKill);
}

TEST_CASE("a kill goes at once, without a SIGTERM or a grace period") {
  RecordingLink link;
  StopSequence sequence;
  sequence.stop(link, StopMode::kKill, absl::Seconds(2), 0);
  CHECK(link.stops == std::vector<StopMode>{StopMode::kKill});
  CHECK(sequence.killed());
  CHECK(sequence.kill_at_ns() == INT64_MAX);
  // A kill during the grace period of a SIGTERM ends the sequence too.
  RecordingLink other;
  StopSequence during;
  during.stop(other, StopMode::kTerminate, absl::Seconds(2), 0);
  during.stop(other, StopMode::kKill, absl::Seconds(2), kSecond);
  CHECK(other.stops == std::vector<StopMode>{StopMode::kTerminate, StopMode::kKill});
  CHECK(during.check(other, 5 * kSecond) == INT64_MAX);
  CHECK(other.stops.size() == 2);
}

TEST_CASE("an infinite kill_grace never kills and never overflows the clock") {
  RecordingLink link;
  StopSequence sequence;
  sequence.stop(link, StopMode::kTerminate, absl::InfiniteDuration(), 1000 * kSecond);
  CHECK(sequence.check(link, 1'000'000 * kSecond) > 1'000'000 * kSecond);
  CHECK(link.stops == std::vector<StopMode>{StopMode::kTerminate});
}

}  // namespace
}  // namespace procpool::internal
