// SharedRegion: a worker's shared-memory region for blobs (byte strings of kBlobMinBytes or more,
// include/procpool/internal/blob_region.h), so that large payloads cross without the socket's two
// copies.
//
// One memfd per worker, made and mapped MAP_SHARED by the parent before it forks the worker, and
// inherited by no process forked (lib/common/shared_memory.h): the worker maps it again at the
// same address (map_in_worker), no sibling maps it, and it is freed once the worker has exited and
// its link has unmapped and closed it. Two areas of kAreaBytes each, sparse until used:
//   jobs     written by the parent (the blobs of the batches it sends), read by the worker;
//   results  written by the worker (the blobs of its results), read by the parent.
// Jobs: the parent places each blob at the lowest offset where it fits between the blobs still in
// use, and frees a batch's blobs when the worker has no further use for them (its results are in,
// or it was taken back unstarted), so the same low pages serve again and again. Results: a ring
// of positions that only grow (offset = position mod kAreaBytes; a blob never straddles the end);
// the worker may not pass the mark the parent stores in the region's header after it has decoded
// a results frame (the position the frame's blobs end at, ResultBatch.blobsEnd); a drained ring
// starts again at offset 0. When an area is empty, pages beyond kRetainBytes are returned to the
// system.
//
// Trust. The parent reads only the results area, and only through get(), which checks every
// offset and size against the area; a worker's writes can spoil only its own results. The worker
// likewise checks the parent's offsets.
//
// Threads: not thread-safe. The parent uses it under the pool's lock; the worker from its thread.

#ifndef PROCPOOL_LIB_WIRE_SHARED_REGION_H_
#define PROCPOOL_LIB_WIRE_SHARED_REGION_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "lib/common/unique_fd.h"
#include "procpool/internal/blob_region.h"

namespace procpool::internal {

class SharedRegion {
 public:
  static constexpr uint64_t kAreaBytes = uint64_t{256} << 20;
  static constexpr uint64_t kRetainBytes = uint64_t{64} << 20;

  // A fresh region (memfd named `name`, mapping): in the parent, before forking the worker it is
  // for.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> create(
      const std::string& name = "procpool-blobs");
  // Unmaps and closes (in the parent, as the worker's link goes).
  ~SharedRegion();
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;

  // --- The parent ----------------------------------------------------------------------------
  // Writes jobs' blobs (put) for batch `seq` until the next begin_batch, and reads results' blobs
  // (get).
  BlobRegion& parent() { return parent_; }
  void begin_batch(uint64_t seq) { parent_.batch_ = seq; }
  // The worker has no further use for batch `seq`'s blobs (its results are in, or it was taken
  // back before it started).
  void release_batch(uint64_t seq);
  // The parent has decoded results whose blobs end at `position` (ResultBatch.blobsEnd): the
  // worker may reuse the area before it. Positions beyond what the worker wrote are ignored.
  void release_results(uint64_t position);

  // --- The worker (its copy of this object, after fork) ----------------------------------------
  // Reads jobs' blobs (get) and writes results' blobs (put).
  BlobRegion& worker() { return worker_; }
  // Where the blobs written so far end (for ResultBatch.blobsEnd).
  uint64_t results_end() const { return worker_.head_; }
  // In the worker just forked: maps the region again at the parent's address, and forgets the
  // descriptor without closing it (the worker closes every inherited descriptor). On failure the
  // worker has no region and must exit.
  absl::Status map_in_worker();
  // In the parent once the worker is forked (it maps its own copy): closes the parent's
  // descriptor; the mapping stays (ControlPageMapping::close_descriptor's reason).
  void close_descriptor();

 private:
  struct Header {
    std::atomic<uint64_t> results_released{0};  // written by the parent
  };
  static constexpr size_t kHeaderBytes = 4096;

  class ParentSide final : public BlobRegion {
   public:
    std::optional<uint64_t> put(const void* data, size_t size) override;
    const char* get(uint64_t offset, uint64_t size) const override;

    SharedRegion* region_ = nullptr;
    uint64_t batch_ = 0;
    struct Blob {
      uint64_t offset;
      uint64_t size;
      uint64_t batch;
    };
    std::vector<Blob> used_;  // by offset
    uint64_t touched_ = 0;    // the highest offset written since the last trim
  };

  class WorkerSide final : public BlobRegion {
   public:
    std::optional<uint64_t> put(const void* data, size_t size) override;
    const char* get(uint64_t offset, uint64_t size) const override;

    SharedRegion* region_ = nullptr;
    uint64_t head_ = 0;
    uint64_t floor_ = 0;  // where the ring last started again at offset 0
    uint64_t touched_ = 0;
  };

  SharedRegion(UniqueFd fd, char* base);
  char* jobs() const { return base_ + kHeaderBytes; }
  char* results() const { return base_ + kHeaderBytes + kAreaBytes; }
  Header* header() const { return reinterpret_cast<Header*>(base_); }
  static size_t mapping_bytes() { return kHeaderBytes + 2 * kAreaBytes; }
  // Returns pages of [from, to) of an area to the system (they read as zero after).
  static void trim(char* area, uint64_t from, uint64_t to);

  UniqueFd fd_;
  char* base_ = nullptr;
  ParentSide parent_;
  WorkerSide worker_;
};

// Where a blob of `size` bytes goes in a ring whose writer is at `head` and whose reader has
// released up to `released` (positions): its start position, or nullopt if it does not fit now.
// Never straddles the end of the area; an empty ring starts again at offset 0.
std::optional<uint64_t> place_in_ring(uint64_t head, uint64_t released, uint64_t size,
                                      uint64_t area_bytes);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WIRE_SHARED_REGION_H_
