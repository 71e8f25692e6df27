#include "lib/wire/control_page.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <new>
#include <utility>

#include "absl/status/status.h"

namespace procpool::internal {

void open_claims(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t count) {
  page.claims[slot % ControlPage::kClaimSlots].store(pack_claim(tag, count, 0),
                                                      std::memory_order_release);
}

uint32_t claim_tasks(ControlPage& page, uint32_t slot, uint16_t tag, uint32_t next, uint32_t want) {
  std::atomic<uint64_t>& word = page.claims[slot % ControlPage::kClaimSlots];
  uint64_t seen = word.load(std::memory_order_acquire);
  while (true) {
    if (claim_tag(seen) != tag || claim_next(seen) != next || next >= claim_limit(seen)) return 0;
    const uint32_t got = std::min(want, claim_limit(seen) - next);
    if (word.compare_exchange_weak(seen, pack_claim(tag, claim_limit(seen), next + got),
                                   std::memory_order_acq_rel, std::memory_order_acquire)) {
      return got;
    }
  }
}

uint32_t revoke_claims(ControlPage& page, uint32_t slot, uint16_t tag) {
  std::atomic<uint64_t>& word = page.claims[slot % ControlPage::kClaimSlots];
  uint64_t seen = word.load(std::memory_order_acquire);
  while (true) {
    if (claim_tag(seen) != tag) return 0;  // never opened for this batch
    const uint32_t claimed = claim_next(seen);
    if (word.compare_exchange_weak(seen, pack_claim(tag, claimed, claimed),
                                   std::memory_order_acq_rel, std::memory_order_acquire)) {
      return claimed;
    }
  }
}

absl::StatusOr<ControlPageMapping> ControlPageMapping::create() {
  UniqueFd fd = own_fd(::memfd_create("procpool-control", MFD_CLOEXEC));
  if (!fd) return absl::ErrnoToStatus(errno, "memfd_create for a worker's control page");
  static_assert(sizeof(ControlPage) <= HeldFrames::kOffset);
  if (::ftruncate(fd.get(), kControlMappingBytes) != 0) {
    return absl::ErrnoToStatus(errno, "ftruncate of a worker's control page");
  }
  absl::StatusOr<ControlPageMapping> mapping = map(fd.get());
  if (!mapping.ok()) return mapping.status();
  // Default-initialized, not value-initialized: the memfd is zero already, and the held frames'
  // data must not be touched (a page fault each) before it is used.
  new (mapping->page_) ControlPage;
  new (held_frames(mapping->page_)) HeldFrames;
  mapping->fd_ = std::move(fd);
  return mapping;
}

absl::StatusOr<ControlPageMapping> ControlPageMapping::map(int fd) {
  void* memory = ::mmap(nullptr, kControlMappingBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (memory == MAP_FAILED) return absl::ErrnoToStatus(errno, "mmap of a worker's control page");
  ControlPageMapping mapping;
  mapping.page_ = static_cast<ControlPage*>(memory);
  return mapping;
}

ControlPageMapping::ControlPageMapping(ControlPageMapping&& other) noexcept
    : page_(std::exchange(other.page_, nullptr)), fd_(std::move(other.fd_)) {}

ControlPageMapping& ControlPageMapping::operator=(ControlPageMapping&& other) noexcept {
  if (this != &other) {
    if (page_ != nullptr) ::munmap(page_, kControlMappingBytes);
    page_ = std::exchange(other.page_, nullptr);
    fd_ = std::move(other.fd_);
  }
  return *this;
}

ControlPageMapping::~ControlPageMapping() {
  if (page_ != nullptr) ::munmap(page_, kControlMappingBytes);
}

ControlPage* ControlPageMapping::release() {
  fd_.reset();
  return std::exchange(page_, nullptr);
}

}  // namespace procpool::internal
