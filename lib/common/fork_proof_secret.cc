#include "lib/common/fork_proof_secret.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18  // Linux 4.14; older C libraries lack the name
#endif

namespace procpool::internal {

ForkProofSecret::ForkProofSecret(size_t capacity) {
  if (capacity == 0) capacity = 1;
  void* mapped = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return;
  if (::madvise(mapped, capacity, MADV_WIPEONFORK) != 0 &&
      ::madvise(mapped, capacity, MADV_DONTFORK) != 0) {
    const int error = errno;
    ::munmap(mapped, capacity);
    errno = error;
    return;
  }
  data_ = static_cast<char*>(mapped);
  capacity_ = capacity;
  owner_ = ::getpid();
}

ForkProofSecret ForkProofSecret::copy_of(absl::string_view secret) {
  ForkProofSecret copy(secret.size());
  if (copy.valid()) {
    std::memcpy(copy.data(), secret.data(), secret.size());
    copy.resize(secret.size());
  }
  return copy;
}

ForkProofSecret::ForkProofSecret(ForkProofSecret&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      capacity_(std::exchange(other.capacity_, 0)),
      size_(std::exchange(other.size_, 0)),
      owner_(std::exchange(other.owner_, 0)) {}

ForkProofSecret& ForkProofSecret::operator=(ForkProofSecret&& other) noexcept {
  std::swap(data_, other.data_);
  std::swap(capacity_, other.capacity_);
  std::swap(size_, other.size_);
  std::swap(owner_, other.owner_);
  return *this;
}

ForkProofSecret::~ForkProofSecret() {
  // In a forked child the page is zeros, or (MADV_DONTFORK) not there at all: leave it be.
  if (data_ == nullptr || ::getpid() != owner_) return;
  ::explicit_bzero(data_, capacity_);
  ::munmap(data_, capacity_);
}

}  // namespace procpool::internal
