// Copyright procpool authors.

/// \file
/// capnp_struct.h: sending Cap'n Proto structs from your own schema as procpool jobs and results.
///
/// A `T::Reader` points into a message someone else owns, so it cannot outlive the frame it was
/// read from. `CapnpStruct<T>` is an owning, immutable, cheaply copyable handle to one struct of
/// type `T` (a generated struct type such as `MyJob`): it holds its own flat copy of the struct and
/// everything it points to. Its `Codec` writes the struct into the `Value`'s `struct` member and
/// decodes by copying out of the frame, so a decoded `CapnpStruct` lives as long as you keep it.
///
/// ```cpp
/// #include "procpool/capnp_struct.h"
/// #include "my_job.capnp.h"
///
/// auto job = procpool::CapnpStruct<MyJob>::build([](MyJob::Builder b) {
///   b.setName("render");
///   b.setFrames(240);
/// });
/// std::string_view name = job.reader().getName().cStr();
///
/// // Or copy a struct you are reading from elsewhere:
/// procpool::CapnpStruct<MyJob> copy(some_reader);
/// ```
///
/// With Bazel, compile your schema with `capnp_cc_library` from `@procpool//bazel:capnp.bzl`.
///
/// Facts:
///
///   * Copies share one immutable buffer per distinct struct, sized exactly to it;
///     `reader()` is cheap and any number of threads may read through copies at once.
///   * The wire carries no schema: decoding checks that the `Value` holds a struct pointer, and
///     Cap'n Proto's usual rules then apply (missing fields read as defaults, extra fields are
///     ignored), exactly as for any Cap'n Proto message.
///   * Structs holding capabilities (interfaces) are not supported: copying one throws
///     `kj::Exception`, and decoding one yields kDataLoss.
///   * As an encode-only convenience, `T::Reader` and `T::Builder` can be encoded directly
///     (written the same way as `CapnpStruct<T>`); decode into a `CapnpStruct<T>`.

#ifndef PROCPOOL_CAPNP_STRUCT_H_
#define PROCPOOL_CAPNP_STRUCT_H_

#include <concepts>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "capnp/any.h"
#include "capnp/common.h"
#include "capnp/message.h"
#include "kj/debug.h"
#include "procpool/codec.h"

namespace procpool {

/// True for generated Cap'n Proto struct types (`MyJob`, not `MyJob::Reader`).
template <typename T>
concept CapnpStructType = (capnp::kind<T>() == capnp::Kind::STRUCT);

/// An owning, immutable, cheaply copyable copy of one Cap'n Proto struct of generated type `T`,
/// usable as a Job or Result (see the file comment). Copies share the buffer; any number of
/// threads may read through copies at once.
template <CapnpStructType T>
class CapnpStruct {
 public:
  /// The generated reader type, `T::Reader`.
  using Reader = typename T::Reader;
  /// The generated builder type, `T::Builder`.
  using Builder = typename T::Builder;

  /// A struct with every field at its default. Allocates nothing.
  CapnpStruct() = default;

  /// Deep-copies `reader` and everything it points to. Throws `kj::Exception` if `reader` is
  /// malformed (it reads past its message's limits) or holds capabilities.
  explicit CapnpStruct(Reader reader);

  /// Builds a struct: calls `fn(builder)` on a fresh `T::Builder`, then keeps a copy of the
  /// result. Throws `kj::Exception` where Cap'n Proto does (and whatever `fn` throws).
  template <typename Fn>
    requires std::invocable<Fn&, Builder>
  static CapnpStruct build(Fn&& fn);

  /// Reads the struct (every field at its default for a default-constructed one). Valid while
  /// this object, or any copy of it, lives. Never throws.
  Reader reader() const;

  /// Size of the owned copy in words (0 for a default-constructed one).
  std::size_t size_in_words() const { return size_; }

 private:
  std::shared_ptr<const capnp::word[]> words_;
  std::size_t size_ = 0;
};

// ---- implementation details ----

/// \cond
template <CapnpStructType T>
CapnpStruct<T>::CapnpStruct(Reader reader) {
  const capnp::MessageSize size = reader.totalSize();
  KJ_REQUIRE(size.capCount == 0, "procpool::CapnpStruct cannot hold capabilities");
  const std::size_t words = static_cast<std::size_t>(size.wordCount) + 1;  // + the root pointer.
  // Value-initialized, hence zeroed, as copyToUnchecked requires. (Not make_shared: capnp::word
  // is not copyable, which some standard libraries' array make_shared need.)
  std::shared_ptr<capnp::word[]> buffer(new capnp::word[words]());
  capnp::copyToUnchecked(reader, kj::arrayPtr(buffer.get(), words));
  words_ = std::move(buffer);
  size_ = words;
}

template <CapnpStructType T>
template <typename Fn>
  requires std::invocable<Fn&, typename T::Builder>
CapnpStruct<T> CapnpStruct<T>::build(Fn&& fn) {
  capnp::MallocMessageBuilder message;
  Builder builder = message.initRoot<T>();
  fn(builder);
  return CapnpStruct(builder.asReader());
}

template <CapnpStructType T>
typename T::Reader CapnpStruct<T>::reader() const {
  if (words_ == nullptr) return Reader();
  // The buffer was written by copyToUnchecked from a bounds-checked reader: trusted.
  return capnp::readMessageUnchecked<T>(words_.get());
}

namespace internal {

template <typename T>
void encode_struct(typename T::Reader reader, wire::Value::Builder out) {
  out.initStruct().setAs<T>(reader);
}

template <typename R>
concept CapnpReader = requires { typename R::Reads; } && CapnpStructType<typename R::Reads> &&
                      std::same_as<R, typename R::Reads::Reader>;

template <typename B>
concept CapnpBuilder = requires { typename B::Builds; } && CapnpStructType<typename B::Builds> &&
                       std::same_as<B, typename B::Builds::Builder>;

}  // namespace internal
/// \endcond

/// `CapnpStruct<T>`, as the `struct` member of a `Value` (a null pointer decodes as a struct with
/// every field at its default).
template <CapnpStructType T>
struct Codec<CapnpStruct<T>> {
  /// Writes a copy of the struct. Throws `kj::Exception` only where Cap'n Proto gives up.
  static void encode(const CapnpStruct<T>& value, wire::Value::Builder out) {
    internal::encode_struct<T>(value.reader(), out);
  }
  /// Copies the struct out of `in`. kDataLoss when `in` holds no struct pointer (a list, a
  /// capability, another member) or a malformed one; never throws.
  static absl::Status decode(wire::Value::Reader in, CapnpStruct<T>& out) {
    if (in.which() != wire::Value::STRUCT) return internal::mismatch("a struct", in);
    return internal::guarded([&]() -> absl::Status {
      capnp::AnyPointer::Reader pointer = in.getStruct();
      switch (pointer.getPointerType()) {
        case capnp::PointerType::NULL_:
          out = CapnpStruct<T>();
          return absl::OkStatus();
        case capnp::PointerType::STRUCT:
          out = CapnpStruct<T>(pointer.getAs<T>());
          return absl::OkStatus();
        case capnp::PointerType::LIST:
          return absl::DataLossError("expected a struct pointer, found a list pointer");
        case capnp::PointerType::CAPABILITY:
          return absl::DataLossError("expected a struct pointer, found a capability");
      }
      return absl::DataLossError("expected a struct pointer, found an unknown pointer");
    });
  }
};

/// Encode-only: a `T::Reader` is written like a `CapnpStruct<T>` (decode into a
/// `CapnpStruct<T>`).
template <internal::CapnpReader R>
struct Codec<R> {
  /// Writes a copy of the struct `value` reads. Throws `kj::Exception` only where Cap'n Proto
  /// gives up.
  static void encode(const R& value, wire::Value::Builder out) {
    internal::encode_struct<typename R::Reads>(value, out);
  }
};

/// Encode-only: a `T::Builder` is written like a `CapnpStruct<T>` (decode into a
/// `CapnpStruct<T>`).
template <internal::CapnpBuilder B>
struct Codec<B> {
  /// Writes a copy of the struct `value` builds. Throws `kj::Exception` only where Cap'n Proto
  /// gives up.
  static void encode(const B& value, wire::Value::Builder out) {
    internal::encode_struct<typename B::Builds>(value.asReader(), out);
  }
};

}  // namespace procpool

#endif  // PROCPOOL_CAPNP_STRUCT_H_
