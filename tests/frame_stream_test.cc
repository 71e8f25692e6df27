// FrameStream (lib/wire/frame_stream.h): a peer's stream read as whole frames, with its
// partial-frame clock; and the checks every reader of a peer's bytes shares: the held-frames
// bounds (control_page.h) and the one boundary that turns a kj::Exception into a status
// (internal::guarded, codec.h).

#include "lib/wire/frame_stream.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "kj/debug.h"
#include "lib/common/clock.h"
#include "lib/common/unique_fd.h"
#include "lib/wire/control_page.h"
#include "procpool/codec.h"
#include "procpool/internal/protocol.capnp.h"

namespace procpool::internal {
namespace {

constexpr size_t kLimit = size_t{1} << 20;

// The bytes of one frame carrying `text`.
std::string frame_bytes(const std::string& text) {
  capnp::MallocMessageBuilder message;
  message.initRoot<wire::Value>().setBytes(
      kj::arrayPtr(reinterpret_cast<const kj::byte*>(text.data()), text.size()));
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  return std::string(reinterpret_cast<const char*>(words.begin()), words.size() * sizeof(capnp::word));
}

std::string text_of(kj::ArrayPtr<const capnp::word> words, const capnp::ReaderOptions& options) {
  capnp::FlatArrayMessageReader message(words, options);
  auto bytes = message.getRoot<wire::Value>().getBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

// A socketpair: the test writes into `peer`, the stream reads `ours` (non-blocking).
struct Pipe {
  Pipe() {
    SocketPair pair = *make_socket_pair();
    ours = std::move(pair.parent_end);
    peer = std::move(pair.child_end);
    REQUIRE(set_nonblocking(ours.get(), true).ok());
  }
  void send(const std::string& bytes) {
    REQUIRE(::write(peer.get(), bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  }
  UniqueFd ours;
  UniqueFd peer;
};

// Reads what is there, collecting the frames' texts.
FrameStream::ReadResult read_into(FrameStream& stream, int fd, std::vector<std::string>& texts,
                                  int max_reads = 16) {
  return stream.read(fd, max_reads, [&](kj::ArrayPtr<const capnp::word> words) {
    texts.push_back(text_of(words, stream.options()));
    return true;
  });
}

TEST_CASE("several frames that arrive in one read are all handed out, in order") {
  Pipe pipe;
  FrameStream stream(kLimit, absl::Seconds(10));
  pipe.send(frame_bytes("one") + frame_bytes("two") + frame_bytes(std::string(5000, 'x')));
  std::vector<std::string> texts;
  const FrameStream::ReadResult result = read_into(stream, pipe.ours.get(), texts);
  CHECK_FALSE(result.closed);
  CHECK_FALSE(result.broken);
  CHECK(result.why.ok());
  REQUIRE(texts.size() == 3);
  CHECK(texts[0] == "one");
  CHECK(texts[1] == "two");
  CHECK(texts[2] == std::string(5000, 'x'));
  CHECK_FALSE(stream.has_partial_frame());
  CHECK(stream.partial_since_ns() == 0);
  CHECK(stream.last_read_ns() > 0);
}

TEST_CASE("a partial frame is kept until its rest arrives, then handed out whole") {
  Pipe pipe;
  FrameStream stream(kLimit, absl::Seconds(10));
  const std::string whole = frame_bytes("split in three");
  std::vector<std::string> texts;
  // Cut inside the segment table, then inside the segment.
  pipe.send(whole.substr(0, 3));
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  CHECK(texts.empty());
  CHECK(stream.has_partial_frame());
  pipe.send(whole.substr(3, 13));
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  CHECK(texts.empty());
  pipe.send(whole.substr(16));
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  REQUIRE(texts.size() == 1);
  CHECK(texts[0] == "split in three");
  CHECK_FALSE(stream.has_partial_frame());
}

TEST_CASE("frame_timeout is counted from the read that brought a frame's first byte") {
  Pipe pipe;
  const absl::Duration timeout = absl::Milliseconds(500);
  FrameStream stream(kLimit, timeout);
  std::vector<std::string> texts;
  int64_t next = INT64_MAX;
  CHECK(stream.check(monotonic_now_ns(), next).ok());
  CHECK(next == INT64_MAX);  // no frame begun: no deadline

  // A whole frame and the first bytes of the next, in one read.
  const std::string second = frame_bytes("second");
  const int64_t before_first = monotonic_now_ns();
  pipe.send(frame_bytes("first") + second.substr(0, 10));
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  const int64_t after_first = monotonic_now_ns();
  REQUIRE(texts.size() == 1);
  const int64_t since = stream.partial_since_ns();
  CHECK(since >= before_first);
  CHECK(since <= after_first);

  // More of the same frame later does not restart its clock.
  absl::SleepFor(absl::Milliseconds(5));
  pipe.send(second.substr(10, 10));
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  CHECK(stream.partial_since_ns() == since);

  // Within frame_timeout: OK, and the caller learns the deadline.
  const int64_t deadline = since + to_ns(timeout);
  next = INT64_MAX;
  CHECK(stream.check(deadline - 1, next).ok());
  CHECK(next == deadline);
  // At it: broken, saying so.
  next = INT64_MAX;
  const absl::Status late = stream.check(deadline, next);
  CHECK(late.code() == absl::StatusCode::kDataLoss);
  CHECK(late.message() == "began a frame and did not finish it within frame_timeout (500ms)");

  // The frame ends and a third begins in the same read: the third's clock starts at that read.
  const int64_t before_third = monotonic_now_ns();
  pipe.send(second.substr(20) + frame_bytes("third").substr(0, 8));
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  REQUIRE(texts.size() == 2);
  CHECK(texts[1] == "second");
  CHECK(stream.partial_since_ns() >= before_third);
}

TEST_CASE("a frame declaring more than the limit breaks the stream before it is buffered") {
  Pipe pipe;
  FrameStream stream(4096, absl::Seconds(10));
  // One segment of 1 Mi words: only the table is sent.
  const uint32_t table[2] = {0, 1u << 20};
  pipe.send(std::string(reinterpret_cast<const char*>(table), sizeof(table)));
  std::vector<std::string> texts;
  const FrameStream::ReadResult result = read_into(stream, pipe.ours.get(), texts);
  CHECK(texts.empty());
  CHECK(result.broken);
  CHECK_FALSE(result.closed);
  CHECK(result.why.code() == absl::StatusCode::kDataLoss);
  CHECK(absl::StartsWith(result.why.message(), "sent a bad frame: frame of at least"));
  CHECK(absl::StrContains(result.why.message(), "max_frame_bytes"));
  CHECK(stream.reader().capacity() < (size_t{1} << 20));
  // Broken for good: a later read reads nothing and says the same.
  pipe.send(frame_bytes("after"));
  const FrameStream::ReadResult again = read_into(stream, pipe.ours.get(), texts);
  CHECK(again.broken);
  CHECK(again.why == result.why);
  CHECK(texts.empty());
  int64_t next = INT64_MAX;
  CHECK(stream.check(INT64_MAX / 2, next).ok());  // no frame_timeout on a broken stream
}

TEST_CASE("garbage breaks the stream with kDataLoss; frames before it are handed out") {
  Pipe pipe;
  FrameStream stream(kLimit, absl::Seconds(10));
  std::string garbage(64, '\xff');
  pipe.send(frame_bytes("good") + garbage);
  std::vector<std::string> texts;
  const FrameStream::ReadResult result = read_into(stream, pipe.ours.get(), texts);
  REQUIRE(texts.size() == 1);
  CHECK(texts[0] == "good");
  CHECK(result.broken);
  CHECK(result.why.code() == absl::StatusCode::kDataLoss);
  CHECK(absl::StartsWith(result.why.message(), "sent a bad frame: malformed frame: it declares"));
}

TEST_CASE("the peer's end of file closes the stream; mid-frame it is a truncated frame") {
  SUBCASE("between frames") {
    Pipe pipe;
    FrameStream stream(kLimit, absl::Seconds(10));
    pipe.send(frame_bytes("last"));
    pipe.peer.reset();
    std::vector<std::string> texts;
    const FrameStream::ReadResult result = read_into(stream, pipe.ours.get(), texts);
    CHECK(texts == std::vector<std::string>{"last"});
    // The short read that brought "last" took all there was: the end of file comes next time.
    const FrameStream::ReadResult end = result.closed ? result : read_into(stream, pipe.ours.get(), texts);
    CHECK(end.closed);
    CHECK_FALSE(end.broken);
    CHECK(end.why.ok());
  }
  SUBCASE("inside a frame") {
    Pipe pipe;
    FrameStream stream(kLimit, absl::Seconds(10));
    pipe.send(frame_bytes("cut short").substr(0, 12));
    pipe.peer.reset();
    std::vector<std::string> texts;
    FrameStream::ReadResult result = read_into(stream, pipe.ours.get(), texts);
    if (!result.closed) result = read_into(stream, pipe.ours.get(), texts);
    CHECK(texts.empty());
    CHECK(result.closed);
    CHECK(result.broken);
    CHECK(result.why.code() == absl::StatusCode::kDataLoss);
    CHECK(result.why.message() == "sent a truncated frame before it closed its end");
    int64_t next = INT64_MAX;
    CHECK(stream.check(INT64_MAX / 2, next).ok());  // closed: no frame is begun any more
  }
}

TEST_CASE("a holder that stops gets the frames left buffered first on its next read") {
  Pipe pipe;
  FrameStream stream(kLimit, absl::Seconds(10));
  pipe.send(frame_bytes("a") + frame_bytes("b") + frame_bytes("c"));
  std::vector<std::string> texts;
  // Stops after the first frame.
  const FrameStream::ReadResult first =
      stream.read(pipe.ours.get(), 16, [&](kj::ArrayPtr<const capnp::word> words) {
        texts.push_back(text_of(words, stream.options()));
        return false;
      });
  CHECK(first.why.ok());
  CHECK(texts == std::vector<std::string>{"a"});
  // Nothing more on the socket; the rest comes from the buffer.
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  CHECK(texts == std::vector<std::string>{"a", "b", "c"});
}

TEST_CASE("a stream goes on from a reader that already holds bytes") {
  Pipe pipe;
  FrameReader reader(kLimit);
  const std::string frames = frame_bytes("came with the attach") + frame_bytes("next");
  reader.append(frames.data(), frames.size() - 4);
  FrameStream stream(std::move(reader), absl::Seconds(10));
  std::vector<std::string> texts;
  // Handed out before any read (poll() would not tell of them).
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  CHECK(texts == std::vector<std::string>{"came with the attach"});
  CHECK(stream.partial_since_ns() != 0);
  pipe.send(frames.substr(frames.size() - 4));
  CHECK(read_into(stream, pipe.ours.get(), texts).why.ok());
  CHECK(texts == std::vector<std::string>{"came with the attach", "next"});
}

TEST_CASE("frame_reader_options bounds a frame's traversal by its size, at least 1024 words") {
  CHECK(frame_reader_options(1 << 20).traversalLimitInWords == (1 << 20) / 8);
  CHECK(frame_reader_options(100).traversalLimitInWords == 1024);
  CHECK(FrameReader(1 << 20).options().traversalLimitInWords == (1 << 20) / 8);
  FrameReader reader(100);
  reader.set_max_frame_bytes(size_t{64} << 20);
  CHECK(reader.options().traversalLimitInWords == (size_t{64} << 20) / 8);
}

TEST_CASE("held frames are taken only when both ends are in the area and on word boundaries") {
  const uint32_t capacity = static_cast<uint32_t>(HeldFrames::capacity());
  CHECK(held_frames_valid(0, 0));
  CHECK(held_frames_valid(0, 16));
  CHECK(held_frames_valid(8, 16));
  CHECK(held_frames_valid(16, 16));
  CHECK(held_frames_valid(0, capacity - capacity % 8));
  SUBCASE("taken not on a word boundary (the parent and the recovery once disagreed)") {
    CHECK_FALSE(held_frames_valid(4, 16));
    CHECK_FALSE(held_frames_valid(12, 16));
    CHECK_FALSE(held_frames_valid(1, 8));
  }
  SUBCASE("bytes not on a word boundary") {
    CHECK_FALSE(held_frames_valid(0, 12));
    CHECK_FALSE(held_frames_valid(8, 9));
  }
  SUBCASE("taken past bytes, bytes past the area") {
    CHECK_FALSE(held_frames_valid(16, 8));
    CHECK_FALSE(held_frames_valid(0, capacity + 8));
    CHECK_FALSE(held_frames_valid(UINT32_MAX - 7, UINT32_MAX - 7));
  }
}

TEST_CASE("guarded turns a kj::Exception from a peer's bytes into kDataLoss saying what was read") {
  SUBCASE("with what the caller was reading") {
    const absl::Status status = guarded("sent a malformed frame", []() -> absl::Status {
      KJ_FAIL_REQUIRE("pointer out of bounds");
    });
    CHECK(status.code() == absl::StatusCode::kDataLoss);
    CHECK(absl::StartsWith(status.message(), "sent a malformed frame: "));
    CHECK(absl::StrContains(status.message(), "pointer out of bounds"));
  }
  SUBCASE("from a real malformed frame") {
    // One segment of one word: a root pointer with every bit set (no struct pointer).
    const uint32_t table[2] = {0, 1};
    const uint64_t root = ~uint64_t{0};
    kj::Array<capnp::word> frame = kj::heapArray<capnp::word>(2);
    std::memcpy(reinterpret_cast<char*>(frame.begin()), table, sizeof(table));
    std::memcpy(reinterpret_cast<char*>(frame.begin() + 1), &root, sizeof(root));
    const absl::Status status = guarded("sent a malformed frame", [&]() -> absl::Status {
      capnp::FlatArrayMessageReader message(frame, frame_reader_options(4096));
      (void)message.getRoot<wire::FromWorker>().which();
      return absl::OkStatus();
    });
    CHECK(status.code() == absl::StatusCode::kDataLoss);
    CHECK(absl::StartsWith(status.message(), "sent a malformed frame: "));
  }
  SUBCASE("a status returned passes through unchanged") {
    const absl::Status status =
        guarded("sent a malformed frame", [] { return absl::NotFoundError("no such batch"); });
    CHECK(status == absl::NotFoundError("no such batch"));
  }
  SUBCASE("without a context, codecs' wording") {
    const absl::Status status = guarded([]() -> absl::Status { KJ_FAIL_REQUIRE("bad"); });
    CHECK(absl::StartsWith(status.message(), "malformed message: "));
  }
}

}  // namespace
}  // namespace procpool::internal
