// Frame I/O: whole Cap'n Proto frames over a socketpair, in pieces, in bulk, and when the peer
// misbehaves.

#include "lib/wire/frame_io.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "procpool/internal/protocol.capnp.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {
namespace {

std::unique_ptr<capnp::MallocMessageBuilder> text_frame(const std::string& text) {
  auto message = std::make_unique<capnp::MallocMessageBuilder>();
  message->initRoot<wire::Value>().setBytes(
      kj::arrayPtr(reinterpret_cast<const kj::byte*>(text.data()), text.size()));
  return message;
}

std::string text_of(kj::ArrayPtr<const capnp::word> words, const capnp::ReaderOptions& options) {
  capnp::FlatArrayMessageReader message(words, options);
  auto bytes = message.getRoot<wire::Value>().getBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

TEST_CASE("frames written by a FrameWriter come out of a FrameReader whole and in order") {
  SocketPair pair = *make_socket_pair();
  REQUIRE(set_nonblocking(pair.parent_end.get(), true).ok());
  FrameWriter writer;
  std::vector<std::string> sent;
  for (int i = 0; i < 200; ++i) {
    // Sizes from a few bytes to 300 KB: bigger than a socket buffer, so writes are partial.
    sent.push_back(std::string(static_cast<size_t>(i) * i * 7 + 1, static_cast<char>('a' + i % 26)));
    writer.push(text_frame(sent.back()));
  }
  std::vector<std::string> received;
  std::thread reader_thread([&] {
    FrameReader reader(size_t{1} << 20);
    while (received.size() < sent.size()) {
      auto frame = reader.read_blocking(pair.child_end.get());
      REQUIRE(frame.ok());
      received.push_back(text_of(*frame, reader.options()));
    }
  });
  while (!writer.empty()) {
    REQUIRE(writer.write_some(pair.parent_end.get()).ok());
    if (!writer.empty()) usleep(100);
  }
  CHECK(writer.queued_bytes() == 0);
  reader_thread.join();
  CHECK(received == sent);
}

TEST_CASE("a blocking write_frame and several frames arriving in one read") {
  SocketPair pair = *make_socket_pair();
  for (int i = 0; i < 5; ++i) REQUIRE(write_frame(pair.parent_end.get(), *text_frame(std::to_string(i))).ok());
  FrameReader reader(4096);
  for (int i = 0; i < 5; ++i) {
    auto frame = reader.read_blocking(pair.child_end.get());
    REQUIRE(frame.ok());
    CHECK(text_of(*frame, reader.options()) == std::to_string(i));
  }
}

TEST_CASE("end of file is kUnavailable; a peer that is gone is an error, not SIGPIPE") {
  SocketPair pair = *make_socket_pair();
  pair.parent_end.reset();
  FrameReader reader(4096);
  CHECK(reader.read_blocking(pair.child_end.get()).status().code() == absl::StatusCode::kUnavailable);
  CHECK_FALSE(write_frame(pair.child_end.get(), *text_frame("x")).ok());
}

TEST_CASE("a frame larger than the limit is kDataLoss before it is buffered") {
  SocketPair pair = *make_socket_pair();
  std::thread writer([&] { (void)write_frame(pair.parent_end.get(), *text_frame(std::string(100000, 'x'))); });
  FrameReader reader(64 * 1024);
  auto frame = reader.read_blocking(pair.child_end.get());
  CHECK(frame.status().code() == absl::StatusCode::kDataLoss);
  CHECK(std::string(frame.status().message()).find("max_frame_bytes") != std::string::npos);
  pair.child_end.reset();
  writer.join();
}

TEST_CASE("a reader's buffer grows with the bytes that arrive, not to the size a header announces") {
  SocketPair pair = *make_socket_pair();
  REQUIRE(set_nonblocking(pair.child_end.get(), true).ok());
  FrameReader reader(size_t{256} << 20);
  // One segment of 200 MiB announced; 100 KiB of it sent.
  const uint32_t table[2] = {0, (200u << 20) / 8};
  REQUIRE(::write(pair.parent_end.get(), table, sizeof(table)) == sizeof(table));
  const std::string part(100 << 10, 'x');
  for (size_t sent = 0; sent < part.size();) {
    const ssize_t n = ::write(pair.parent_end.get(), part.data() + sent, part.size() - sent);
    REQUIRE(n > 0);
    sent += static_cast<size_t>(n);
    while (true) {
      absl::StatusOr<FrameReader::Fill> filled = reader.fill(pair.child_end.get());
      REQUIRE(filled.ok());
      if (*filled != FrameReader::Fill::kData) break;
      auto frame = reader.next();
      REQUIRE(frame.ok());
      CHECK(frame->size() == 0);
    }
  }
  CHECK(reader.partial_bytes() == sizeof(table) + part.size());
  // At most twice what came.
  CHECK(reader.capacity() <= 2 * (sizeof(table) + part.size()) + (64 << 10));
  reader.discard();
  CHECK(reader.capacity() == 0);
  CHECK_FALSE(reader.has_partial_frame());
}

TEST_CASE("garbage is kDataLoss, never a crash") {
  SocketPair pair = *make_socket_pair();
  SUBCASE("an absurd segment count") {
    uint32_t header[2] = {0xfffffff0u, 1};
    REQUIRE(::write(pair.parent_end.get(), header, sizeof(header)) == sizeof(header));
    FrameReader reader(1 << 20);
    CHECK(reader.read_blocking(pair.child_end.get()).status().code() == absl::StatusCode::kDataLoss);
  }
  SUBCASE("a segment size past the limit") {
    uint32_t header[2] = {0, 0x7fffffffu};
    REQUIRE(::write(pair.parent_end.get(), header, sizeof(header)) == sizeof(header));
    FrameReader reader(1 << 20);
    CHECK(reader.read_blocking(pair.child_end.get()).status().code() == absl::StatusCode::kDataLoss);
  }
  SUBCASE("a well-framed message whose content is garbage throws only inside the reader") {
    uint64_t frame[3] = {0, 0, 0};
    uint32_t header[2] = {0, 2};
    std::memcpy(frame, header, sizeof(header));
    frame[1] = 0xdeadbeefcafebabeull;  // a root pointer pointing far outside the segment
    REQUIRE(::write(pair.parent_end.get(), frame, sizeof(frame)) == sizeof(frame));
    FrameReader reader(1 << 20);
    auto words = reader.read_blocking(pair.child_end.get());
    REQUIRE(words.ok());
    bool threw = false;
    try {
      capnp::FlatArrayMessageReader message(*words, reader.options());
      (void)message.getRoot<wire::Value>().which();
    } catch (const kj::Exception&) {
      threw = true;
    }
    CHECK(threw);
  }
}

// Frame contents that differ from frame to frame and byte to byte, so that a misplaced or stale
// byte after the buffer moves shows up.
std::string patterned(size_t size, uint32_t seed) {
  std::string text(size, '\0');
  uint32_t x = seed * 2654435761u + 1;
  for (char& c : text) {
    x = x * 1664525u + 1013904223u;
    c = static_cast<char>(x >> 24);
  }
  return text;
}

TEST_CASE("a reader with huge buffers grows past 512 KiB into a mapping and keeps frames whole") {
  constexpr size_t kHuge = size_t{2} << 20;
  // Small frames around two large ones: the first large one moves the buffer from the heap to a
  // mapping, the second from that mapping to a bigger one, each while frames are part-read.
  const std::vector<size_t> sizes = {3000, 40000, 17,     600000, 5000,  123457, 2500000,
                                     9,    70000, 333333, 1,      700001, 64};
  std::vector<std::string> sent;
  std::string stream;
  for (size_t i = 0; i < sizes.size(); ++i) {
    sent.push_back(patterned(sizes[i], static_cast<uint32_t>(i)));
    kj::Array<capnp::word> flat = capnp::messageToFlatArray(*text_frame(sent.back()));
    stream.append(reinterpret_cast<const char*>(flat.begin()), flat.size() * sizeof(capnp::word));
  }

  SUBCASE("bytes appended in pieces that end inside frames") {
    for (bool huge : {true, false}) {
      CAPTURE(huge);
      FrameReader reader(size_t{8} << 20, huge);
      std::vector<std::string> received;
      for (size_t at = 0; at < stream.size();) {
        const size_t piece = std::min<size_t>(100003, stream.size() - at);
        reader.append(stream.data() + at, piece);
        at += piece;
        while (true) {
          auto frame = reader.next();
          REQUIRE(frame.ok());
          if (frame->size() == 0) break;
          received.push_back(text_of(*frame, reader.options()));
        }
      }
      CHECK(received == sent);
      CHECK(reader.capacity() > (size_t{512} << 10));
      // Where asked for, the buffer is a mapping of whole huge pages; elsewhere it stays on the heap.
      CHECK(reader.buffer_is_mapped() == huge);
      if (huge) CHECK(reader.capacity() % kHuge == 0);
    }
  }

  SUBCASE("frames read from a socket in partial reads") {
    SocketPair pair = *make_socket_pair();
    std::thread writer([&] {
      for (size_t at = 0; at < stream.size();) {
        ssize_t wrote = ::write(pair.parent_end.get(), stream.data() + at, stream.size() - at);
        if (wrote <= 0) return;
        at += static_cast<size_t>(wrote);
      }
    });
    FrameReader reader(size_t{8} << 20, /*huge_buffers=*/true);
    std::vector<std::string> received;
    while (received.size() < sent.size()) {
      auto frame = reader.read_blocking(pair.child_end.get());
      REQUIRE(frame.ok());
      received.push_back(text_of(*frame, reader.options()));
    }
    writer.join();
    CHECK(received == sent);
    CHECK(reader.buffer_is_mapped());
    CHECK(reader.capacity() % kHuge == 0);
  }
}

}  // namespace
}  // namespace procpool::internal
