// Memory helpers for large buffers the pool fills at once (a map's result vector, frame buffers).
//
// On Linux every first touch of a 4 KiB page is a fault that costs microseconds (more on a virtual
// machine); a large buffer written once per call pays thousands of them. Transparent huge pages
// (2 MiB) cut that by 512x where the system allows them for regions that ask (THP "madvise" mode,
// the usual default).

#ifndef PROCPOOL_INTERNAL_MEMORY_H_
#define PROCPOOL_INTERNAL_MEMORY_H_

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace procpool::internal {

// Below this a buffer gains little from huge pages: leave it alone.
inline constexpr size_t kHugePageAdviceMinBytes = size_t{4} << 20;

// Asks for huge pages for the whole 2 MiB pages inside [data, data + bytes), before they are
// first touched. Advice only: harmless where THP is off, and for memory already touched.
inline void advise_huge_pages(const void* data, size_t bytes,
                              size_t min_bytes = kHugePageAdviceMinBytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (data == nullptr || bytes < min_bytes) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_MEMORY_H_
