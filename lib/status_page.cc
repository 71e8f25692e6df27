#include "lib/status_page.h"

#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <new>
#include <utility>

#include "absl/status/status.h"

namespace procpool::internal {

absl::StatusOr<StatusPageMapping> StatusPageMapping::create() {
  UniqueFd fd(::memfd_create("procpool-status", MFD_CLOEXEC));
  if (!fd) return absl::ErrnoToStatus(errno, "memfd_create for a worker status page");
  if (::ftruncate(fd.get(), sizeof(StatusPage)) != 0) {
    return absl::ErrnoToStatus(errno, "ftruncate of a worker status page");
  }
  absl::StatusOr<StatusPageMapping> mapping = map(fd.get());
  if (!mapping.ok()) return mapping.status();
  new (mapping->page_) StatusPage();
  mapping->fd_ = std::move(fd);
  return mapping;
}

absl::StatusOr<StatusPageMapping> StatusPageMapping::map(int fd) {
  void* memory = ::mmap(nullptr, sizeof(StatusPage), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (memory == MAP_FAILED) return absl::ErrnoToStatus(errno, "mmap of a worker status page");
  StatusPageMapping mapping;
  mapping.page_ = static_cast<StatusPage*>(memory);
  return mapping;
}

StatusPageMapping::StatusPageMapping(StatusPageMapping&& other) noexcept
    : page_(std::exchange(other.page_, nullptr)), fd_(std::move(other.fd_)) {}

StatusPageMapping& StatusPageMapping::operator=(StatusPageMapping&& other) noexcept {
  if (this != &other) {
    if (page_ != nullptr) ::munmap(page_, sizeof(StatusPage));
    page_ = std::exchange(other.page_, nullptr);
    fd_ = std::move(other.fd_);
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
