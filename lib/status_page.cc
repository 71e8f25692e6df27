#include "lib/status_page.h"

#include <sys/mman.h>
#include <time.h>

#include <cerrno>
#include <new>
#include <utility>

#include "absl/status/status.h"

namespace procpool::internal {

absl::StatusOr<StatusPageMapping> StatusPageMapping::create() {
  void* memory = ::mmap(nullptr, sizeof(StatusPage), PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return absl::ErrnoToStatus(errno, "mmap of a worker status page");
  StatusPageMapping mapping;
  mapping.page_ = new (memory) StatusPage();
  return mapping;
}

StatusPageMapping::StatusPageMapping(StatusPageMapping&& other) noexcept
    : page_(std::exchange(other.page_, nullptr)) {}

StatusPageMapping& StatusPageMapping::operator=(StatusPageMapping&& other) noexcept {
  if (this != &other) {
    if (page_ != nullptr) ::munmap(page_, sizeof(StatusPage));
    page_ = std::exchange(other.page_, nullptr);
  }
  return *this;
}

StatusPageMapping::~StatusPageMapping() {
  if (page_ != nullptr) ::munmap(page_, sizeof(StatusPage));
}

int64_t monotonic_now_ns() {
  timespec now;
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

}  // namespace procpool::internal
