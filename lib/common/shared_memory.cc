#include "lib/common/shared_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"

namespace procpool::internal {

absl::StatusOr<SharedMemory> create_shared_memory(const std::string& name, size_t bytes,
                                                  const char* what) {
  SharedMemory memory;
  memory.fd = own_fd(::memfd_create(name.c_str(), MFD_CLOEXEC));
  if (!memory.fd) return absl::ErrnoToStatus(errno, absl::StrCat("memfd_create for ", what));
  if (::ftruncate(memory.fd.get(), static_cast<off_t>(bytes)) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("ftruncate of ", what));
  }
  void* mapped = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                        memory.fd.get(), 0);
  if (mapped == MAP_FAILED) return absl::ErrnoToStatus(errno, absl::StrCat("mmap of ", what));
  if (::madvise(mapped, bytes, MADV_DONTFORK) != 0) {
    const int error = errno;
    ::munmap(mapped, bytes);
    return absl::ErrnoToStatus(error, absl::StrCat("madvise(MADV_DONTFORK) of ", what));
  }
  memory.base = static_cast<char*>(mapped);
  return memory;
}

absl::Status map_again_after_fork(int fd, char* base, size_t bytes, const char* what) {
  // The range is free here: fork left the parent's mapping out. NOREPLACE all the same, so that
  // a mistake fails instead of mapping over something.
  void* mapped = ::mmap(base, bytes, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_NORESERVE | MAP_FIXED_NOREPLACE, fd, 0);
  if (mapped == MAP_FAILED) {
    return absl::ErrnoToStatus(errno, absl::StrCat("mmap of ", what, " in its worker"));
  }
  if (mapped != base) {  // a kernel before 4.17 takes the address as a hint only
    ::munmap(mapped, bytes);
    return absl::InternalError(absl::StrCat("could not map ", what, " at its address in its worker"));
  }
  return absl::OkStatus();
}

}  // namespace procpool::internal
