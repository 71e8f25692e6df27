// Large byte strings through a worker's shared region (issue 10): procpool::Bytes jobs read in
// place, std::string and Bytes jobs and results of every size arriving intact, a worker's blob
// outside its region refused, and regions that live exactly as long as their worker.

#include "procpool/bytes.h"

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "lib/wire/shared_region.h"
#include "procpool/process_pool.h"
#include "tests/test_support.h"

// A result type whose codec writes a blob reference of the worker's choosing: what a worker that
// scribbles on its frames could send.
struct Forged {
  uint64_t offset = 0;
  uint64_t size = 0;
};

namespace procpool {
template <>
struct Codec<Forged> {
  static void encode(const Forged& value, wire::Value::Builder out) {
    auto blob = out.initBlob();
    blob.setOffset(value.offset);
    blob.setSize(value.size);
  }
  static absl::Status decode(wire::Value::Reader in, Forged& out) {
    const char* data = nullptr;
    size_t size = 0;
    return internal::find_byte_string(in, data, size);
  }
};
}  // namespace procpool

// A user type whose codec serializes its payload into a message of its own (to keep it, hash it
// or send it elsewhere) and says, on the wire, whether that message held the payload's bytes.
struct Sealed {
  std::string payload;
  bool whole = false;  // decoded: whether the encoder's own message held every byte of it
};

namespace procpool {
template <>
struct Codec<Sealed> {
  static void encode(const Sealed& value, wire::Value::Builder out) {
    capnp::MallocMessageBuilder own;
    auto inner = own.initRoot<wire::Value>();
    encode_value(value.payload, inner);
    const bool whole = inner.isBytes() && inner.getBytes().size() == value.payload.size();
    const kj::Array<capnp::word> words = capnp::messageToFlatArray(own);
    auto list = out.initList(2);
    encode_value(whole, list[0]);
    encode_value(std::string(words.asChars().begin(), words.asChars().size()), list[1]);
  }
  static absl::Status decode(wire::Value::Reader in, Sealed& out) {
    std::tuple<bool, std::string> parts;
    if (absl::Status s = decode_value(in, parts); !s.ok()) return s;
    const std::string& flat = std::get<1>(parts);
    kj::Array<capnp::word> words = kj::heapArray<capnp::word>(flat.size() / sizeof(capnp::word));
    std::memcpy(words.begin(), flat.data(), words.size() * sizeof(capnp::word));
    capnp::FlatArrayMessageReader own(words);
    out.whole = std::get<0>(parts);
    return decode_value(own.getRoot<wire::Value>(), out.payload);
  }
};
}  // namespace procpool

namespace procpool {
namespace {

using testing::wait_until;

PoolOptions quiet(PoolOptions options) {
  options.log_sink = nullptr;
  return options;
}

// How many mappings of blob regions this process has, and descriptors of them.
int region_mappings() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int count = 0;
  while (std::getline(maps, line)) count += line.find("-blobs (deleted)") != std::string::npos;
  return count;
}
int region_descriptors() {
  int count = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  while (dirent* entry = ::readdir(dir)) {
    char target[256] = {};
    const std::string path = std::string("/proc/self/fd/") + entry->d_name;
    if (::readlink(path.c_str(), target, sizeof(target) - 1) > 0 &&
        absl::StrContains(target, "-blobs (deleted)")) {
      ++count;
    }
  }
  ::closedir(dir);
  return count;
}

std::string pattern(size_t size, int seed) {
  std::string s(size, 0);
  for (size_t i = 0; i < size; ++i) s[i] = static_cast<char>((i * 131 + seed * 7) & 0xff);
  return s;
}

// Says how it got its payload, and sends a transformed copy back as a Bytes result.
struct Inspector {
  Bytes run(const Bytes& payload) {
    std::string out = absl::StrCat(payload.owns() ? "owned:" : "view:", payload.size(), ":");
    out.append(payload.data(), payload.size());
    for (size_t i = out.find(':', 5) + 1; i < out.size(); ++i) out[i] = static_cast<char>(out[i] ^ 0x5a);
    return Bytes(std::move(out));
  }
};

TEST_CASE("Bytes jobs reach run() as views where they lie; results of every size arrive owned") {
  ProcessPool<Inspector> pool(quiet({.workers = 2}));
  std::vector<std::string> payloads;
  for (size_t size : {size_t{0}, size_t{10}, size_t{64 << 10} - 1, size_t{64 << 10},
                      size_t{3 << 20}, size_t{17 << 20}}) {
    payloads.push_back(pattern(size, static_cast<int>(payloads.size())));
  }
  std::vector<Bytes> jobs;
  for (const std::string& p : payloads) jobs.push_back(Bytes::borrow(p));
  for (size_t chunksize : {size_t{1}, size_t{3}}) {
    CAPTURE(chunksize);
    auto results = pool.map(jobs, {.chunksize = chunksize});
    REQUIRE(results.ok());
    for (size_t i = 0; i < payloads.size(); ++i) {
      CAPTURE(payloads[i].size());
      const Bytes& result = (*results)[i];
      CHECK(result.owns());
      const std::string header = absl::StrCat("view:", payloads[i].size(), ":");
      REQUIRE(result.size() == header.size() + payloads[i].size());
      CHECK(result.view().substr(0, header.size()) == header);
      bool same = true;
      for (size_t k = 0; k < payloads[i].size() && same; ++k) {
        same = static_cast<char>(result.data()[header.size() + k] ^ 0x5a) == payloads[i][k];
      }
      CHECK(same);
    }
  }
}

struct Echo {
  std::string run(const std::string& s) { return s + "!"; }
};

TEST_CASE("std::string jobs and results of every size cross intact, again and again") {
  ProcessPool<Echo> pool(quiet({.workers = 2}));
  std::vector<std::string> jobs;
  for (int round = 0; round < 3; ++round) {
    for (size_t size : {size_t{1}, size_t{100 << 10}, size_t{5 << 20}, size_t{64 << 10}}) {
      jobs.push_back(pattern(size, round));
    }
  }
  for (int again = 0; again < 3; ++again) {
    auto results = pool.map(jobs);
    REQUIRE(results.ok());
    for (size_t i = 0; i < jobs.size(); ++i) CHECK((*results)[i] == jobs[i] + "!");
  }
  // Through apply and imap too.
  CHECK(*pool.apply(jobs[2]) == jobs[2] + "!");
  size_t i = 0;
  for (absl::StatusOr<std::string> r : pool.imap(jobs, {.chunksize = 2})) {
    REQUIRE(r.ok());
    CHECK(*r == jobs[i++] + "!");
  }
}

struct Forger {
  Forged run(int64_t which) {
    switch (which) {
      case 0: return {0, 100};                                    // inside: fine
      case 1: return {internal::SharedRegion::kAreaBytes, 1};     // just past the end
      case 2: return {internal::SharedRegion::kAreaBytes - 5, 6};  // straddles the end
      default: return {~uint64_t{0} - 3, 8};                      // wraps around
    }
  }
};

// User code in a worker that encodes a large string itself (to store it, or send it elsewhere)
// gets self-contained bytes: the region is procpool's own business, only around jobs and results.
struct SelfEncoder {
  std::string run(int64_t size) {
    capnp::MallocMessageBuilder message;
    auto value = message.initRoot<wire::Value>();
    encode_value(std::string(static_cast<size_t>(size), 'z'), value);
    if (!value.isBytes()) return "not bytes";
    std::string decoded;
    if (absl::Status s = decode_value(value.asReader(), decoded); !s.ok()) {
      return std::string(s.message());
    }
    return decoded.size() == static_cast<size_t>(size) ? "ok" : "wrong size";
  }
};

TEST_CASE("a worker's own encode_value of a large string writes bytes, not a region reference") {
  ProcessPool<SelfEncoder> pool(quiet({.workers = 1}));
  auto results = pool.map(std::vector<int64_t>{10, int64_t{1} << 20, int64_t{4} << 20});
  REQUIRE(results.ok());
  CHECK(*results == std::vector<std::string>{"ok", "ok", "ok"});
}

// The job's flag says what the parent's encode of it found, the result's what the worker's did.
struct SealedEcho {
  std::pair<bool, Sealed> run(const Sealed& job) { return {job.whole, Sealed{job.payload}}; }
};

TEST_CASE("a user's codec that encodes into a message of its own gets bytes, on either side") {
  ProcessPool<SealedEcho> pool(quiet({.workers = 1}));
  std::vector<Sealed> jobs;
  for (int i = 0; i < 4; ++i) jobs.push_back(Sealed{pattern(size_t{100} << 10, i)});
  jobs.push_back(Sealed{"small"});
  // chunksize 5: the batch is sized before it is built, then built with the region in use.
  auto results = pool.map(jobs, {.chunksize = 5});
  REQUIRE(results.ok());
  for (size_t i = 0; i < jobs.size(); ++i) {
    CAPTURE(i);
    CHECK((*results)[i].first);         // the parent's encode of the job
    CHECK((*results)[i].second.whole);  // the worker's encode of the result
    CHECK((*results)[i].second.payload == jobs[i].payload);
  }
}

TEST_CASE("a blob a worker places outside its region fails that task with kDataLoss") {
  ProcessPool<Forger> pool(quiet({.workers = 1}));
  std::vector<int64_t> jobs = {0, 1, 2, 3, 0};
  auto call = pool.map_async(jobs, {.chunksize = 1});
  (void)call.wait(absl::Seconds(10));
  for (int64_t job : {1, 2, 3}) {
    auto one = pool.apply(job);
    REQUIRE_FALSE(one.ok());
    CHECK(one.status().code() == absl::StatusCode::kDataLoss);
    CHECK(absl::StrContains(one.status().message(), "outside the shared region"));
  }
  CHECK(pool.apply(0).ok());
  CHECK(pool.stats().workers_restarted == 0);
}

struct Nap {
  int64_t run(const std::string& s) { return static_cast<int64_t>(s.size()); }
};
struct Numbers {
  int64_t run(int64_t x) { return x; }
};

TEST_CASE("a worker's region is mapped while it lives and unmapped with it; the pool keeps no descriptor of it") {
  const int before = region_mappings();
  {
    ProcessPool<Nap> pool(quiet({.workers = 2}));
    CHECK(region_mappings() == before + 2);
    // The worker has its own copy of the memfd from the fork: the pool closed its one (2
    // descriptors a worker at most: issue 19's scale_limits_test).
    CHECK(wait_until([] { return region_descriptors() == 0; }));
    std::vector<std::string> jobs(4, std::string(1 << 20, 'x'));
    REQUIRE(pool.map(jobs).ok());
    // A worker killed from outside: its replacement has a region of its own, the old one goes.
    const pid_t victim = pool.stats().workers[0].pid;
    REQUIRE(::kill(victim, SIGKILL) == 0);
    REQUIRE(wait_until([&] {
      const PoolStats stats = pool.stats();
      return stats.workers_restarted == 1 && stats.workers[0].pid != victim &&
             stats.workers[0].state == WorkerState::kIdle;
    }));
    REQUIRE(pool.map(jobs).ok());
    CHECK(region_mappings() == before + 2);
    CHECK(wait_until([] { return region_descriptors() == 0; }));
  }
  CHECK(region_mappings() == before);
  CHECK(region_descriptors() == 0);
  {
    // Jobs and results of numbers only: no region at all.
    ProcessPool<Numbers> pool(quiet({.workers = 2}));
    CHECK(region_mappings() == before);
  }
}

}  // namespace
}  // namespace procpool
