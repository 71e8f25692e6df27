// Names the function at a place in an ELF file on disk: what turns a crashed worker's stack into
// function names, in the process that reads it (lib/wire/control_page.h).
//
// Why not in the worker: a worker records its stack from a signal handler, where the only
// symbolizer that can run (absl::Symbolize) reads each object's symbol table from the file by
// small reads, frame by frame, starting afresh in every new process. That cost about 20 ms of CPU
// per crash, paid again by every replacement worker. So the worker records each frame as a file
// and an offset in it (from /proc/self/maps), and the process that reads the stack (the pool, or
// a remote worker's relay: long-lived, on the same host) names them here, reading each file's
// symbol table once.
//
// The path comes from a worker, so it is not trusted: only a regular file is read (opened
// without blocking, never mapped: a file truncated meanwhile gives short reads, not SIGBUS), and
// every offset and size in it is checked against the file.

#ifndef PROCPOOL_LIB_COMMON_ELF_SYMBOLS_H_
#define PROCPOOL_LIB_COMMON_ELF_SYMBOLS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "lib/common/unique_fd.h"

namespace procpool::internal {

struct ElfSymbolTable;

// The functions of one 64-bit ELF file, opened once to name any number of places in it (the frames
// of one stack that are in the same binary).
class ElfFunctions {
 public:
  // The file at `path`, or nullopt if it cannot be read, is no regular file, or is no 64-bit ELF
  // file with a symbol table (or a dynamic one, used when it has none). Its table is read once
  // and kept while the file is unchanged (the last few files; not one changed in the last two
  // seconds, which a rewrite within one tick of the file times' clock could not be told from),
  // for every later open. Thread-safe.
  static std::optional<ElfFunctions> open(const std::string& path);

  // The demangled name of the function that contains byte `offset` of the file (an offset of
  // executable code, as /proc/<pid>/maps relates addresses to files), or nullopt if no function
  // the table names covers it.
  std::optional<std::string> function_at(uint64_t offset) const;

 private:
  ElfFunctions(UniqueFd file, std::shared_ptr<const ElfSymbolTable> table)
      : file_(std::move(file)), table_(std::move(table)) {}

  UniqueFd file_;  // for the names, read only when asked for
  std::shared_ptr<const ElfSymbolTable> table_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_ELF_SYMBOLS_H_
