// TlsChannel's writes (lib/wire/tls_channel.h): a bulk write gathers its records and sends them
// together, and the bytes it says it took are those whose records went to the socket. Shown over a
// socketpair whose buffer is far smaller than a write, so that the socket fills within records.

#include "lib/wire/tls_channel.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "doctest/doctest.h"
#include "lib/common/unique_fd.h"
#include "procpool/process_pool.h"

namespace procpool::internal {
namespace {

struct Pair {
  std::unique_ptr<TlsChannel> writer;  // the pool's end
  std::unique_ptr<TlsChannel> reader;  // a worker's
};

// Two ends of one session over a socketpair, the writer's send buffer small.
Pair connected_pair() {
  const std::string token = make_token();
  auto server = TlsContext::with_token(token, TlsContext::Role::kServer);
  auto client = TlsContext::with_token(token, TlsContext::Role::kClient);
  REQUIRE(server.ok());
  REQUIRE(client.ok());
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  const int small = 16 * 1024;
  ::setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  ::setsockopt(fds[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  auto writer = TlsChannel::open(*server, UniqueFd(fds[0]));
  auto reader = TlsChannel::open(*client, UniqueFd(fds[1]));
  REQUIRE(writer.ok());
  REQUIRE(reader.ok());
  Pair pair{*std::move(writer), *std::move(reader)};
  for (int step = 0; step < 100 && !(pair.writer->established() && pair.reader->established());
       ++step) {
    REQUIRE(pair.reader->handshake().ok());
    REQUIRE(pair.writer->handshake().ok());
  }
  REQUIRE(pair.writer->established());
  REQUIRE(pair.reader->established());
  return pair;
}

std::string pattern(size_t size, uint32_t seed) {
  std::string bytes(size, '\0');
  for (size_t i = 0; i < size; ++i) {
    seed = seed * 1103515245u + 12345u;
    bytes[i] = static_cast<char>(seed >> 24);
  }
  return bytes;
}

// Reads what the channel has now into `into`; false at the end of the stream or on an error.
bool read_available(TlsChannel& channel, std::string& into) {
  char buffer[64 * 1024];
  while (true) {
    absl::StatusOr<ssize_t> got = channel.read(buffer, sizeof(buffer));
    REQUIRE_MESSAGE(got.ok(), got.status());
    if (*got == 0) return false;
    if (*got < 0) return true;
    into.append(buffer, static_cast<size_t>(*got));
    if (channel.starved()) return true;
  }
}

TEST_CASE("a bulk write the socket takes in part delivers every byte in order once the rest is "
          "offered again: large pieces, small ones gathered, then a small write") {
  Pair pair = connected_pair();
  // A large piece, a frame's small segment table and small segments, then a large one: records
  // cut from pieces, records gathered from several.
  const std::vector<std::string> parts = {pattern(700 * 1024 + 3, 1), pattern(8, 2),
                                          pattern(100, 3),             pattern(5000, 4),
                                          pattern(1300 * 1024 + 5, 5), pattern(40, 6)};
  std::string sent;
  for (const std::string& part : parts) sent += part;
  std::vector<iovec> pieces;
  for (const std::string& part : parts) {
    pieces.push_back({const_cast<char*>(part.data()), part.size()});
  }
  std::string received;
  size_t next = 0;
  int partial_writes = 0;
  while (next < pieces.size()) {
    absl::StatusOr<size_t> taken = pair.writer->write(&pieces[next], pieces.size() - next);
    REQUIRE_MESSAGE(taken.ok(), taken.status());
    size_t left = *taken;
    partial_writes += next < pieces.size() && left > 0 ? 1 : 0;
    while (left > 0) {
      const size_t part = std::min(left, pieces[next].iov_len);
      pieces[next].iov_base = static_cast<char*>(pieces[next].iov_base) + part;
      pieces[next].iov_len -= part;
      left -= part;
      if (pieces[next].iov_len == 0) ++next;
    }
    while (next < pieces.size() && pieces[next].iov_len == 0) ++next;
    // The reader takes what has come (a little at a time: the writer's socket fills again).
    REQUIRE(read_available(*pair.reader, received));
  }
  // Then a small write (a heartbeat's): one record, sent at once.
  const std::string ping = pattern(24, 7);
  iovec small{const_cast<char*>(ping.data()), ping.size()};
  while (small.iov_len > 0) {
    absl::StatusOr<size_t> taken = pair.writer->write(&small, 1);
    REQUIRE(taken.ok());
    small.iov_base = static_cast<char*>(small.iov_base) + *taken;
    small.iov_len -= *taken;
    REQUIRE(read_available(*pair.reader, received));
  }
  sent += ping;
  for (int i = 0; i < 1000 && received.size() < sent.size(); ++i) {
    pollfd ready{pair.reader->fd(), POLLIN, 0};
    ::poll(&ready, 1, 100);
    REQUIRE(read_available(*pair.reader, received));
  }
  MESSAGE(partial_writes, " writes took part of what was offered");
  CHECK(partial_writes > 1);
  CHECK(received.size() == sent.size());
  CHECK(received == sent);
}

TEST_CASE("the bytes a write says it took reach the peer even if the rest is never offered again") {
  Pair pair = connected_pair();
  const std::string bulk = pattern(2 * 1024 * 1024, 8);
  iovec piece{const_cast<char*>(bulk.data()), bulk.size()};
  absl::StatusOr<size_t> taken = pair.writer->write(&piece, 1);
  REQUIRE(taken.ok());
  REQUIRE(*taken > 0);
  REQUIRE(*taken < bulk.size());  // the socket is far smaller
  // The writer goes away (its connection drops); what it took must all arrive, and be sound.
  pair.writer.reset();
  std::string received;
  for (int i = 0; i < 1000; ++i) {
    char buffer[64 * 1024];
    absl::StatusOr<ssize_t> got = pair.reader->read(buffer, sizeof(buffer));
    if (!got.ok() || *got == 0) break;
    if (*got < 0) {
      pollfd ready{pair.reader->fd(), POLLIN, 0};
      ::poll(&ready, 1, 100);
      continue;
    }
    received.append(buffer, static_cast<size_t>(*got));
  }
  MESSAGE("took ", *taken, " of ", bulk.size(), " bytes; ", received.size(), " arrived");
  CHECK(received.size() >= *taken);
  CHECK(received == bulk.substr(0, received.size()));
}


// A session whose peer sent a record that fails its check is over: a write to it after that is an
// error, not a success and not an abort (the pool writes a batch to a worker in the same turn of
// its loop as it read that worker's forged record; absl aborts on a StatusOr made from OK).
TEST_CASE("a write after a record failed its check fails with a status") {
  Pair pair = connected_pair();
  // An application-data record of 32 bytes the session never sealed.
  std::string forged = "\x17\x03\x03";
  forged += '\0';
  forged += '\x20';
  forged += pattern(32, 9);
  REQUIRE(::send(pair.reader->fd(), forged.data(), forged.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(forged.size()));
  pollfd ready{pair.writer->fd(), POLLIN, 0};
  REQUIRE(::poll(&ready, 1, 10000) == 1);
  char buffer[256];
  absl::StatusOr<ssize_t> got = pair.writer->read(buffer, sizeof(buffer));
  REQUIRE_FALSE(got.ok());
  CHECK(got.status().code() == absl::StatusCode::kDataLoss);
  CHECK(pair.writer->record_failed());
  for (size_t size : {size_t{24}, size_t{200} * 1024}) {
    CAPTURE(size);
    const std::string bytes = pattern(size, 10);
    iovec piece{const_cast<char*>(bytes.data()), bytes.size()};
    absl::StatusOr<size_t> taken = pair.writer->write(&piece, 1);
    CHECK_FALSE(taken.ok());
  }
}

}  // namespace
}  // namespace procpool::internal
