/// \file
/// procpool::Bytes: a byte string that a worker reads where it lies, without a copy.
///
/// Use it as a Job (or Result, or inside them) where payloads are large:
///
/// ```cpp
/// struct Checksum {
///   int64_t run(const procpool::Bytes& payload) {     // a view of the payload, not a copy
///     return crc64(payload.data(), payload.size());
///   }
/// };
/// procpool::ProcessPool<Checksum> pool({.workers = 4});
/// std::vector<procpool::Bytes> jobs;
/// for (const std::string& file : files) jobs.push_back(procpool::Bytes::borrow(file));
/// absl::StatusOr<std::vector<int64_t>> sums = pool.map(jobs);
/// ```
///
/// How it crosses. A payload of 64 KiB or more is copied once, by the parent, into a shared-memory
/// region of the worker it is for (mapped by both at the worker's start, closed with the worker),
/// and the worker's run() gets a Bytes that views it there; smaller ones travel in the frame, and
/// the worker's Bytes views them in its receive buffer. A std::string job instead is copied once
/// more, into the worker's string. Results of 64 KiB or more come back through the same region
/// (the parent copies them out while it decodes the results). Where no region is available (the
/// fork server, remote workers) everything travels in frames; the types and results are the same.
///
/// Lifetime. A Bytes either owns its bytes (made from a std::string) or views memory it does not
/// own (made by borrow(), or given to run()). A view is valid only while what it views is:
///   * Bytes::borrow(s): the caller keeps `s` alive and unchanged until the call that sends it has
///     returned (map, apply) or its AsyncResult is in (the async calls copy the Bytes objects, not
///     the bytes: the view must stay valid that long).
///   * the Bytes a worker's run() gets: until run() returns. Keep a copy (to_string(), or
///     Bytes(std::string(view()))) to hold the bytes longer.
/// Copying a Bytes copies an owned string and copies a view as a view. Results the parent
/// receives always own their bytes.
///
/// Thread safety: as std::string_view (views) and std::string (owned): const use from any thread.

#ifndef PROCPOOL_BYTES_H_
#define PROCPOOL_BYTES_H_

#include <cstddef>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "procpool/codec.h"

namespace procpool {

/// A byte string that owns its bytes or views them where they lie (see the file comment for
/// when a view stays valid). Same wire format as `std::string`.
class Bytes {
 public:
  /// Empty, owning.
  Bytes() = default;
  /// Owns `bytes`.
  explicit Bytes(std::string bytes) : owned_(std::move(bytes)), view_(owned_) {}
  /// Views `bytes` without copying them: the caller keeps them alive and unchanged as long as the
  /// file comment says.
  static Bytes borrow(absl::string_view bytes) {
    Bytes view;
    view.view_ = bytes;
    view.owns_ = false;
    return view;
  }

  /// Copies an owned string; copies a view as a view (the bytes are not copied).
  Bytes(const Bytes& other) { *this = other; }
  /// As the copy constructor.
  Bytes& operator=(const Bytes& other) {
    if (this == &other) return *this;
    owns_ = other.owns_;
    if (owns_) {
      owned_ = other.owned_;
      view_ = owned_;
    } else {
      owned_.clear();
      view_ = other.view_;
    }
    return *this;
  }
  /// Takes `other`'s bytes (or its view); `other` is left empty and owning.
  Bytes(Bytes&& other) noexcept { *this = std::move(other); }
  /// As the move constructor.
  Bytes& operator=(Bytes&& other) noexcept {
    if (this == &other) return *this;
    owns_ = other.owns_;
    if (owns_) {
      owned_ = std::move(other.owned_);
      view_ = owned_;
    } else {
      owned_.clear();
      view_ = other.view_;
    }
    other.owned_.clear();
    other.view_ = absl::string_view();
    other.owns_ = true;
    return *this;
  }

  /// The first byte (owned or viewed).
  const char* data() const { return view_.data(); }
  /// How many bytes.
  size_t size() const { return view_.size(); }
  /// True if there are none.
  bool empty() const { return view_.empty(); }
  /// The bytes as a string_view, valid as long as this Bytes (and, for a view, what it views).
  absl::string_view view() const { return view_; }
  /// As view().
  operator absl::string_view() const { return view_; }
  /// True if it owns its bytes; false for a view.
  bool owns() const { return owns_; }
  /// A copy of the bytes that lives on its own.
  std::string to_string() const { return std::string(view_); }

  /// Equal bytes, owned or viewed.
  friend bool operator==(const Bytes& a, const Bytes& b) { return a.view_ == b.view_; }

 private:
  friend struct Codec<Bytes>;
  // Views bytes it does not own (decoding: internal/blob_region.h says when).
  void set_view(const char* data, size_t size) {
    owned_.clear();
    view_ = absl::string_view(data, size);
    owns_ = false;
  }
  void set_owned(const char* data, size_t size) {
    owned_.assign(data, size);
    view_ = owned_;
    owns_ = true;
  }

  std::string owned_;
  absl::string_view view_;
  bool owns_ = true;
};

/// On the wire exactly as std::string (`bytes`, or a `blob` in a worker's shared region): a Bytes
/// and a std::string can be sent one way and read the other.
template <>
struct Codec<Bytes> {
  /// Writes `value` as `bytes` (or a `blob`). Throws `kj::Exception` past 2^29 - 1 bytes.
  static void encode(const Bytes& value, wire::Value::Builder out) {
    internal::encode_byte_string(value.data(), value.size(), out);
  }
  /// Reads `bytes` or a `blob`: a view where the bytes stay put for the reader (a worker's job),
  /// else an owned copy (a result). kDataLoss for any other member, or a blob outside the region.
  static absl::Status decode(wire::Value::Reader in, Bytes& out) {
    const char* data = nullptr;
    size_t size = 0;
    if (absl::Status found = internal::find_byte_string(in, data, size); !found.ok()) return found;
    // A view only of bytes that stay put for the reader: in the frame being decoded or in the
    // region (a blob), never in a message a user's codec decodes on its own.
    const internal::BlobContext* context = internal::current_blob_context();
    if (context != nullptr && context->views &&
        (in.which() == wire::Value::BLOB || context->frame_holds(data, size))) {
      out.set_view(data, size);
    } else {
      out.set_owned(data, size);
    }
    return absl::OkStatus();
  }
};

}  // namespace procpool

#endif  // PROCPOOL_BYTES_H_
