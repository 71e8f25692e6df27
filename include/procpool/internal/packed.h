// The packed path: jobs and results of scalar types (integers, floating point) travel as one
// packed Cap'n Proto list per batch (TaskBatch.packedJobs, ResultBatch.packedResults) instead of
// one Value struct each. Same types, same checks, a fraction of the work per task.

#ifndef PROCPOOL_INTERNAL_PACKED_H_
#define PROCPOOL_INTERNAL_PACKED_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/codec.h"

namespace procpool::internal {

template <typename T>
concept Scalar = Packed<T>;

// A packed list, resolved once: every accessor call on a Cap'n Proto reader counts against its
// traversal limit (a list's whole size each time), so per-element calls would exhaust it.
class PackedReader {
 public:
  explicit PackedReader(wire::Value::Reader in) : which_(in.which()) {
    switch (which_) {
      case wire::Value::INTS: ints_ = in.getInts(); size_ = ints_.size(); break;
      case wire::Value::UINTS: uints_ = in.getUints(); size_ = uints_.size(); break;
      case wire::Value::FLOATS: floats_ = in.getFloats(); size_ = floats_.size(); break;
      default: break;
    }
  }
  uint32_t size() const { return size_; }

  // Element `i` read as T: kDataLoss if it is not there, is of another kind or does not fit.
  template <Scalar T>
  absl::Status get(uint32_t i, T& out) const {
    if (i >= size_) return absl::DataLossError("packed list too short");
    if constexpr (Floating<T>) {
      if (which_ == wire::Value::FLOATS) return narrow_float(floats_[i], out);
    } else {
      if (which_ == wire::Value::INTS) return narrow(ints_[i], out);
      if (which_ == wire::Value::UINTS) return narrow(uints_[i], out);
    }
    return absl::DataLossError("a packed list of another type");
  }

 private:
  wire::Value::Which which_;
  capnp::List<int64_t>::Reader ints_;
  capnp::List<uint64_t>::Reader uints_;
  capnp::List<double>::Reader floats_;
  uint32_t size_ = 0;
};

// A packed list of T being filled, resolved once.
class PackedWriter {
 public:
  PackedWriter() = default;
  template <Scalar T>
  static PackedWriter make(wire::Value::Builder out, uint32_t count) {
    PackedWriter writer;
    if constexpr (Floating<T>) {
      writer.floats_ = out.initFloats(count);
    } else if constexpr (std::is_signed_v<T>) {
      writer.ints_ = out.initInts(count);
    } else {
      writer.uints_ = out.initUints(count);
    }
    return writer;
  }
  template <Scalar T>
  void set(uint32_t i, T value) {
    if constexpr (Floating<T>) {
      floats_.set(i, static_cast<double>(value));
    } else if constexpr (std::is_signed_v<T>) {
      ints_.set(i, static_cast<int64_t>(value));
    } else {
      uints_.set(i, static_cast<uint64_t>(value));
    }
  }

 private:
  capnp::List<int64_t>::Builder ints_ = nullptr;
  capnp::List<uint64_t>::Builder uints_ = nullptr;
  capnp::List<double>::Builder floats_ = nullptr;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_INTERNAL_PACKED_H_
