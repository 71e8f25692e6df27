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
#include <optional>
#include <string>

namespace procpool::internal {

// The demangled name of the function that contains byte `offset` of the 64-bit ELF file at
// `path` (an offset of executable code, as /proc/<pid>/maps relates addresses to files),
// according to the file's symbol table, or its dynamic symbol table if it has none. nullopt if
// the file cannot be read, is no such ELF file, or names no function there. Each file's table is
// read once and kept while the file is unchanged (the last few files). Thread-safe.
std::optional<std::string> elf_function_at(const std::string& path, uint64_t offset);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_COMMON_ELF_SYMBOLS_H_
