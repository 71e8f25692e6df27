// Copyright procpool authors.

/// \file
/// codec.h: turning C++ values into `procpool::wire::Value`s and back.
///
/// Every job handed to a procpool worker and every result it sends back crosses the process
/// boundary as a Cap'n Proto `wire::Value` (see lib/wire/protocol.capnp). `Codec<T>` is the one
/// place that knows how a C++ type `T` maps onto a `Value`. The pool calls it; users only meet it
/// when they want to send a type of their own.
///
/// Built-in support:
///
///   * every integer type (signed -> `int`, unsigned -> `uint`; decoding accepts either member
///     and range-checks against the target type), enums (through their underlying type), `bool`,
///     `float` and `double` (`float` member; NaN and infinities round-trip);
///   * `std::string` (`bytes`, binary safe);
///   * `std::vector<T>` and `std::array<T, N>`: packed `ints` / `uints` / `floats` when `T` is a
///     non-bool arithmetic type, otherwise a `list` of elements (`std::vector<bool>` included);
///   * `std::pair`, `std::tuple` (a `list` of exactly the tuple's arity), `std::tuple<>` and
///     `std::monostate` (`none`);
///   * `std::optional<T>`: `none` for `std::nullopt`, else a one-element `list` holding the value,
///     so `std::optional<std::optional<T>>` round-trips exactly;
///   * `std::map` and `std::unordered_map`: a `list` of two-element `list`s (key, value), exactly
///     as a `std::pair<K, V>` is written;
///   * `std::set` and `std::unordered_set`: written as a `std::vector` of their elements is
///     (packed for numbers); a duplicate element does not decode;
///   * `std::variant<Ts...>`: a `list` of 2, the alternative's index (`uint`) and its value; an
///     index past the last alternative does not decode. The alternatives must be
///     default-constructible;
///   * `absl::Duration`: a `list` of 2 `int`s, whole seconds (rounded down) and quarter
///     nanoseconds (0 to 3999999999), exactly absl's resolution; `absl::InfiniteDuration()` and
///     its negative as a `float` of +inf and -inf. `absl::Time` as the `absl::Duration` since the
///     Unix epoch (`absl::InfiniteFuture()` and `absl::InfinitePast()` as the infinite durations);
///   * `std::chrono::duration<Rep, Period>` as its `count()` (a `Rep`; both sides share the
///     Period), and `std::chrono::time_point<Clock, Duration>` as its `time_since_epoch()`;
///   * Cap'n Proto structs from your own schema, through `CapnpStruct<T>`
///     (include/procpool/capnp_struct.h).
///
/// Teaching the codec a type of your own: specialize `procpool::Codec` with the two static
/// functions below, usually by reusing the codecs of the type's parts. Do it right after the type
/// is defined, before anything asks whether the type is `Encodable`.
///
/// ```cpp
/// struct Point {
///   int x = 0;
///   int y = 0;
/// };
///
/// namespace procpool {
/// template <>
/// struct Codec<Point> {
///   static void encode(const Point& p, wire::Value::Builder out) {
///     encode_value(std::tuple<int, int>(p.x, p.y), out);
///   }
///   static absl::Status decode(wire::Value::Reader in, Point& out) {
///     std::tuple<int, int> t;
///     if (absl::Status s = Codec<std::tuple<int, int>>::decode(in, t); !s.ok()) return s;
///     std::tie(out.x, out.y) = t;
///     return absl::OkStatus();
///   }
/// };
/// }  // namespace procpool
///
/// // Point now works on its own and inside every container above:
/// capnp::MallocMessageBuilder message;
/// procpool::encode_value(std::vector<Point>{{1, 2}, {3, 4}},
///                        message.initRoot<procpool::wire::Value>());
/// absl::StatusOr<std::vector<Point>> points = procpool::decode_value<std::vector<Point>>(
///     message.getRoot<procpool::wire::Value>().asReader());
/// ```
///
/// Facts:
///
///   * Thread safety: codecs are stateless; any number of threads may encode and decode at once.
///   * Decoding never trusts its input. A `Value` of the wrong shape (wrong union member, wrong
///     arity, an integer out of the target's range, a duplicate map key) or a malformed message
///     (Cap'n Proto's bounds, nesting and traversal limits) yields an
///     `absl::StatusCode::kDataLoss` status saying what was expected and what was found; built-in
///     decoders never crash and never throw. On failure `out` is left valid but unspecified.
///   * `decode` writes into an existing object and overwrites all of it, so a decoder can reuse
///     memory (e.g. string capacity) across calls. User decoders must keep that contract.
///   * Built-in containers decode their elements in place and therefore need
///     default-constructible element types; `decode_value<T>` needs a default-constructible `T`.
///   * Encoding throws `kj::Exception` only where Cap'n Proto itself gives up: a container or
///     string of more than 2^29 - 1 elements or bytes, or a message past its size limits. In a
///     pool, a codec that throws fails that task with kInvalidArgument.

#ifndef PROCPOOL_CODEC_H_
#define PROCPOOL_CODEC_H_

#include <array>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "capnp/any.h"
#include "capnp/list.h"
#include "kj/debug.h"
#include "kj/exception.h"
#include "procpool/internal/blob_region.h"
#include "procpool/internal/protocol.capnp.h"

namespace procpool {

/// The codec for `T`. Undefined for types the codec does not know; specialize it (see the file
/// comment) to teach it one. `Enable` is there for SFINAE-style partial specializations; C++20
/// constrained partial specializations (`template <typename T> requires ... struct Codec<T>`)
/// work too.
///
/// A specialization provides:
///
/// ```cpp
/// // Writes `value` into `out`, which is freshly initialized (or about to be overwritten).
/// static void encode(const T& value, wire::Value::Builder out);
///
/// // Overwrites `out` with the value `in` holds. Returns kDataLoss when `in` does not hold a `T`.
/// static absl::Status decode(wire::Value::Reader in, T& out);
/// ```
///
/// Both are called from any thread, on the pool's and the worker's side; keep them stateless.
template <typename T, typename Enable = void>
struct Codec;

/// True when `Codec<T>` provides both `encode` and `decode`: the types that can be a Job or a
/// Result.
template <typename T>
concept Encodable = requires(const T& value, T& out, wire::Value::Builder builder,
                             wire::Value::Reader reader) {
  { Codec<T>::encode(value, builder) } -> std::same_as<void>;
  { Codec<T>::decode(reader, out) } -> std::same_as<absl::Status>;
};

/// Writes `value` into `out` with `Codec<T>`. Throws `kj::Exception` only where Cap'n Proto
/// gives up (see the file comment), or what a user-written encoder throws.
template <typename T>
  requires requires(const T& value, wire::Value::Builder builder) {
    Codec<T>::encode(value, builder);
  }
void encode_value(const T& value, wire::Value::Builder out);

/// Overwrites `out` with the value held by `in`. Like `Codec<T>::decode`, but also turns a
/// `kj::Exception` escaping a user-written decoder into kDataLoss. Returns OK or kDataLoss; on
/// failure `out` is valid but unspecified.
template <Encodable T>
absl::Status decode_value(wire::Value::Reader in, T& out);

/// Decodes a fresh `T` (value-initialized, then overwritten) from `in`: the value, or kDataLoss
/// saying what was expected and what was found.
template <Encodable T>
  requires std::default_initializable<T>
absl::StatusOr<T> decode_value(wire::Value::Reader in);

// ---- implementation details ----

/// \cond
namespace internal {

// The most elements (or bytes) a Cap'n Proto list (or blob) may hold.
inline constexpr std::size_t kMaxListSize = (std::size_t{1} << 29) - 1;

// What a `Value` holds, for error messages ("found ...").
inline std::string describe(wire::Value::Reader in) {
  // which() reads only the bounds-checked data section and cannot throw.
  switch (in.which()) {
    case wire::Value::NONE:
      return "none";
    case wire::Value::INT:
      return "an integer";
    case wire::Value::UINT:
      return "an unsigned integer";
    case wire::Value::FLOAT:
      return "a float";
    case wire::Value::BOOL:
      return "a bool";
    case wire::Value::BYTES:
      return "bytes";
    case wire::Value::LIST:
      return "a list";
    case wire::Value::STRUCT:
      return "a struct";
    case wire::Value::INTS:
      return "a packed list of integers";
    case wire::Value::UINTS:
      return "a packed list of unsigned integers";
    case wire::Value::FLOATS:
      return "a packed list of floats";
    case wire::Value::BLOB:
      return "bytes (in a shared region)";
  }
  return absl::StrCat("an unknown union member (", static_cast<int>(in.which()), ")");
}

inline absl::Status mismatch(absl::string_view expected, wire::Value::Reader found) {
  return absl::DataLossError(absl::StrCat("expected ", expected, ", found ", describe(found)));
}

inline absl::Status wrong_size(absl::string_view what, std::size_t expected, std::size_t found) {
  return absl::DataLossError(absl::StrCat("expected ", what, " of ", expected,
                                          " elements, found one of ", found, " elements"));
}

// Prefixes the message of a failed status with where it happened ("list element 3: ...").
inline absl::Status with_context(const absl::Status& status, absl::string_view context) {
  return absl::Status(status.code(), absl::StrCat(context, status.message()));
}

// Runs `fn` (returning absl::Status), turning a kj::Exception from a Cap'n Proto reader (malformed
// or hostile input) into kDataLoss "<what>: <the exception's description>". The one place such an
// exception becomes a status: the codecs and every reader of a peer's frames in lib/ go through
// it. `what` says what was being read ("sent a malformed frame"); the caller puts who first.
template <typename Fn>
absl::Status guarded(absl::string_view what, Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const kj::Exception& e) {
    return absl::DataLossError(
        absl::StrCat(what, ": ", absl::string_view(e.getDescription().cStr())));
  }
}
template <typename Fn>
absl::Status guarded(Fn&& fn) {
  return guarded("malformed message", std::forward<Fn>(fn));
}

// Cap'n Proto list sizes are `unsigned int`; refuse to truncate.
inline unsigned int list_size(std::size_t n) {
  KJ_REQUIRE(n <= kMaxListSize, "procpool::Codec: too many elements for a Cap'n Proto list", n);
  return static_cast<unsigned int>(n);
}

template <typename T>
constexpr absl::string_view integer_type_name() {
  if constexpr (std::is_same_v<T, char>) return "char";
  else if constexpr (std::is_same_v<T, wchar_t>) return "wchar_t";
  else if constexpr (std::is_same_v<T, char8_t>) return "char8_t";
  else if constexpr (std::is_same_v<T, char16_t>) return "char16_t";
  else if constexpr (std::is_same_v<T, char32_t>) return "char32_t";
  else if constexpr (std::is_signed_v<T>) {
    if constexpr (sizeof(T) == 1) return "int8_t";
    else if constexpr (sizeof(T) == 2) return "int16_t";
    else if constexpr (sizeof(T) == 4) return "int32_t";
    else return "int64_t";
  } else {
    if constexpr (sizeof(T) == 1) return "uint8_t";
    else if constexpr (sizeof(T) == 2) return "uint16_t";
    else if constexpr (sizeof(T) == 4) return "uint32_t";
    else return "uint64_t";
  }
}

template <typename T>
concept Integer = std::integral<T> && !std::same_as<T, bool>;

template <typename T>
concept Floating = std::same_as<T, float> || std::same_as<T, double>;

// Range-checked conversion of a wire integer to `T`.
template <Integer T, typename From>
absl::Status narrow(From value, T& out) {
  // std::in_range takes standard integer types only; char types map to one of the same range.
  using Standard =
      std::conditional_t<std::is_signed_v<T>, std::make_signed_t<T>, std::make_unsigned_t<T>>;
  if (!std::in_range<Standard>(value)) {
    return absl::DataLossError(absl::StrCat("integer ", value, " out of range for ",
                                            integer_type_name<T>()));
  }
  out = static_cast<T>(value);
  return absl::OkStatus();
}

template <Floating T>
absl::Status narrow_float(double value, T& out) {
  if constexpr (std::is_same_v<T, float>) {
    // Converting a finite double outside float's range is undefined behaviour; NaN and the
    // infinities convert exactly.
    if (std::isfinite(value) && std::fabs(value) > std::numeric_limits<float>::max()) {
      return absl::DataLossError(absl::StrCat("float ", value, " out of range for float"));
    }
  }
  out = static_cast<T>(value);
  return absl::OkStatus();
}

// Element types written as a packed list (`ints`, `uints`, `floats`) instead of a `list`.
template <typename T>
concept Packed = Integer<T> || Floating<T>;

template <typename It>
void encode_packed(It first, std::size_t n, wire::Value::Builder out) {
  using T = std::remove_cvref_t<decltype(*first)>;
  const unsigned int size = list_size(n);
  if constexpr (Floating<T>) {
    auto list = out.initFloats(size);
    for (unsigned int i = 0; i < size; ++i, ++first) list.set(i, static_cast<double>(*first));
  } else if constexpr (std::is_signed_v<T>) {
    auto list = out.initInts(size);
    for (unsigned int i = 0; i < size; ++i, ++first) list.set(i, static_cast<std::int64_t>(*first));
  } else {
    auto list = out.initUints(size);
    for (unsigned int i = 0; i < size; ++i, ++first) {
      list.set(i, static_cast<std::uint64_t>(*first));
    }
  }
}

template <typename It>
void encode_list(It first, std::size_t n, wire::Value::Builder out) {
  using T = std::remove_cvref_t<decltype(*first)>;
  auto list = out.initList(list_size(n));
  for (unsigned int i = 0; i < list.size(); ++i, ++first) Codec<T>::encode(*first, list[i]);
}

template <typename T>
absl::Status element_error(const absl::Status& status, std::size_t i) {
  return with_context(status, absl::StrCat("element ", i, ": "));
}

// Decodes a sequence of `T` held by `in` (packed where `T` is Packed, else a `list`; a `list` is
// accepted for packed types too). `resize(n)` returns a status (arity checks) and makes room for
// n elements; `set(i, value)` stores element i.
template <typename T, typename Resize, typename At>
absl::Status decode_sequence(wire::Value::Reader in, absl::string_view expected, Resize&& resize,
                             At&& at) {
  if constexpr (Packed<T>) {
    auto decode_packed = [&](auto list) -> absl::Status {
      if (absl::Status s = resize(list.size()); !s.ok()) return s;
      for (unsigned int i = 0; i < list.size(); ++i) {
        absl::Status s;
        if constexpr (Floating<T>) {
          s = narrow_float(list[i], at(i));
        } else {
          s = narrow(list[i], at(i));
        }
        if (!s.ok()) return element_error<T>(s, i);
      }
      return absl::OkStatus();
    };
    switch (in.which()) {
      case wire::Value::INTS:
        if constexpr (Integer<T>) return decode_packed(in.getInts());
        break;
      case wire::Value::UINTS:
        if constexpr (Integer<T>) return decode_packed(in.getUints());
        break;
      case wire::Value::FLOATS:
        if constexpr (Floating<T>) return decode_packed(in.getFloats());
        break;
      default:
        break;
    }
  }
  if (in.which() != wire::Value::LIST) return mismatch(expected, in);
  auto list = in.getList();
  if (absl::Status s = resize(list.size()); !s.ok()) return s;
  for (unsigned int i = 0; i < list.size(); ++i) {
    if (absl::Status s = Codec<T>::decode(list[i], at(i)); !s.ok()) return element_error<T>(s, i);
  }
  return absl::OkStatus();
}

template <typename K, typename V>
void encode_entry(const K& key, const V& value, wire::Value::Builder out) {
  auto list = out.initList(2);
  Codec<K>::encode(key, list[0]);
  Codec<V>::encode(value, list[1]);
}

template <typename K, typename V>
absl::Status decode_entry(wire::Value::Reader in, K& key, V& value) {
  if (in.which() != wire::Value::LIST) return mismatch("a list of 2 elements (a pair)", in);
  auto list = in.getList();
  if (list.size() != 2) return wrong_size("a list (a pair)", 2, list.size());
  if (absl::Status s = Codec<K>::decode(list[0], key); !s.ok()) return with_context(s, "first: ");
  if (absl::Status s = Codec<V>::decode(list[1], value); !s.ok()) {
    return with_context(s, "second: ");
  }
  return absl::OkStatus();
}

template <typename MapT>
void encode_map(const MapT& map, wire::Value::Builder out) {
  auto list = out.initList(list_size(map.size()));
  unsigned int i = 0;
  for (const auto& [key, value] : map) encode_entry(key, value, list[i++]);
}

// `insert(key, value)` returns false on a duplicate key.
template <typename K, typename V, typename Insert>
absl::Status decode_map(wire::Value::Reader in, Insert&& insert) {
  if (in.which() != wire::Value::LIST) return mismatch("a list of pairs (a map)", in);
  auto list = in.getList();
  for (unsigned int i = 0; i < list.size(); ++i) {
    K key{};
    V value{};
    if (absl::Status s = decode_entry(list[i], key, value); !s.ok()) {
      return with_context(s, absl::StrCat("map entry ", i, ": "));
    }
    if (!insert(std::move(key), std::move(value))) {
      return absl::DataLossError(absl::StrCat("map entry ", i, ": duplicate key"));
    }
  }
  return absl::OkStatus();
}

}  // namespace internal

template <typename T>
  requires requires(const T& value, wire::Value::Builder builder) {
    Codec<T>::encode(value, builder);
  }
void encode_value(const T& value, wire::Value::Builder out) {
  Codec<T>::encode(value, out);
}

template <Encodable T>
absl::Status decode_value(wire::Value::Reader in, T& out) {
  return internal::guarded([&] { return Codec<T>::decode(in, out); });
}

template <Encodable T>
  requires std::default_initializable<T>
absl::StatusOr<T> decode_value(wire::Value::Reader in) {
  T out{};
  if (absl::Status s = decode_value(in, out); !s.ok()) return s;
  return out;
}
/// \endcond

// The built-in codecs. Each `encode` throws `kj::Exception` only where Cap'n Proto gives up (see
// the file comment); each `decode` returns OK or kDataLoss and never throws.

/// Integers (not bool): signed -> `int`, unsigned -> `uint`. Either member decodes into any
/// integer type whose range holds the value.
template <internal::Integer T>
struct Codec<T> {
  /// Writes `value` as `int` (signed `T`) or `uint` (unsigned `T`).
  static void encode(const T& value, wire::Value::Builder out) {
    if constexpr (std::is_signed_v<T>) {
      out.setInt(static_cast<std::int64_t>(value));
    } else {
      out.setUint(static_cast<std::uint64_t>(value));
    }
  }
  /// Reads an `int` or a `uint`; kDataLoss for another member or a value out of `T`'s range.
  static absl::Status decode(wire::Value::Reader in, T& out) {
    switch (in.which()) {
      case wire::Value::INT:
        return internal::narrow(in.getInt(), out);
      case wire::Value::UINT:
        return internal::narrow(in.getUint(), out);
      default:
        return internal::mismatch("an integer", in);
    }
  }
};

/// Enums: as their underlying type. Values are not checked against the enumerators.
template <typename T>
  requires std::is_enum_v<T>
struct Codec<T> {
  /// The enum's underlying integer type, which the wire carries.
  using Underlying = std::underlying_type_t<T>;
  /// Writes `value` as its underlying integer.
  static void encode(const T& value, wire::Value::Builder out) {
    Codec<Underlying>::encode(static_cast<Underlying>(value), out);
  }
  /// Reads an integer in the underlying type's range; kDataLoss otherwise.
  static absl::Status decode(wire::Value::Reader in, T& out) {
    Underlying value{};
    if (absl::Status s = Codec<Underlying>::decode(in, value); !s.ok()) return s;
    out = static_cast<T>(value);
    return absl::OkStatus();
  }
};

/// `bool`, as `bool` (never as an integer).
template <>
struct Codec<bool> {
  /// Writes `value` as `bool`.
  static void encode(const bool& value, wire::Value::Builder out) { out.setBool(value); }
  /// Reads a `bool`; kDataLoss for any other member.
  static absl::Status decode(wire::Value::Reader in, bool& out) {
    if (in.which() != wire::Value::BOOL) return internal::mismatch("a bool", in);
    out = in.getBool();
    return absl::OkStatus();
  }
};

/// `float` and `double`, as `float` (a Float64). A finite double outside float's range does not
/// decode into a float.
template <internal::Floating T>
struct Codec<T> {
  /// Writes `value` as a Float64 (exact for both types; NaN and infinities included).
  static void encode(const T& value, wire::Value::Builder out) {
    out.setFloat(static_cast<double>(value));
  }
  /// Reads a `float`; kDataLoss for another member, or a finite value out of a `float`'s range.
  static absl::Status decode(wire::Value::Reader in, T& out) {
    if (in.which() != wire::Value::FLOAT) return internal::mismatch("a float", in);
    return internal::narrow_float(in.getFloat(), out);
  }
};

namespace internal {

// Writes `size` bytes as `bytes`, or (kBlobMinBytes or more, with a region current) as a `blob`
// in the shared region of the worker the frame is for or from (internal/blob_region.h).
inline void encode_byte_string(const char* data, std::size_t size, wire::Value::Builder out) {
  BlobContext* context = current_blob_context();
  // The context binds only the message it is for (blob_region.h); the check runs only where it
  // would change what is written (sizing, or a string large enough for the region).
  if (context != nullptr &&
      (context->sizing || (context->region != nullptr && size >= kBlobMinBytes)) &&
      !context->writes_into(capnp::AnyStruct::Builder(wire::Value::Builder(out)).getDataSection().begin())) {
    context = nullptr;
  }
  if (context != nullptr && context->region != nullptr && size >= kBlobMinBytes) {
    if (context->sizing) {
      out.initBlob().setSize(size);  // where it goes is decided when the batch is built
      return;
    }
    if (std::optional<uint64_t> offset = context->region->put(data, size)) {
      auto blob = out.initBlob();
      blob.setOffset(*offset);
      blob.setSize(size);
      context->region_bytes += size;
      return;
    }
  }
  if (context != nullptr && context->sizing) {
    out.initBytes(0);  // sized, not written: a batch being sized never holds the bytes
    context->sized_bytes += (size + 7) / 8 * 8;
    return;
  }
  auto bytes = out.initBytes(list_size(size));
  if (size > 0) std::memcpy(bytes.begin(), data, size);
}

// Where the bytes of a `bytes` or `blob` value lie, or kDataLoss. A blob is found only in the
// region of the current context, and only inside the area its writer may use.
inline absl::Status find_byte_string(wire::Value::Reader in, const char*& data,
                                     std::size_t& size) {
  if (in.which() == wire::Value::BLOB) {
    BlobContext* context = current_blob_context();
    const auto blob = in.getBlob();
    if (context == nullptr || context->region == nullptr) {
      return absl::DataLossError("a blob where no shared region is in use");
    }
    if (blob.getSize() > context->max_blob_bytes) {
      return absl::DataLossError(absl::StrCat("a blob of ", blob.getSize(),
                                              " bytes, over max_frame_bytes (",
                                              context->max_blob_bytes, ")"));
    }
    data = context->region->get(blob.getOffset(), blob.getSize());
    if (data == nullptr) {
      return absl::DataLossError(absl::StrCat("a blob of ", blob.getSize(), " bytes at ",
                                              blob.getOffset(), " outside the shared region"));
    }
    size = static_cast<std::size_t>(blob.getSize());
    return absl::OkStatus();
  }
  if (in.which() != wire::Value::BYTES) return mismatch("bytes", in);
  return guarded([&] {
    auto bytes = in.getBytes();
    data = reinterpret_cast<const char*>(bytes.begin());
    size = bytes.size();
    return absl::OkStatus();
  });
}

}  // namespace internal

/// `std::string`, as `bytes`: any bytes, NULs included (large ones as a `blob` where a shared
/// region is in use: internal/blob_region.h).
template <typename Traits, typename Alloc>
struct Codec<std::basic_string<char, Traits, Alloc>> {
  /// The string type.
  using String = std::basic_string<char, Traits, Alloc>;
  /// Writes `value` as `bytes` (or a `blob`). Throws `kj::Exception` past 2^29 - 1 bytes.
  static void encode(const String& value, wire::Value::Builder out) {
    internal::encode_byte_string(value.data(), value.size(), out);
  }
  /// Reads `bytes` (or a `blob` inside the current shared region); kDataLoss for any other
  /// member, or a blob outside the region.
  static absl::Status decode(wire::Value::Reader in, String& out) {
    const char* data = nullptr;
    std::size_t size = 0;
    if (absl::Status found = internal::find_byte_string(in, data, size); !found.ok()) return found;
    out.assign(data, size);
    return absl::OkStatus();
  }
};

/// `std::monostate` (what a task with no value yields), as `none`.
template <>
struct Codec<std::monostate> {
  /// Writes `none`.
  static void encode(const std::monostate&, wire::Value::Builder out) { out.setNone(); }
  /// Reads `none`; kDataLoss for any other member.
  static absl::Status decode(wire::Value::Reader in, std::monostate&) {
    if (in.which() != wire::Value::NONE) return internal::mismatch("none", in);
    return absl::OkStatus();
  }
};

/// `std::vector<T>`: packed for non-bool arithmetic `T`, else a `list`.
template <Encodable T, typename Alloc>
struct Codec<std::vector<T, Alloc>> {
  /// The vector type.
  using Vector = std::vector<T, Alloc>;
  /// Writes `value` as `ints`, `uints` or `floats` (numbers) or a `list`. Throws `kj::Exception`
  /// past 2^29 - 1 elements.
  static void encode(const Vector& value, wire::Value::Builder out) {
    if constexpr (internal::Packed<T>) {
      internal::encode_packed(value.begin(), value.size(), out);
    } else {
      internal::encode_list(value.begin(), value.size(), out);
    }
  }
  /// Reads a packed list or a `list`; kDataLoss for another member or an element that does not
  /// decode (the message names its index).
  static absl::Status decode(wire::Value::Reader in, Vector& out) {
    return internal::guarded([&] {
      return internal::decode_sequence<T>(
          in, "a list",
          [&](std::size_t n) {
            out.resize(n);
            return absl::OkStatus();
          },
          [&](std::size_t i) -> T& { return out[i]; });
    });
  }
};

/// `std::vector<bool>`, as a `list` of `bool`s.
template <typename Alloc>
struct Codec<std::vector<bool, Alloc>> {
  /// The vector type.
  using Vector = std::vector<bool, Alloc>;
  /// Writes `value` as a `list` of `bool`s. Throws `kj::Exception` past 2^29 - 1 elements.
  static void encode(const Vector& value, wire::Value::Builder out) {
    auto list = out.initList(internal::list_size(value.size()));
    for (unsigned int i = 0; i < list.size(); ++i) list[i].setBool(value[i]);
  }
  /// Reads a `list` of `bool`s; kDataLoss otherwise.
  static absl::Status decode(wire::Value::Reader in, Vector& out) {
    return internal::guarded([&]() -> absl::Status {
      if (in.which() != wire::Value::LIST) return internal::mismatch("a list of bools", in);
      auto list = in.getList();
      out.resize(list.size());
      for (unsigned int i = 0; i < list.size(); ++i) {
        bool b = false;
        if (absl::Status s = Codec<bool>::decode(list[i], b); !s.ok()) {
          return internal::element_error<bool>(s, i);
        }
        out[i] = b;
      }
      return absl::OkStatus();
    });
  }
};

/// `std::array<T, N>`: like `std::vector<T>`, and exactly N elements.
template <Encodable T, std::size_t N>
struct Codec<std::array<T, N>> {
  /// Writes `value` as `std::vector<T>` would be written.
  static void encode(const std::array<T, N>& value, wire::Value::Builder out) {
    if constexpr (internal::Packed<T>) {
      internal::encode_packed(value.begin(), N, out);
    } else {
      internal::encode_list(value.begin(), N, out);
    }
  }
  /// Reads what `std::vector<T>` reads; kDataLoss unless it holds exactly N elements.
  static absl::Status decode(wire::Value::Reader in, std::array<T, N>& out) {
    return internal::guarded([&] {
      return internal::decode_sequence<T>(
          in, "a list",
          [](std::size_t n) {
            return n == N ? absl::OkStatus() : internal::wrong_size("a list (std::array)", N, n);
          },
          [&](std::size_t i) -> T& { return out[i]; });
    });
  }
};

/// `std::pair<A, B>`, as a `list` of 2.
template <Encodable A, Encodable B>
struct Codec<std::pair<A, B>> {
  /// Writes a `list` of `first` and `second`.
  static void encode(const std::pair<A, B>& value, wire::Value::Builder out) {
    internal::encode_entry(value.first, value.second, out);
  }
  /// Reads a `list` of 2; kDataLoss for another shape or an element that does not decode.
  static absl::Status decode(wire::Value::Reader in, std::pair<A, B>& out) {
    return internal::guarded([&] { return internal::decode_entry(in, out.first, out.second); });
  }
};

/// `std::tuple<Ts...>`, as a `list` of exactly `sizeof...(Ts)`; the empty tuple as `none`.
template <Encodable... Ts>
struct Codec<std::tuple<Ts...>> {
  /// The tuple type.
  using Tuple = std::tuple<Ts...>;
  /// The number of elements on the wire.
  static constexpr std::size_t kArity = sizeof...(Ts);

  /// Writes a `list` of the elements, in order (`none` for the empty tuple).
  static void encode(const Tuple& value, wire::Value::Builder out) {
    if constexpr (kArity == 0) {
      out.setNone();
    } else {
      auto list = out.initList(kArity);
      [&]<std::size_t... I>(std::index_sequence<I...>) {
        (Codec<Ts>::encode(std::get<I>(value), list[I]), ...);
      }(std::index_sequence_for<Ts...>{});
    }
  }

  /// Reads a `list` of exactly `kArity` elements (`none` for the empty tuple); kDataLoss for
  /// another shape or an element that does not decode (the message names its index).
  static absl::Status decode(wire::Value::Reader in, Tuple& out) {
    if constexpr (kArity == 0) {
      if (in.which() != wire::Value::NONE) return internal::mismatch("none (an empty tuple)", in);
      return absl::OkStatus();
    } else {
      return internal::guarded([&]() -> absl::Status {
        if (in.which() != wire::Value::LIST) {
          return internal::mismatch(absl::StrCat("a list of ", kArity, " elements (a tuple)"), in);
        }
        auto list = in.getList();
        if (list.size() != kArity) {
          return internal::wrong_size("a list (a tuple)", kArity, list.size());
        }
        absl::Status status;
        [&]<std::size_t... I>(std::index_sequence<I...>) {
          (([&] {
             status = Codec<Ts>::decode(list[I], std::get<I>(out));
             if (status.ok()) return true;
             status = internal::with_context(status, absl::StrCat("tuple element ", I, ": "));
             return false;
           }()) &&
           ...);
        }(std::index_sequence_for<Ts...>{});
        return status;
      });
    }
  }
};

/// `std::optional<T>`: `none` for `std::nullopt`, else a one-element `list` holding the value.
template <Encodable T>
struct Codec<std::optional<T>> {
  /// Writes `none`, or a one-element `list` holding the value.
  static void encode(const std::optional<T>& value, wire::Value::Builder out) {
    if (!value.has_value()) {
      out.setNone();
    } else {
      Codec<T>::encode(*value, out.initList(1)[0]);
    }
  }
  /// Reads `none` or a one-element `list`; kDataLoss for another shape or a value that does not
  /// decode.
  static absl::Status decode(wire::Value::Reader in, std::optional<T>& out) {
    return internal::guarded([&]() -> absl::Status {
      switch (in.which()) {
        case wire::Value::NONE:
          out.reset();
          return absl::OkStatus();
        case wire::Value::LIST: {
          auto list = in.getList();
          if (list.size() != 1) {
            return internal::wrong_size("a list (an engaged optional)", 1, list.size());
          }
          if (!out.has_value()) out.emplace();
          if (absl::Status s = Codec<T>::decode(list[0], *out); !s.ok()) {
            return internal::with_context(s, "optional value: ");
          }
          return absl::OkStatus();
        }
        default:
          return internal::mismatch("none or a one-element list (an optional)", in);
      }
    });
  }
};

/// `std::map` and `std::unordered_map`, as a `list` of (key, value) pairs. Duplicate keys are an
/// error.
template <Encodable K, Encodable V, typename Compare, typename Alloc>
struct Codec<std::map<K, V, Compare, Alloc>> {
  /// The map type.
  using Map = std::map<K, V, Compare, Alloc>;
  /// Writes a `list` of (key, value) `list`s, in the map's order.
  static void encode(const Map& value, wire::Value::Builder out) {
    internal::encode_map(value, out);
  }
  /// Reads a `list` of pairs; kDataLoss for another shape, an entry that does not decode, or a
  /// duplicate key.
  static absl::Status decode(wire::Value::Reader in, Map& out) {
    out.clear();
    return internal::guarded([&] {
      return internal::decode_map<K, V>(in, [&](K&& key, V&& value) {
        const std::size_t before = out.size();
        out.emplace_hint(out.end(), std::move(key), std::move(value));  // Sorted input: O(1).
        return out.size() != before;
      });
    });
  }
};

/// `std::unordered_map`, as `std::map` is written (in the map's iteration order).
template <Encodable K, Encodable V, typename Hash, typename Equal, typename Alloc>
struct Codec<std::unordered_map<K, V, Hash, Equal, Alloc>> {
  /// The map type.
  using Map = std::unordered_map<K, V, Hash, Equal, Alloc>;
  /// Writes a `list` of (key, value) `list`s, in the map's iteration order.
  static void encode(const Map& value, wire::Value::Builder out) {
    internal::encode_map(value, out);
  }
  /// Reads a `list` of pairs; kDataLoss for another shape, an entry that does not decode, or a
  /// duplicate key.
  static absl::Status decode(wire::Value::Reader in, Map& out) {
    out.clear();
    return internal::guarded([&] {
      if (in.which() == wire::Value::LIST) out.reserve(in.getList().size());
      return internal::decode_map<K, V>(in, [&](K&& key, V&& value) {
        return out.try_emplace(std::move(key), std::move(value)).second;
      });
    });
  }
};

/// The codec of `std::set` and `std::unordered_set` (`SetT`, of elements `T`): as a
/// `std::vector` of their elements (packed for numbers, in the set's iteration order). A duplicate
/// element is an error.
template <Encodable T, typename SetT>
struct SetCodec {
  /// Writes the elements as `std::vector<T>` would be written.
  static void encode(const SetT& value, wire::Value::Builder out) {
    if constexpr (internal::Packed<T>) {
      internal::encode_packed(value.begin(), value.size(), out);
    } else {
      internal::encode_list(value.begin(), value.size(), out);
    }
  }
  /// Reads what `std::vector<T>` reads; kDataLoss for that reader's errors or a duplicate
  /// element.
  static absl::Status decode(wire::Value::Reader in, SetT& out) {
    out.clear();
    std::vector<T> elements;
    if (absl::Status s = Codec<std::vector<T>>::decode(in, elements); !s.ok()) return s;
    if constexpr (requires { out.reserve(elements.size()); }) out.reserve(elements.size());
    for (std::size_t i = 0; i < elements.size(); ++i) {
      if (!out.insert(std::move(elements[i])).second) {
        return absl::DataLossError(absl::StrCat("set element ", i, ": duplicate"));
      }
    }
    return absl::OkStatus();
  }
};

/// `std::set`: see `SetCodec`.
template <Encodable T, typename Compare, typename Alloc>
struct Codec<std::set<T, Compare, Alloc>> : SetCodec<T, std::set<T, Compare, Alloc>> {};

/// `std::unordered_set`: see `SetCodec`.
template <Encodable T, typename Hash, typename Equal, typename Alloc>
struct Codec<std::unordered_set<T, Hash, Equal, Alloc>>
    : SetCodec<T, std::unordered_set<T, Hash, Equal, Alloc>> {};

/// `std::variant<Ts...>`, as a `list` of 2: the index of the alternative it holds (`uint`), then
/// that alternative's value. An index past the last alternative is an error. Encoding a variant
/// that is `valueless_by_exception` throws `kj::Exception`, as Cap'n Proto does for what it cannot
/// write.
template <Encodable... Ts>
  requires(sizeof...(Ts) > 0 && (std::default_initializable<Ts> && ...))
struct Codec<std::variant<Ts...>> {
  /// The variant type.
  using Variant = std::variant<Ts...>;
  /// The number of alternatives; indices on the wire are below it.
  static constexpr std::size_t kAlternatives = sizeof...(Ts);

  /// Writes a `list` of the alternative's index and its value. Throws `kj::Exception` for a
  /// valueless variant.
  static void encode(const Variant& value, wire::Value::Builder out) {
    KJ_REQUIRE(!value.valueless_by_exception(), "procpool::Codec: a valueless std::variant");
    auto list = out.initList(2);
    list[0].setUint(value.index());
    std::visit(
        [&list](const auto& alternative) {
          encode_value(alternative, list[1]);
        },
        value);
  }

  /// Reads a `list` of 2; kDataLoss for another shape, an index past the last alternative, or a
  /// value that does not decode as that alternative.
  static absl::Status decode(wire::Value::Reader in, Variant& out) {
    return internal::guarded([&]() -> absl::Status {
      if (in.which() != wire::Value::LIST) {
        return internal::mismatch("a list of 2 elements (a variant: index, value)", in);
      }
      auto list = in.getList();
      if (list.size() != 2) return internal::wrong_size("a list (a variant)", 2, list.size());
      std::uint64_t index = 0;
      if (absl::Status s = Codec<std::uint64_t>::decode(list[0], index); !s.ok()) {
        return internal::with_context(s, "variant index: ");
      }
      if (index >= kAlternatives) {
        return absl::DataLossError(absl::StrCat("variant index ", index,
                                                " out of range for a variant of ", kAlternatives,
                                                " alternatives"));
      }
      absl::Status status = decode_alternative(list[1], out, static_cast<std::size_t>(index),
                                               std::index_sequence_for<Ts...>{});
      if (!status.ok()) {
        return internal::with_context(status, absl::StrCat("variant alternative ", index, ": "));
      }
      return absl::OkStatus();
    });
  }

 private:
  template <std::size_t... I>
  static absl::Status decode_alternative(wire::Value::Reader in, Variant& out, std::size_t index,
                                         std::index_sequence<I...>) {
    absl::Status status;
    // Exactly one I matches `index` (checked above).
    ((I == index ? (status = decode_as<I>(in, out), true) : false) || ...);
    return status;
  }

  template <std::size_t I>
  static absl::Status decode_as(wire::Value::Reader in, Variant& out) {
    auto& alternative = out.template emplace<I>();
    return Codec<std::variant_alternative_t<I, Variant>>::decode(in, alternative);
  }
};

/// `absl::Duration`, exactly: a `list` of 2 `int`s, whole seconds rounded toward negative infinity
/// and the rest in quarter nanoseconds (absl's resolution), 0 <= rest < 4'000'000'000. The
/// infinite durations are a `float` of +inf or -inf.
template <>
struct Codec<absl::Duration> {
  /// Quarter nanoseconds per second: the second element is below it.
  static constexpr std::int64_t kTicksPerSecond = 4'000'000'000;

  /// Writes (seconds, quarter nanoseconds), or an infinite `float` for an infinite duration.
  static void encode(const absl::Duration& value, wire::Value::Builder out) {
    if (value == absl::InfiniteDuration() || value == -absl::InfiniteDuration()) {
      out.setFloat(value > absl::ZeroDuration() ? std::numeric_limits<double>::infinity()
                                                : -std::numeric_limits<double>::infinity());
      return;
    }
    absl::Duration rest;
    std::int64_t seconds = absl::IDivDuration(value, absl::Seconds(1), &rest);  // toward zero
    if (rest < absl::ZeroDuration()) {
      seconds -= 1;  // cannot overflow: a rest below zero means seconds > INT64_MIN
      rest += absl::Seconds(1);
    }
    const std::int64_t ticks = absl::IDivDuration(rest, tick(), &rest);
    auto list = out.initList(2);
    list[0].setInt(seconds);
    list[1].setInt(ticks);
  }

  /// Reads (seconds, quarter nanoseconds) or an infinite `float`; kDataLoss for another shape, a
  /// finite float, or quarter nanoseconds out of [0, 4e9).
  static absl::Status decode(wire::Value::Reader in, absl::Duration& out) {
    return internal::guarded([&]() -> absl::Status {
      if (in.which() == wire::Value::FLOAT) {
        const double f = in.getFloat();
        if (!std::isinf(f)) {
          return absl::DataLossError(absl::StrCat(
              "expected a list of 2 integers or an infinite float (a duration), found the float ",
              f));
        }
        out = f > 0 ? absl::InfiniteDuration() : -absl::InfiniteDuration();
        return absl::OkStatus();
      }
      std::tuple<std::int64_t, std::int64_t> parts;
      if (absl::Status s = Codec<decltype(parts)>::decode(in, parts); !s.ok()) {
        return internal::with_context(s, "duration: ");
      }
      const auto [seconds, ticks] = parts;
      if (ticks < 0 || ticks >= kTicksPerSecond) {
        return absl::DataLossError(
            absl::StrCat("duration: quarter nanoseconds ", ticks, " out of range [0, 4e9)"));
      }
      out = absl::Seconds(seconds) + tick() * ticks;  // exact: ticks add under one second
      return absl::OkStatus();
    });
  }

 private:
  static absl::Duration tick() { return absl::Nanoseconds(1) / 4; }
};

/// `absl::Time`, as the `absl::Duration` since the Unix epoch (infinite for the infinite times).
template <>
struct Codec<absl::Time> {
  /// Writes `value - absl::UnixEpoch()` as an `absl::Duration`.
  static void encode(const absl::Time& value, wire::Value::Builder out) {
    Codec<absl::Duration>::encode(value - absl::UnixEpoch(), out);
  }
  /// Reads an `absl::Duration` since the epoch; kDataLoss as for `absl::Duration`.
  static absl::Status decode(wire::Value::Reader in, absl::Time& out) {
    absl::Duration since_epoch;
    if (absl::Status s = Codec<absl::Duration>::decode(in, since_epoch); !s.ok()) return s;
    out = absl::UnixEpoch() + since_epoch;
    return absl::OkStatus();
  }
};

/// `std::chrono::duration<Rep, Period>`, as its `count()`, a `Rep`: the Period is part of the
/// type, which both sides share.
template <Encodable Rep, typename Period>
struct Codec<std::chrono::duration<Rep, Period>> {
  /// The duration type.
  using Duration = std::chrono::duration<Rep, Period>;
  /// Writes `value.count()` as a `Rep`.
  static void encode(const Duration& value, wire::Value::Builder out) {
    Codec<Rep>::encode(value.count(), out);
  }
  /// Reads a `Rep`; kDataLoss as for `Rep`.
  static absl::Status decode(wire::Value::Reader in, Duration& out) {
    Rep count{};
    if (absl::Status s = Codec<Rep>::decode(in, count); !s.ok()) {
      return internal::with_context(s, "std::chrono::duration: ");
    }
    out = Duration(count);
    return absl::OkStatus();
  }
};

/// `std::chrono::time_point<Clock, Duration>`, as its `time_since_epoch()`. Meaningful across the
/// process boundary for clocks whose epoch the processes share: `system_clock` always;
/// `steady_clock` only between processes on one machine (forked workers, not remote ones).
template <typename Clock, typename Duration>
  requires Encodable<Duration>
struct Codec<std::chrono::time_point<Clock, Duration>> {
  /// The time point type.
  using TimePoint = std::chrono::time_point<Clock, Duration>;
  /// Writes `value.time_since_epoch()` as a `Duration`.
  static void encode(const TimePoint& value, wire::Value::Builder out) {
    Codec<Duration>::encode(value.time_since_epoch(), out);
  }
  /// Reads a `Duration` since the clock's epoch; kDataLoss as for `Duration`.
  static absl::Status decode(wire::Value::Reader in, TimePoint& out) {
    Duration since_epoch{};
    if (absl::Status s = Codec<Duration>::decode(in, since_epoch); !s.ok()) return s;
    out = TimePoint(since_epoch);
    return absl::OkStatus();
  }
};

namespace internal {

// True for types whose values never hold a byte string (numbers, times, and containers of only
// those): a pool whose jobs and results are all Blobless gives its workers no blob region
// (blob_region.h). Anything else (strings, procpool::Bytes, Cap'n Proto structs, types with a
// Codec of their own) may, and gets one.
template <typename T>
struct Blobless : std::bool_constant<std::is_arithmetic_v<T> || std::is_enum_v<T>> {};
template <>
struct Blobless<std::monostate> : std::true_type {};
template <>
struct Blobless<absl::Duration> : std::true_type {};
template <>
struct Blobless<absl::Time> : std::true_type {};
template <typename Rep, typename Period>
struct Blobless<std::chrono::duration<Rep, Period>> : std::true_type {};
template <typename Clock, typename Duration>
struct Blobless<std::chrono::time_point<Clock, Duration>> : std::true_type {};
template <typename T, typename Alloc>
struct Blobless<std::vector<T, Alloc>> : Blobless<T> {};
template <typename T, std::size_t N>
struct Blobless<std::array<T, N>> : Blobless<T> {};
template <typename T>
struct Blobless<std::optional<T>> : Blobless<T> {};
template <typename A, typename B>
struct Blobless<std::pair<A, B>> : std::bool_constant<Blobless<A>::value && Blobless<B>::value> {};
template <typename... Ts>
struct Blobless<std::tuple<Ts...>> : std::bool_constant<(Blobless<Ts>::value && ...)> {};
template <typename... Ts>
struct Blobless<std::variant<Ts...>> : std::bool_constant<(Blobless<Ts>::value && ...)> {};
template <typename T, typename Compare, typename Alloc>
struct Blobless<std::set<T, Compare, Alloc>> : Blobless<T> {};
template <typename T, typename Hash, typename Equal, typename Alloc>
struct Blobless<std::unordered_set<T, Hash, Equal, Alloc>> : Blobless<T> {};
template <typename K, typename V, typename Compare, typename Alloc>
struct Blobless<std::map<K, V, Compare, Alloc>>
    : std::bool_constant<Blobless<K>::value && Blobless<V>::value> {};
template <typename K, typename V, typename Hash, typename Equal, typename Alloc>
struct Blobless<std::unordered_map<K, V, Hash, Equal, Alloc>>
    : std::bool_constant<Blobless<K>::value && Blobless<V>::value> {};

}  // namespace internal

}  // namespace procpool

#endif  // PROCPOOL_CODEC_H_
