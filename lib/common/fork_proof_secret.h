// ForkProofSecret: a secret (the pool's token, a key derived from it, a session's key) kept in
// memory that a fork leaves behind, so that a process forked afterwards — a remote worker its
// relay forks, and whatever that worker's tasks run — finds no copy of it.
//
// A copy in the heap would be inherited byte for byte. This is a mapping of its own, advised
// MADV_WIPEONFORK (a child sees zeros there; Linux 4.14), or MADV_DONTFORK on older kernels (no
// such mapping in a child). Erased when destroyed, in the process that made it only (in a child
// the bytes are gone already, and with MADV_DONTFORK so is the page). Move-only; not thread-safe.
//
//   ForkProofSecret key(32);
//   if (!key.valid()) return absl::ErrnoToStatus(errno, "mapping a page for the key");
//   derive_into(key.data(), 32);
//   key.resize(32);
//   use(key.view());

#ifndef PROCPOOL_LIB_COMMON_FORK_PROOF_SECRET_H_
#define PROCPOOL_LIB_COMMON_FORK_PROOF_SECRET_H_

#include <sys/types.h>

#include <cstddef>

#include "absl/strings/string_view.h"

namespace procpool::internal {

class ForkProofSecret {
 public:
  ForkProofSecret() = default;  // holds nothing (not valid())
  // Room for `capacity` bytes; not valid() when the page could not be mapped (errno says why).
  explicit ForkProofSecret(size_t capacity);
  // A copy of `secret` (not valid() when the page could not be mapped).
  static ForkProofSecret copy_of(absl::string_view secret);
  ForkProofSecret(ForkProofSecret&& other) noexcept;
  ForkProofSecret& operator=(ForkProofSecret&& other) noexcept;
  ~ForkProofSecret();

  bool valid() const { return data_ != nullptr; }
  size_t capacity() const { return capacity_; }
  char* data() { return data_; }
  size_t size() const { return size_; }
  void resize(size_t size) { size_ = size; }  // at most capacity()
  absl::string_view view() const { return absl::string_view(data_, size_); }

 private:
  char* data_ = nullptr;
  size_t capacity_ = 0;
  size_t size_ = 0;
  pid_t owner_ = 0;  // the process that mapped it
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_FORK_PROOF_SECRET_H_
