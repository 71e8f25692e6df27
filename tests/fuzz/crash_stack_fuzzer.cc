// libFuzzer target: whatever a worker leaves in its page's crash stack, and whatever ELF file it
// names there, reading the stack (crash_stack_text: symbolize_crash_stack, ElfFunctions) ends in
// printable text, never a crash, a hang, a read outside a buffer or undefined behaviour. Built and
// run by tools/fuzz.sh with clang's -fsanitize=fuzzer,address,undefined.
//
// The first byte picks the mode: even, the rest is the page's stack as the worker wrote it (its
// claimed length first, in two bytes); odd, the rest is an ELF file's bytes, which a fixed page
// names, frame after frame, at offsets spread over the file.

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "lib/wire/control_page.h"

namespace {

using procpool::internal::ControlPage;

void check_printable(const std::string& text) {
  for (const char c : text) {
    if (c != '\n' && (c < 0x20 || c > 0x7e)) __builtin_trap();
  }
}

ControlPage& page() {
  static ControlPage* made = new ControlPage;
  return *made;
}

std::string read_stack(const char* stack, size_t bytes, uint32_t claimed) {
  std::memset(page().crash_stack, 0, ControlPage::kCrashStackBytes);
  std::memcpy(page().crash_stack, stack, std::min<size_t>(bytes, ControlPage::kCrashStackBytes));
  page().crash_stack_bytes.store(claimed);
  return procpool::internal::crash_stack_text(page());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto* bytes = reinterpret_cast<const char*>(data + 1);
  const size_t rest = size - 1;
  if (data[0] % 2 == 0) {
    if (rest < 2) return 0;
    // The length the worker claims (0xffff: just the bytes given), then the stack.
    const uint32_t claimed = uint32_t{data[1]} << 8 | data[2];
    check_printable(read_stack(bytes + 2, rest - 2, claimed == 0xffff ? rest - 2 : claimed));
    return 0;
  }
  // A file of these bytes, new each time (a reused name and inode with the same size and time
  // would be taken for the file read before).
  static int serial = 0;
  const char* dir = std::getenv("TMPDIR");
  const std::string path = absl::StrCat(dir != nullptr ? dir : "/tmp", "/crash_stack_fuzzer.",
                                        ::getpid(), ".", serial++);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return 0;
  (void)!::write(fd, bytes, rest);
  ::close(fd);
  std::string stack = absl::StrCat("@0 ", path, "\n");
  for (uint64_t i = 0; i < 8; ++i) {
    absl::StrAppend(&stack, "#", i, " 0x1 0+0x", absl::Hex(rest * i / 8 + i), "\n");
  }
  check_printable(read_stack(stack.data(), stack.size(), static_cast<uint32_t>(stack.size())));
  ::unlink(path.c_str());
  return 0;
}
