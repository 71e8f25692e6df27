#include "lib/common/elf_symbols.h"

#include <cxxabi.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "lib/common/clock.h"
#include "lib/common/mutex.h"
#include "lib/common/unique_fd.h"

namespace procpool::internal {
namespace {

// Limits on what a file may make this process read or keep.
constexpr uint64_t kMaxElfSymbolTableBytes = uint64_t{64} << 20;  // 2.8 million symbols
constexpr uint16_t kMaxHeaders = 4096;  // program or section headers
constexpr size_t kMaxNameBytes = 512;   // a longer name is cut, ending in "..."
constexpr size_t kCachedFiles = 8;

// What a file's table is kept for: the same file, unchanged.
// What tells a file's versions apart. The times come from the kernel's coarse clock: a file
// rewritten in place within one of its ticks keeps them (and its size may be the same), so a
// table is cached only once its file has been left alone for kSettledNs (table_for). The inode's
// change time is kept too: a program can set a file's modification time back (utimes), never
// its change time.
struct FileIdentity {
  dev_t device = 0;
  ino_t inode = 0;
  uint64_t size = 0;
  int64_t modified_ns = 0;
  int64_t changed_ns = 0;
  bool operator==(const FileIdentity&) const = default;
};

// How long a file must have gone unchanged before its table is cached: well over a tick of the
// clock its times are stamped with (1-10 ms).
constexpr int64_t kSettledNs = 2'000'000'000;

struct LoadSegment {
  uint64_t offset = 0;  // in the file
  uint64_t address = 0;
  uint64_t size = 0;    // in the file
};

struct Function {
  uint64_t address = 0;
  uint64_t size = 0;
  uint32_t name = 0;  // offset in the string table
  bool local = false;  // STB_LOCAL: a file's own name ("f() [clone .localalias]"), an alias
};

}  // namespace

struct ElfSymbolTable {
  FileIdentity identity;
  std::vector<LoadSegment> segments;
  std::vector<Function> functions;  // by address
  uint64_t names_offset = 0;        // the string table, in the file
  uint64_t names_size = 0;
};

namespace {

bool read_at(int fd, void* out, uint64_t bytes, uint64_t offset) {
  auto* at = static_cast<char*>(out);
  while (bytes > 0) {
    const ssize_t got = ::pread(fd, at, bytes, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;  // an error, or a file shorter than it said
    at += got;
    bytes -= static_cast<uint64_t>(got);
    offset += static_cast<uint64_t>(got);
  }
  return true;
}

bool within_file(uint64_t offset, uint64_t bytes, uint64_t file_size) {
  return offset <= file_size && bytes <= file_size - offset;
}

template <typename Header>
bool read_headers(int fd, uint64_t offset, uint16_t count, uint16_t entry_size, uint64_t file_size,
                  std::vector<Header>& out) {
  if (count == 0) return true;
  if (entry_size != sizeof(Header) || count > kMaxHeaders ||
      !within_file(offset, uint64_t{count} * sizeof(Header), file_size)) {
    return false;
  }
  out.resize(count);
  return read_at(fd, out.data(), uint64_t{count} * sizeof(Header), offset);
}

// The functions of a 64-bit ELF file, or null if it is none or is malformed.
std::shared_ptr<const ElfSymbolTable> read_symbol_table(int fd, const FileIdentity& identity) {
  const uint64_t file_size = identity.size;
  Elf64_Ehdr header;
  if (file_size < sizeof header || !read_at(fd, &header, sizeof header, 0)) return nullptr;
  if (std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0 || header.e_ident[EI_CLASS] != ELFCLASS64) {
    return nullptr;
  }
  std::vector<Elf64_Phdr> programs;
  std::vector<Elf64_Shdr> sections;
  if (!read_headers(fd, header.e_phoff, header.e_phnum, header.e_phentsize, file_size, programs) ||
      !read_headers(fd, header.e_shoff, header.e_shnum, header.e_shentsize, file_size, sections)) {
    return nullptr;
  }
  auto table = std::make_shared<ElfSymbolTable>();
  table->identity = identity;
  for (const Elf64_Phdr& program : programs) {
    if (program.p_type == PT_LOAD) {
      table->segments.push_back(
          {.offset = program.p_offset, .address = program.p_vaddr, .size = program.p_filesz});
    }
  }
  // The full symbol table where the file kept one; else the dynamic one (exported names only).
  const Elf64_Shdr* symbols = nullptr;
  for (const uint32_t type : {SHT_SYMTAB, SHT_DYNSYM}) {
    for (const Elf64_Shdr& section : sections) {
      if (section.sh_type == type && section.sh_size > 0) {
        symbols = &section;
        break;
      }
    }
    if (symbols != nullptr) break;
  }
  if (symbols == nullptr || symbols->sh_entsize != sizeof(Elf64_Sym) ||
      symbols->sh_link >= sections.size() || symbols->sh_size > kMaxElfSymbolTableBytes ||
      !within_file(symbols->sh_offset, symbols->sh_size, file_size)) {
    return nullptr;
  }
  const Elf64_Shdr& names = sections[symbols->sh_link];
  if (!within_file(names.sh_offset, names.sh_size, file_size)) return nullptr;
  table->names_offset = names.sh_offset;
  table->names_size = names.sh_size;

  const uint64_t count = symbols->sh_size / sizeof(Elf64_Sym);
  std::vector<Elf64_Sym> chunk(4096);
  for (uint64_t first = 0; first < count; first += chunk.size()) {
    const uint64_t n = std::min<uint64_t>(chunk.size(), count - first);
    if (!read_at(fd, chunk.data(), n * sizeof(Elf64_Sym),
                 symbols->sh_offset + first * sizeof(Elf64_Sym))) {
      return nullptr;
    }
    for (uint64_t i = 0; i < n; ++i) {
      const Elf64_Sym& symbol = chunk[i];
      const unsigned type = ELF64_ST_TYPE(symbol.st_info);
      if ((type == STT_FUNC || type == STT_GNU_IFUNC) && symbol.st_shndx != SHN_UNDEF &&
          symbol.st_value != 0 && symbol.st_size != 0 && symbol.st_name < names.sh_size) {
        table->functions.push_back({.address = symbol.st_value,
                                    .size = symbol.st_size,
                                    .name = symbol.st_name,
                                    .local = ELF64_ST_BIND(symbol.st_info) == STB_LOCAL});
      }
    }
  }
  std::sort(table->functions.begin(), table->functions.end(),
            [](const Function& a, const Function& b) { return a.address < b.address; });
  return table;
}

// The address a file offset is loaded at, per the file's own segments.
std::optional<uint64_t> address_of(const ElfSymbolTable& table, uint64_t offset) {
  for (const LoadSegment& segment : table.segments) {
    if (offset >= segment.offset && offset - segment.offset < segment.size) {
      return offset - segment.offset + segment.address;
    }
  }
  return std::nullopt;
}

const Function* function_at_address(const ElfSymbolTable& table, uint64_t address) {
  auto after = std::upper_bound(
      table.functions.begin(), table.functions.end(), address,
      [](uint64_t a, const Function& function) { return a < function.address; });
  // Among those starting at the closest address below (aliases), one that reaches it; a global
  // name rather than a local alias of it.
  if (after == table.functions.begin()) return nullptr;
  const uint64_t closest = std::prev(after)->address;
  const Function* found = nullptr;
  for (auto it = after; it != table.functions.begin();) {
    --it;
    if (it->address != closest) break;
    if (address - it->address < it->size && (found == nullptr || (found->local && !it->local))) {
      found = &*it;
    }
  }
  return found;
}

std::string name_at(int fd, const ElfSymbolTable& table, uint32_t name) {
  const uint64_t bytes = std::min<uint64_t>(kMaxNameBytes, table.names_size - name);
  std::string raw(bytes, '\0');
  if (!read_at(fd, raw.data(), bytes, table.names_offset + name)) return {};
  const size_t end = raw.find('\0');
  const bool cut = end == std::string::npos;
  raw.resize(cut ? bytes : end);
  std::string readable = raw;
  int status = -1;
  if (raw.rfind("_Z", 0) == 0) {
    char* demangled = abi::__cxa_demangle(raw.c_str(), nullptr, nullptr, &status);
    if (status == 0 && demangled != nullptr) readable = demangled;
    std::free(demangled);
  }
  if (cut || readable.size() > kMaxNameBytes) {
    readable.resize(std::min(readable.size(), kMaxNameBytes));
    absl::StrAppend(&readable, "...");
  }
  return readable;
}

Mutex cache_mutex;
// The tables read last, the most recent at the end.
std::vector<std::shared_ptr<const ElfSymbolTable>>& cached_tables()
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(cache_mutex) {
  static auto* tables = new std::vector<std::shared_ptr<const ElfSymbolTable>>();
  return *tables;
}

std::shared_ptr<const ElfSymbolTable> table_for(int fd, const FileIdentity& identity) {
  MutexLock lock(cache_mutex);
  auto& tables = cached_tables();
  for (auto it = tables.begin(); it != tables.end(); ++it) {
    if ((*it)->identity == identity) {
      std::shared_ptr<const ElfSymbolTable> found = *it;
      tables.erase(it);
      tables.push_back(found);
      return found;
    }
  }
  std::shared_ptr<const ElfSymbolTable> table = read_symbol_table(fd, identity);
  if (table == nullptr) return nullptr;
  // (File times are wall-clock times.)
  const int64_t now_ns = clock_now_ns(CLOCK_REALTIME);
  if (now_ns - std::max(identity.modified_ns, identity.changed_ns) < kSettledNs) return table;
  if (tables.size() == kCachedFiles) tables.erase(tables.begin());
  tables.push_back(table);
  return table;
}

// Opens `path` for reading only if it is a regular file, without opening anything else on the
// way: O_PATH opens no device and waits for no FIFO writer; the file found is then opened again
// through /proc/self/fd.
UniqueFd open_regular_file(const std::string& path, struct stat& status) {
  UniqueFd place(::open(path.c_str(), O_PATH | O_CLOEXEC));
  if (!place || ::fstat(place.get(), &status) != 0 || !S_ISREG(status.st_mode)) return UniqueFd();
  const std::string again = absl::StrCat("/proc/self/fd/", place.get());
  return UniqueFd(::open(again.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
}

}  // namespace

std::optional<ElfFunctions> ElfFunctions::open(const std::string& path) {
  struct stat status {};
  UniqueFd file = open_regular_file(path, status);
  if (!file) return std::nullopt;
  const FileIdentity identity{
      .device = status.st_dev,
      .inode = status.st_ino,
      .size = static_cast<uint64_t>(status.st_size),
      .modified_ns = timespec_ns(status.st_mtim),
      .changed_ns = timespec_ns(status.st_ctim),
  };
  std::shared_ptr<const ElfSymbolTable> table = table_for(file.get(), identity);
  if (table == nullptr) return std::nullopt;
  return ElfFunctions(std::move(file), std::move(table));
}

std::optional<std::string> ElfFunctions::function_at(uint64_t offset) const {
  const std::optional<uint64_t> address = address_of(*table_, offset);
  if (!address) return std::nullopt;
  const Function* function = function_at_address(*table_, *address);
  if (function == nullptr) return std::nullopt;
  std::string name = name_at(file_.get(), *table_, function->name);
  if (name.empty()) return std::nullopt;
  return name;
}

}  // namespace procpool::internal
