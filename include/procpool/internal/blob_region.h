// Blobs: byte strings (std::string, procpool::Bytes) of kBlobMinBytes or more that a fork link
// carries through a shared-memory region of its worker instead of through the socket
// (lib/wire/shared_region.h): one copy into the region on one side, read in place (procpool::Bytes)
// or copied once (std::string) on the other, where the socket would copy twice more.
//
// The codecs of byte strings reach the region through the BlobContext of the thread that encodes
// or decodes: the pool sets one around encoding a batch and around decoding a worker's results
// (and a worker around its jobs and results). A context is bound to the one message it is for:
// a codec that encodes into a message of its own (a user's Codec<T> that serializes a part to
// keep or hash it) or decodes bytes that lie elsewhere sees no context at all, so user code can
// never observe the mode. Without one, or where the region is full, blobs travel in the frame as
// before, so every codec works everywhere.

#ifndef PROCPOOL_INTERNAL_BLOB_REGION_H_
#define PROCPOOL_INTERNAL_BLOB_REGION_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>

#include "capnp/common.h"
#include "capnp/message.h"
#include "kj/common.h"

namespace procpool::internal {

// Smaller byte strings travel in the frame: a copy through the socket costs them less than the
// bookkeeping of a region.
inline constexpr size_t kBlobMinBytes = size_t{64} << 10;

// One side's view of a shared region (implemented in lib/wire/shared_region.h).
class BlobRegion {
 public:
  virtual ~BlobRegion() = default;
  // Writing: copies `size` bytes into the area this side writes and returns their offset, or
  // nullopt if there is no room now (the caller then puts them in the frame).
  virtual std::optional<uint64_t> put(const void* data, size_t size) = 0;
  // Reading: where bytes [offset, offset + size) of the area the peer writes are, or nullptr if
  // they do not lie inside it (a peer's offsets are checked, never trusted).
  virtual const char* get(uint64_t offset, uint64_t size) const = 0;
};

// What the byte-string codecs of this thread may do now, for values in one message.
struct BlobContext {
  // Encoding: the message being built. Only values written into it see the region or sizing;
  // null: encoding writes bytes as anywhere else.
  capnp::MessageBuilder* message = nullptr;
  // Decoding: the frame being read. `views` holds only for bytes that lie in it (or in the
  // region); empty: none do.
  kj::ArrayPtr<const capnp::word> frame = nullptr;
  // Blobs may go to / come from this region; null: in the frame only.
  BlobRegion* region = nullptr;
  // Decoding procpool::Bytes may view the bytes where they lie (the region, or the frame) instead
  // of copying them: true only while a worker decodes a job, whose bytes outlive its task.
  bool views = false;
  // Only the encoded size matters (a batch being sized): a blob is neither copied nor placed;
  // its bytes are counted in `sized_bytes` instead of being written.
  bool sizing = false;
  size_t sized_bytes = 0;
  // Bytes put in the region while this context was current.
  size_t region_bytes = 0;
  // The most a blob read here may hold: a blob counts against max_frame_bytes as if it were in
  // the frame, so a peer can make us hold no more than a frame's worth.
  size_t max_blob_bytes = ~size_t{0};

  // True if `at` (a value's memory) lies in `message`. Costs a look at its segments: callers
  // ask only where the context would change what is written.
  bool writes_into(const void* at) const {
    if (message == nullptr) return false;
    for (kj::ArrayPtr<const capnp::word> segment : message->getSegmentsForOutput()) {
      if (contains(segment.begin(), segment.end(), at)) return true;
    }
    return false;
  }
  // True if [data, data + size) lies in `frame` (no bytes lie anywhere: an empty view is valid).
  bool frame_holds(const char* data, size_t size) const {
    if (size == 0) return true;
    const char* begin = reinterpret_cast<const char*>(frame.begin());
    const char* end = reinterpret_cast<const char*>(frame.end());
    return contains(begin, end, data) && contains(begin, end, data + size - 1);
  }

 private:
  // Pointers into unrelated objects compare through std::less (a total order).
  static bool contains(const void* begin, const void* end, const void* at) {
    return !std::less<const void*>()(at, begin) && std::less<const void*>()(at, end);
  }
};

inline BlobContext*& current_blob_context() {
  static thread_local BlobContext* context = nullptr;
  return context;
}

// Makes `context` current for the scope; the previous one comes back after.
class BlobScope {
 public:
  explicit BlobScope(BlobContext* context) : previous_(current_blob_context()) {
    current_blob_context() = context;
  }
  ~BlobScope() { current_blob_context() = previous_; }
  BlobScope(const BlobScope&) = delete;
  BlobScope& operator=(const BlobScope&) = delete;

 private:
  BlobContext* previous_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_BLOB_REGION_H_
