// libFuzzer target: whatever bytes a worker writes, the parent's frame decoding (FrameReader,
// Cap'n Proto's reader with our limits, the FromWorker frame, wire statuses and the codecs, the
// words of scalar results, and blobs referenced in the worker's shared region with the offsets
// and sizes the worker chose) ends in a status, never a crash, a hang, a read outside the region
// or undefined behaviour. Built and run by tools/fuzz.sh with
// clang's -fsanitize=fuzzer,address,undefined.
//
// With PROCPOOL_FUZZ_SEEDS defined it is instead a program that writes a seed corpus of valid
// frames into the directory named by argv[1].

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "capnp/message.h"
#include "capnp/serialize.h"
#include "kj/exception.h"
#include "lib/wire/frame_io.h"
#include "lib/wire/shared_region.h"
#include "procpool/bytes.h"
#include "procpool/codec.h"
#include "procpool/internal/blob_region.h"
#include "procpool/internal/packed.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/internal/worker_body.h"

namespace {

using Nested = std::vector<std::map<std::string, std::optional<std::tuple<int64_t, double, bool>>>>;

// The region the parent reads blobs from (as in Scheduler::on_results): one for the whole run.
procpool::internal::SharedRegion& region() {
  static procpool::internal::SharedRegion* made =
      procpool::internal::SharedRegion::create().value().release();
  return *made;
}

// What the pool core does with a frame from a worker, minus the bookkeeping.
void consume(kj::ArrayPtr<const capnp::word> words, const capnp::ReaderOptions& options) {
  procpool::internal::BlobContext blobs{.region = &region().parent()};
  procpool::internal::BlobScope scope(&blobs);
  try {
    capnp::FlatArrayMessageReader message(words, options);
    auto frame = message.getRoot<procpool::wire::FromWorker>();
    switch (frame.which()) {
      case procpool::wire::FromWorker::READY:
        break;
      case procpool::wire::FromWorker::ENTER_FAILED:
        (void)procpool::internal::status_from_wire(frame.getEnterFailed());
        break;
      case procpool::wire::FromWorker::EXITED:
        (void)procpool::internal::status_from_wire(frame.getExited());
        break;
      case procpool::wire::FromWorker::RESULTS: {
        auto results = frame.getResults();
        if (results.hasWordResults()) {
          uint32_t count = 0;
          const uint64_t* words = procpool::internal::words_of(results.getWordResults(), count);
          int64_t value = 0;
          for (uint32_t i = 0; words != nullptr && i < count; ++i) {
            (void)procpool::internal::from_word(words[i], results.getWordKind(), value);
          }
        }
        for (auto outcome : results.getOutcomes()) {
          if (outcome.which() == procpool::wire::Outcome::OK) {
            (void)procpool::decode_value<int64_t>(outcome.getOk());
            if (auto text = procpool::decode_value<std::string>(outcome.getOk()); text.ok()) {
              // Every byte a blob names must be readable: ASan reports a read outside.
              volatile char sink = 0;
              for (char c : *text) sink = static_cast<char>(sink + c);
            }
            (void)procpool::decode_value<procpool::Bytes>(outcome.getOk());
            (void)procpool::decode_value<std::vector<double>>(outcome.getOk());
            (void)procpool::decode_value<Nested>(outcome.getOk());
          } else {
            (void)procpool::internal::status_from_wire(outcome.getError());
          }
        }
        region().release_results(results.getBlobsEnd());
        break;
      }
      default:
        (void)frame.which();  // a remote worker host's own frames: remote_host_fuzzer.cc
        break;
    }
  } catch (const kj::Exception&) {
    // The parent's one boundary for Cap'n Proto errors: this becomes kDataLoss there.
  }
}

}  // namespace

#ifndef PROCPOOL_FUZZ_SEEDS

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  procpool::internal::FrameReader reader(1 << 20);
  // Feed in two pieces, as a socket might deliver them.
  const size_t split = size / 3;
  reader.append(data, split);
  for (int piece = 0; piece < 2; ++piece) {
    while (true) {
      auto frame = reader.next();
      if (!frame.ok() || frame->size() == 0) break;
      consume(*frame, reader.options());
    }
    if (piece == 0) reader.append(data + split, size - split);
  }
  return 0;
}

#else

#include <fstream>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  int count = 0;
  auto save = [&](capnp::MallocMessageBuilder& message) {
    kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
    std::ofstream out(std::string(argv[1]) + "/seed" + std::to_string(count++), std::ios::binary);
    out.write(reinterpret_cast<const char*>(words.begin()), words.size() * sizeof(capnp::word));
  };
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<procpool::wire::FromWorker>().setReady();
    save(message);
  }
  {
    capnp::MallocMessageBuilder message;
    procpool::internal::status_to_wire(absl::UnavailableError("down"),
                                       message.initRoot<procpool::wire::FromWorker>().initEnterFailed());
    save(message);
  }
  {
    capnp::MallocMessageBuilder message;
    auto results = message.initRoot<procpool::wire::FromWorker>().initResults();
    auto outcomes = results.initOutcomes(4);
    procpool::encode_value(int64_t{42}, outcomes[0].initOk());
    procpool::encode_value(std::string("hello"), outcomes[1].initOk());
    Nested nested = {{{"a", std::make_tuple(int64_t{1}, 2.5, true)}, {"b", std::nullopt}}};
    procpool::encode_value(nested, outcomes[2].initOk());
    procpool::internal::set_error(outcomes[3], absl::NotFoundError("nope"));
    save(message);
  }
  {
    // Blobs in the shared region: one inside it, one past its end.
    capnp::MallocMessageBuilder message;
    auto results = message.initRoot<procpool::wire::FromWorker>().initResults();
    auto outcomes = results.initOutcomes(2);
    auto inside = outcomes[0].initOk().initBlob();
    inside.setOffset(4096);
    inside.setSize(70000);
    auto outside = outcomes[1].initOk().initBlob();
    outside.setOffset(procpool::internal::SharedRegion::kAreaBytes - 10);
    outside.setSize(100);
    results.setBlobsEnd(74096);
    save(message);
  }
  {
    capnp::MallocMessageBuilder message;
    auto results = message.initRoot<procpool::wire::FromWorker>().initResults();
    results.setWordKind(procpool::wire::WordKind::INTS);
    auto words = results.initWordResults(24);
    for (size_t i = 0; i < words.size(); ++i) words[i] = static_cast<kj::byte>(i * 37);
    results.setCount(3);
    save(message);
  }
  return 0;
}

#endif
