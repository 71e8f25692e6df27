// Unit tests of naming a crashed worker's frames where its stack is read: ElfFunctions
// (lib/common/elf_symbols.h) on this test's own code and on files a hostile worker could name
// instead (a FIFO, a device, a directory, truncated and corrupted ELF files), and
// symbolize_crash_stack (lib/wire/control_page.h) on the page's form and on garbage.

#include "lib/common/elf_symbols.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "doctest/doctest.h"
#include "lib/wire/control_page.h"
#include "tests/test_support.h"

// Named so that the tests can look for them. Not inlined, not folded.
[[gnu::noinline]] int elf_symbols_test_named_function(int x) {
  __asm__ volatile("" ::"r"(x) : "memory");
  return x * 3 + 1;
}

namespace procpool::internal {
namespace {

// Where `address` is: the file mapped there and the offset in it, as a worker's crash handler
// finds it (/proc/self/maps).
struct Place {
  std::string path;
  uint64_t offset = 0;
};

std::optional<Place> place_of(const void* address) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  const auto at = reinterpret_cast<uintptr_t>(address);
  while (std::getline(maps, line)) {
    std::istringstream fields(line);
    std::string range, perms, offset, device, inode, path;
    fields >> range >> perms >> offset >> device >> inode >> path;
    const size_t dash = range.find('-');
    const uintptr_t start = std::stoull(range.substr(0, dash), nullptr, 16);
    const uintptr_t end = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (at >= start && at < end && !path.empty() && path[0] == '/') {
      return Place{path, at - start + std::stoull(offset, nullptr, 16)};
    }
  }
  return std::nullopt;
}

// The one-shot form of what a stack's reader does for each frame.
std::optional<std::string> elf_function_at(const std::string& path, uint64_t offset) {
  std::optional<ElfFunctions> functions = ElfFunctions::open(path);
  if (!functions) return std::nullopt;
  return functions->function_at(offset);
}

std::string temp_dir() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string pattern = absl::StrCat(base != nullptr ? base : "/tmp", "/elf_symbols_XXXXXX");
  REQUIRE(::mkdtemp(pattern.data()) != nullptr);
  return pattern;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

TEST_CASE("a function of this program is named from the file and offset its code is at") {
  const auto* code = reinterpret_cast<const char*>(&elf_symbols_test_named_function);
  std::optional<Place> place = place_of(code + 4);
  REQUIRE(place.has_value());
  std::optional<std::string> name = elf_function_at(place->path, place->offset);
  REQUIRE(name.has_value());
  CHECK(*name == "elf_symbols_test_named_function(int)");
  // Asked again: the same answer, from the table kept.
  CHECK(elf_function_at(place->path, place->offset) == name);
  // The C library's exported functions, from its dynamic symbol table.
  std::optional<Place> libc = place_of(reinterpret_cast<const void*>(&::getpid));
  REQUIRE(libc.has_value());
  std::optional<std::string> getpid_name = elf_function_at(libc->path, libc->offset);
  REQUIRE(getpid_name.has_value());
  CHECK(absl::StrContains(*getpid_name, "getpid"));
}

TEST_CASE("a file rewritten in place, at its size and with its times set back, is read again") {
  const auto* code = reinterpret_cast<const char*>(&elf_symbols_test_named_function);
  std::optional<Place> place = place_of(code + 4);
  REQUIRE(place.has_value());
  const std::string original = testing::read_file(place->path);
  const std::string dir = temp_dir();
  const std::string path = dir + "/program";
  write_file(path, original);
  struct stat first {};
  REQUIRE(::stat(path.c_str(), &first) == 0);
  REQUIRE(elf_function_at(path, place->offset) == "elf_symbols_test_named_function(int)");
  // The same bytes but the ELF magic, written over the same inode, and its modification time
  // set back to the first version's: size, inode and mtime all as before.
  std::string rewritten = original;
  rewritten[1] = 'X';
  {
    std::fstream out(path, std::ios::binary | std::ios::in | std::ios::out);
    out.write(rewritten.data(), static_cast<std::streamsize>(rewritten.size()));
    REQUIRE(out.good());
  }
  const timespec times[2] = {first.st_atim, first.st_mtim};
  REQUIRE(::utimensat(AT_FDCWD, path.c_str(), times, 0) == 0);
  struct stat second {};
  REQUIRE(::stat(path.c_str(), &second) == 0);
  REQUIRE(second.st_ino == first.st_ino);
  REQUIRE(second.st_size == first.st_size);
  // No ELF file any more: nothing is named, not the first version's function.
  CHECK_FALSE(elf_function_at(path, place->offset).has_value());
  ::unlink(path.c_str());
  ::rmdir(dir.c_str());
}

TEST_CASE("an offset no function covers, or outside every segment, names nothing") {
  const auto* code = reinterpret_cast<const char*>(&elf_symbols_test_named_function);
  std::optional<Place> place = place_of(code);
  REQUIRE(place.has_value());
  CHECK_FALSE(elf_function_at(place->path, 0).has_value());  // the ELF header
  CHECK_FALSE(elf_function_at(place->path, ~uint64_t{0}).has_value());
}

TEST_CASE("files a hostile worker could name are refused without blocking or crashing") {
  const std::string dir = temp_dir();
  const std::string fifo = dir + "/fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK_FALSE(elf_function_at(fifo, 0).has_value());  // nobody writes: opening it would block
  CHECK_FALSE(elf_function_at("/dev/zero", 4096).has_value());
  CHECK_FALSE(elf_function_at("/dev/null", 0).has_value());
  CHECK_FALSE(elf_function_at("/proc/self/mem", 4096).has_value());
  CHECK_FALSE(elf_function_at(dir, 0).has_value());
  CHECK_FALSE(elf_function_at(dir + "/missing", 0).has_value());
  CHECK_FALSE(elf_function_at("", 0).has_value());
  CHECK_FALSE(elf_function_at("relative/path", 0).has_value());
  write_file(dir + "/text", "not an ELF file at all\n");
  CHECK_FALSE(elf_function_at(dir + "/text", 0).has_value());
  ::unlink(fifo.c_str());
}

TEST_CASE("truncated and corrupted copies of a real ELF file give no name, or a name, never a crash") {
  const auto* code = reinterpret_cast<const char*>(&elf_symbols_test_named_function);
  std::optional<Place> place = place_of(code + 4);
  REQUIRE(place.has_value());
  const std::string original = testing::read_file(place->path);
  REQUIRE(original.size() > 4096);
  const std::string dir = temp_dir();
  std::vector<std::string> written;
  int index = 0;
  auto try_file = [&](const std::string& bytes) {
    // A new name each time (and kept until the end): each version is a file of its own.
    const std::string path = absl::StrCat(dir, "/copy", index++);
    write_file(path, bytes);
    written.push_back(path);
    for (const uint64_t offset : {uint64_t{0}, place->offset, uint64_t{64}, uint64_t{1} << 40}) {
      std::optional<std::string> name = elf_function_at(path, offset);
      if (name) CHECK(name->size() <= 515);
    }
  };
  for (const size_t size : {size_t{0}, size_t{4}, size_t{63}, size_t{64}, size_t{4096},
                            original.size() / 2, original.size() - 1}) {
    try_file(original.substr(0, size));
  }
  // Headers with every offset and count pointing past the end.
  std::string lying = original.substr(0, 64);
  for (size_t i = 24; i < 64; ++i) lying[i] = '\xff';
  try_file(lying);
  // Random bytes changed in the headers and in the tables the reader follows.
  std::mt19937 random(20261207);
  for (int round = 0; round < 100; ++round) {
    std::string corrupted = original;
    for (int flips = 0; flips < 16; ++flips) {
      const size_t at = round % 2 == 0 ? random() % 256 : random() % corrupted.size();
      corrupted[at] = static_cast<char>(random());
    }
    try_file(corrupted);
  }
  for (const std::string& path : written) ::unlink(path.c_str());
}

TEST_CASE("a stack in the page's form becomes one named frame a line") {
  const auto* code = reinterpret_cast<const char*>(&elf_symbols_test_named_function);
  std::optional<Place> place = place_of(code + 4);
  REQUIRE(place.has_value());
  const std::string page = absl::StrCat("@0 ", place->path, "\n@1 /no/such/file\n",
                                        "#0 0x1234 0+0x", absl::Hex(place->offset), "\n",
                                        "#1 0x5678 ?\n", "#2 0x9abc 1+0x10\n");
  CHECK(symbolize_crash_stack(page) ==
        absl::StrCat("#0 0x1234 elf_symbols_test_named_function(int)\n", "#1 0x5678 (unknown)\n",
                     "#2 0x9abc (unknown) /no/such/file+0x10\n"));
}

TEST_CASE("a page of garbage stays garbage, line for line, and names nothing it should not") {
  // Lines of no known form are kept as they are (cleaned: printable ASCII only).
  CHECK(symbolize_crash_stack("hello\nworld") == "hello\nworld\n");
  CHECK(symbolize_crash_stack("") == "");
  CHECK(symbolize_crash_stack("\n\n\n") == "");
  // A place in a file never declared, or an index past the files a page may name.
  CHECK(symbolize_crash_stack("#0 0x1 3+0x10\n") == "#0 0x1 3+0x10\n");
  CHECK(symbolize_crash_stack("@99 /bin/true\n#0 0x1 99+0x10\n") == "#0 0x1 99+0x10\n");
  CHECK(symbolize_crash_stack("@18446744073709551616 /bin/true\n") == "");
  // Malformed places.
  CHECK(symbolize_crash_stack("#0 0x1 +0x\n") == "#0 0x1 +0x\n");
  CHECK(symbolize_crash_stack("#0 0x1 0+0xzz\n") == "#0 0x1 0+0xzz\n");
  CHECK(symbolize_crash_stack("#0 0x1 0+0x11111111111111111\n") ==
        "#0 0x1 0+0x11111111111111111\n");
  CHECK(symbolize_crash_stack("#\n# \n#0 \n") == "#\n# \n#0 \n");
  // A device named as a file: refused, shown as unknown.
  CHECK(symbolize_crash_stack("@0 /dev/zero\n#0 0x1 0+0x10\n") ==
        "#0 0x1 (unknown) /dev/zero+0x10\n");
  // Random pages: any output, no crash (ASan checks the rest).
  std::mt19937 random(7);
  for (int round = 0; round < 2000; ++round) {
    std::string page(random() % 200, ' ');
    const char alphabet[] = "@#0123456789abcdefx+? /\n";
    for (char& c : page) c = alphabet[random() % (sizeof alphabet - 1)];
    (void)symbolize_crash_stack(page);
  }
}

}  // namespace
}  // namespace procpool::internal
