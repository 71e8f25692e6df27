#include "lib/wire/shared_region.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <utility>

#include "absl/status/status.h"
#include "lib/common/shared_memory.h"

namespace procpool::internal {

std::optional<uint64_t> place_in_ring(uint64_t head, uint64_t released, uint64_t size,
                                      uint64_t area_bytes) {
  if (size == 0 || size > area_bytes || released > head) return std::nullopt;
  if (released == head) {
    // Empty: start again at offset 0 (the same pages, warm), unless already there.
    return (head + area_bytes - 1) / area_bytes * area_bytes;
  }
  uint64_t start = head;
  if (start % area_bytes + size > area_bytes) {
    start = (start / area_bytes + 1) * area_bytes;  // to the next lap: no straddling
  }
  if (start + size - released > area_bytes) return std::nullopt;
  return start;
}

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::create(const std::string& name) {
  absl::StatusOr<SharedMemory> memory =
      create_shared_memory(name, mapping_bytes(), "a worker's blob region");
  if (!memory.ok()) return memory.status();
  return std::unique_ptr<SharedRegion>(new SharedRegion(std::move(memory->fd), memory->base));
}

absl::Status SharedRegion::map_in_worker() {
  absl::Status mapped =
      map_again_after_fork(fd_.get(), base_, mapping_bytes(), "a worker's blob region");
  (void)fd_.release();
  if (!mapped.ok()) base_ = nullptr;
  return mapped;
}

void SharedRegion::close_descriptor() { fd_.reset(); }

SharedRegion::SharedRegion(UniqueFd fd, char* base) : fd_(std::move(fd)), base_(base) {
  new (header()) Header();
  parent_.region_ = this;
  worker_.region_ = this;
}

SharedRegion::~SharedRegion() {
  if (base_ != nullptr) ::munmap(base_, mapping_bytes());
}

void SharedRegion::trim(char* area, uint64_t from, uint64_t to) {
  if (to <= from) return;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  from = (from + page - 1) / page * page;
  if (to <= from) return;
  // Frees the backing pages of the memfd: for both mappings, the parent's and the worker's.
  (void)::madvise(area + from, to - from, MADV_REMOVE);
}

// --- The parent --------------------------------------------------------------------------------

std::optional<uint64_t> SharedRegion::ParentSide::put(const void* data, size_t size) {
  if (size == 0 || size > kAreaBytes) return std::nullopt;
  if (used_.empty() && touched_ > kRetainBytes) {
    trim(region_->jobs(), kRetainBytes, touched_);
    touched_ = kRetainBytes;
  }
  // The lowest gap that fits: few blobs are in use at once (a batch or two per worker).
  uint64_t offset = 0;
  size_t at = 0;
  for (; at < used_.size(); ++at) {
    if (used_[at].offset - offset >= size) break;
    offset = used_[at].offset + used_[at].size;
  }
  if (offset + size > kAreaBytes) return std::nullopt;
  std::memcpy(region_->jobs() + offset, data, size);
  touched_ = std::max(touched_, offset + size);
  used_.insert(used_.begin() + static_cast<ptrdiff_t>(at), Blob{offset, size, batch_});
  return offset;
}

const char* SharedRegion::ParentSide::get(uint64_t offset, uint64_t size) const {
  if (offset > kAreaBytes || size > kAreaBytes - offset) return nullptr;
  return region_->results() + offset;
}

void SharedRegion::release_batch(uint64_t seq) {
  std::erase_if(parent_.used_, [seq](const ParentSide::Blob& blob) { return blob.batch == seq; });
}

void SharedRegion::release_results(uint64_t position) {
  std::atomic<uint64_t>& released = header()->results_released;
  if (position > released.load(std::memory_order_relaxed)) {
    released.store(position, std::memory_order_release);
  }
}

// --- The worker --------------------------------------------------------------------------------

std::optional<uint64_t> SharedRegion::WorkerSide::put(const void* data, size_t size) {
  // The parent's mark is a position it read in a frame of ours: never past our head, and never
  // before where we last started again at offset 0 (the gap before that is nobody's).
  const uint64_t released = std::clamp(
      region_->header()->results_released.load(std::memory_order_acquire), floor_, head_);
  const std::optional<uint64_t> start = place_in_ring(head_, released, size, kAreaBytes);
  if (!start) return std::nullopt;
  if (released == head_) floor_ = *start;
  if (released == head_ && *start % kAreaBytes == 0 && touched_ > kRetainBytes) {
    trim(region_->results(), kRetainBytes, touched_);
    touched_ = kRetainBytes;
  }
  const uint64_t offset = *start % kAreaBytes;
  std::memcpy(region_->results() + offset, data, size);
  touched_ = std::max(touched_, offset + size);
  head_ = *start + size;
  return offset;
}

const char* SharedRegion::WorkerSide::get(uint64_t offset, uint64_t size) const {
  if (offset > kAreaBytes || size > kAreaBytes - offset) return nullptr;
  return region_->jobs() + offset;
}

}  // namespace procpool::internal
