// The word path: jobs and results of scalar types (integers, floating point) travel as one blob
// of 8-byte little-endian words per batch (TaskBatch.wordJobs, ResultBatch.wordResults) instead of
// one Value struct each. Same types, same range checks, a fraction of the work per task; and a
// blob can be sent from where it lies (the caller's array in the parent, the receive buffer in
// the worker, which computes its results in place).

#ifndef PROCPOOL_INTERNAL_PACKED_H_
#define PROCPOOL_INTERNAL_PACKED_H_

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/codec.h"

namespace procpool::internal {

template <typename T>
concept Scalar = Packed<T>;

static_assert(std::endian::native == std::endian::little,
              "the word path sends scalars as little-endian words, as they lie in memory");

// --- The word path: scalars as raw 8-byte words (TaskBatch.wordJobs, ResultBatch.wordResults).

// The kind of word a scalar type travels as.
template <Scalar T>
constexpr wire::WordKind word_kind() {
  if constexpr (Floating<T>) {
    return wire::WordKind::FLOATS;
  } else if constexpr (std::is_signed_v<T>) {
    return wire::WordKind::INTS;
  } else {
    return wire::WordKind::UINTS;
  }
}

// True when a T in memory is already its word: an array of T can be sent as it lies.
template <typename T>
constexpr bool kWordIsNative =
    (Integer<T> && sizeof(T) == 8) || std::is_same_v<T, double>;

template <Scalar T>
inline uint64_t to_word(T value) {
  if constexpr (Floating<T>) {
    return std::bit_cast<uint64_t>(static_cast<double>(value));
  } else if constexpr (std::is_signed_v<T>) {
    return static_cast<uint64_t>(static_cast<int64_t>(value));
  } else {
    return static_cast<uint64_t>(value);
  }
}

// Reads a word of `kind` as T: false if it is of another kind or does not fit. No allocation.
template <Scalar T>
inline bool from_word(uint64_t word, wire::WordKind kind, T& out) {
  if constexpr (Floating<T>) {
    if (kind != wire::WordKind::FLOATS) return false;
    const double value = std::bit_cast<double>(word);
    if constexpr (std::is_same_v<T, float>) {
      if (std::isfinite(value) && std::fabs(value) > std::numeric_limits<float>::max()) return false;
    }
    out = static_cast<T>(value);
    return true;
  } else {
    using Standard =
        std::conditional_t<std::is_signed_v<T>, std::make_signed_t<T>, std::make_unsigned_t<T>>;
    if (kind == wire::WordKind::INTS) {
      const int64_t value = static_cast<int64_t>(word);
      if (!std::in_range<Standard>(value)) return false;
      out = static_cast<T>(value);
      return true;
    }
    if (kind == wire::WordKind::UINTS) {
      if (!std::in_range<Standard>(word)) return false;
      out = static_cast<T>(word);
      return true;
    }
    return false;
  }
}

// Why from_word refused a word (for the task's kDataLoss).
template <Scalar T>
absl::Status word_error(uint64_t word, wire::WordKind kind) {
  if constexpr (Floating<T>) {
    if (kind == wire::WordKind::FLOATS) {
      return absl::DataLossError(
          absl::StrCat("float ", std::bit_cast<double>(word), " out of range for float"));
    }
  } else {
    if (kind == wire::WordKind::INTS) {
      return absl::DataLossError(absl::StrCat("integer ", static_cast<int64_t>(word),
                                              " out of range for ", integer_type_name<T>()));
    }
    if (kind == wire::WordKind::UINTS) {
      return absl::DataLossError(
          absl::StrCat("integer ", word, " out of range for ", integer_type_name<T>()));
    }
  }
  return absl::DataLossError(absl::StrCat("a word of kind ", static_cast<int>(kind),
                                          " where a ", Floating<T> ? "float" : "integer",
                                          " was expected"));
}

// A blob of words as the reader sees it: nullptr if its size is not a whole number of words or
// it is not aligned for 8-byte reads (never the case for a blob read from a frame).
inline const uint64_t* words_of(capnp::Data::Reader blob, uint32_t& count) {
  if (blob.size() % sizeof(uint64_t) != 0 ||
      reinterpret_cast<uintptr_t>(blob.begin()) % alignof(uint64_t) != 0) {
    count = 0;
    return nullptr;
  }
  count = static_cast<uint32_t>(blob.size() / sizeof(uint64_t));
  return reinterpret_cast<const uint64_t*>(blob.begin());
}

// How the word loop of a worker stamps each task (control_page.h). Always: the index of the task
// it starts, in `task_index`. With `started_ns` set, also each task's start, read from `now`, and
// the loop stops early (before a task, never before the first) once `cut_after_ns` have passed
// since `stride_start_ns`: the caller then sends the results that were held behind a slow task.
// Without it, the caller stamps the stride's start and times the stride.
struct WordStamps {
  std::atomic<uint32_t>* task_index = nullptr;
  std::atomic<int64_t>* started_ns = nullptr;
  int64_t (*now)() = nullptr;
  int64_t stride_start_ns = 0;
  int64_t cut_after_ns = 0;
};

// Failures of a word loop: (task index in the batch, status), ascending.
using WordErrors = std::vector<std::pair<uint32_t, absl::Status>>;

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_PACKED_H_
