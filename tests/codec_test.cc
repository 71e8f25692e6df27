#include "procpool/codec.h"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "doctest/doctest.h"
#include "kj/array.h"
#include "kj/exception.h"
#include "procpool/internal/protocol.capnp.h"
#include "procpool/capnp_struct.h"
#include "tests/codec_test.capnp.h"

// ---- a user-taught type ----

namespace procpool::testing {

struct Point {
  int x = 0;
  int y = 0;
  bool operator==(const Point&) const = default;
};

// A type nobody taught the codec.
struct Untaught {};

}  // namespace procpool::testing

namespace procpool {

template <>
struct Codec<testing::Point> {
  static void encode(const testing::Point& p, wire::Value::Builder out) {
    encode_value(std::tuple<int, int>(p.x, p.y), out);
  }
  static absl::Status decode(wire::Value::Reader in, testing::Point& out) {
    std::tuple<int, int> t;
    if (absl::Status s = Codec<std::tuple<int, int>>::decode(in, t); !s.ok()) return s;
    std::tie(out.x, out.y) = t;
    return absl::OkStatus();
  }
};

}  // namespace procpool

namespace procpool {
namespace {

using testing::Document;
using testing::Point;
using testing::Untaught;

static_assert(Encodable<int>);
static_assert(Encodable<std::uint64_t>);
static_assert(Encodable<std::string>);
static_assert(Encodable<std::vector<std::map<std::string, std::optional<Point>>>>);
static_assert(Encodable<CapnpStruct<Document>>);
static_assert(!Encodable<Untaught>);
static_assert(!Encodable<std::vector<Untaught>>);
static_assert(!Encodable<long double>);
static_assert(!Encodable<Document::Reader>);  // Encode-only.

// Encodes `value` into a real message, serializes it to a flat array, reads it back through a
// FlatArrayMessageReader and decodes it as a `U`. Nothing of the frame outlives this call.
template <typename U, typename T>
absl::StatusOr<U> round_trip_as(const T& value) {
  kj::Array<capnp::word> flat;
  {
    capnp::MallocMessageBuilder message;
    encode_value(value, message.initRoot<wire::Value>());
    flat = capnp::messageToFlatArray(message);
  }
  capnp::FlatArrayMessageReader reader(flat);
  return decode_value<U>(reader.getRoot<wire::Value>());
}

template <typename T>
absl::StatusOr<T> round_trip(const T& value) {
  return round_trip_as<T>(value);
}

// Checks that `value` survives a round trip unchanged.
template <typename T>
void check_round_trip(const T& value) {
  absl::StatusOr<T> decoded = round_trip(value);
  REQUIRE_MESSAGE(decoded.ok(), decoded.status().ToString());
  CHECK(*decoded == value);
}

// The union member `value` is written as.
template <typename T>
wire::Value::Which member_of(const T& value) {
  capnp::MallocMessageBuilder message;
  auto root = message.initRoot<wire::Value>();
  encode_value(value, root);
  return root.asReader().which();
}

// Builds a Value with `fill` and decodes it as a `T`.
template <typename T, typename Fill>
absl::StatusOr<T> decode_built(Fill&& fill) {
  capnp::MallocMessageBuilder message;
  auto root = message.initRoot<wire::Value>();
  fill(root);
  kj::Array<capnp::word> flat = capnp::messageToFlatArray(message);
  capnp::FlatArrayMessageReader reader(flat);
  return decode_value<T>(reader.getRoot<wire::Value>());
}

// Encodes `value` and decodes it as a `U`, expecting kDataLoss; returns the message.
template <typename U, typename T>
std::string decode_error(const T& value) {
  absl::StatusOr<U> decoded = round_trip_as<U>(value);
  REQUIRE_FALSE(decoded.ok());
  CHECK(decoded.status().code() == absl::StatusCode::kDataLoss);
  return std::string(decoded.status().message());
}

enum class Color : std::uint8_t { kRed = 1, kGreen = 2, kBlue = 255 };
enum Sign : int { kNegative = -1, kZero = 0, kPositive = 1 };
enum class Big : std::int64_t { kMin = std::numeric_limits<std::int64_t>::min() };

TEST_CASE("integers round-trip at their extremes") {
  SUBCASE("signed") {
    check_round_trip<std::int8_t>(-128);
    check_round_trip<std::int8_t>(127);
    check_round_trip<std::int16_t>(std::numeric_limits<std::int16_t>::min());
    check_round_trip<std::int32_t>(std::numeric_limits<std::int32_t>::max());
    check_round_trip<std::int64_t>(std::numeric_limits<std::int64_t>::min());
    check_round_trip<std::int64_t>(std::numeric_limits<std::int64_t>::max());
    check_round_trip<long>(0);
    check_round_trip<long long>(-1);
    check_round_trip<char>('x');
    check_round_trip<signed char>(-5);
    CHECK(member_of(-1) == wire::Value::INT);
  }
  SUBCASE("unsigned") {
    check_round_trip<std::uint8_t>(255);
    check_round_trip<std::uint16_t>(65535);
    check_round_trip<std::uint32_t>(std::numeric_limits<std::uint32_t>::max());
    check_round_trip<std::uint64_t>(std::numeric_limits<std::uint64_t>::max());
    check_round_trip<std::uint64_t>(0);
    check_round_trip<char32_t>(U'\U0010FFFF');
    CHECK(member_of(std::uint64_t{1}) == wire::Value::UINT);
  }
  SUBCASE("either member decodes into any integer type that holds the value") {
    CHECK(*round_trip_as<std::int64_t>(std::uint64_t{42}) == 42);
    CHECK(*round_trip_as<std::uint8_t>(std::int64_t{200}) == 200);
    CHECK(*round_trip_as<std::int64_t>(std::uint64_t{INT64_MAX}) == INT64_MAX);
  }
}

TEST_CASE("out-of-range integers are kDataLoss naming the value and the type") {
  SUBCASE("too big for int8_t") {
    CHECK(decode_error<std::int8_t>(300) == "integer 300 out of range for int8_t");
  }
  SUBCASE("too small for int8_t") {
    CHECK(decode_error<std::int8_t>(-129) == "integer -129 out of range for int8_t");
  }
  SUBCASE("negative into unsigned") {
    CHECK(decode_error<std::uint32_t>(-1) == "integer -1 out of range for uint32_t");
    CHECK(decode_error<std::uint64_t>(INT64_MIN) ==
          "integer -9223372036854775808 out of range for uint64_t");
  }
  SUBCASE("UINT64_MAX into int64_t") {
    CHECK(decode_error<std::int64_t>(UINT64_MAX) ==
          "integer 18446744073709551615 out of range for int64_t");
  }
  SUBCASE("into an enum") {
    CHECK(decode_error<Color>(256) == "integer 256 out of range for uint8_t");
  }
}

TEST_CASE("enums round-trip through their underlying type") {
  check_round_trip(Color::kRed);
  check_round_trip(Color::kBlue);
  check_round_trip(kNegative);
  check_round_trip(Big::kMin);
  check_round_trip(static_cast<Color>(7));  // Not an enumerator: still its underlying value.
  CHECK(member_of(Color::kBlue) == wire::Value::UINT);
  CHECK(member_of(kPositive) == wire::Value::INT);
}

TEST_CASE("bool has its own member") {
  check_round_trip(true);
  check_round_trip(false);
  CHECK(member_of(true) == wire::Value::BOOL);
  SUBCASE("bool is not an integer") {
    CHECK(decode_error<int>(true) == "expected an integer, found a bool");
    CHECK(decode_error<bool>(1) == "expected a bool, found an integer");
    CHECK(decode_error<bool>(1u) == "expected a bool, found an unsigned integer");
  }
}

TEST_CASE("floating point round-trips bit for bit") {
  SUBCASE("double") {
    check_round_trip(0.0);
    check_round_trip(std::numeric_limits<double>::max());
    check_round_trip(std::numeric_limits<double>::lowest());
    check_round_trip(std::numeric_limits<double>::denorm_min());
    check_round_trip(std::numeric_limits<double>::infinity());
    check_round_trip(-std::numeric_limits<double>::infinity());
    check_round_trip(3.141592653589793);
    CHECK(member_of(1.5) == wire::Value::FLOAT);
  }
  SUBCASE("negative zero keeps its sign") {
    absl::StatusOr<double> d = round_trip(-0.0);
    REQUIRE(d.ok());
    CHECK(std::signbit(*d));
  }
  SUBCASE("NaN stays NaN") {
    absl::StatusOr<double> d = round_trip(std::numeric_limits<double>::quiet_NaN());
    REQUIRE(d.ok());
    CHECK(std::isnan(*d));
    absl::StatusOr<float> f = round_trip(std::numeric_limits<float>::quiet_NaN());
    REQUIRE(f.ok());
    CHECK(std::isnan(*f));
    absl::StatusOr<std::vector<double>> v =
        round_trip(std::vector<double>{1.0, std::numeric_limits<double>::quiet_NaN()});
    REQUIRE(v.ok());
    CHECK(std::isnan((*v)[1]));
  }
  SUBCASE("float") {
    check_round_trip(1.25f);
    check_round_trip(std::numeric_limits<float>::max());
    check_round_trip(std::numeric_limits<float>::denorm_min());
    check_round_trip(-std::numeric_limits<float>::infinity());
  }
  SUBCASE("a double too big for float is an error") {
    CHECK(decode_error<float>(1e300) == "float 1e+300 out of range for float");
  }
  SUBCASE("floats are not integers") {
    CHECK(decode_error<double>(1) == "expected a float, found an integer");
    CHECK(decode_error<int>(1.0) == "expected an integer, found a float");
  }
}

TEST_CASE("strings are binary safe") {
  SUBCASE("empty") { check_round_trip(std::string()); }
  SUBCASE("text") { check_round_trip(std::string("hello, world")); }
  SUBCASE("embedded NULs") { check_round_trip(std::string("a\0b\0\0c", 6)); }
  SUBCASE("every byte value") {
    std::string all;
    for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
    check_round_trip(all);
  }
  SUBCASE("large") { check_round_trip(std::string(1 << 20, '\xff')); }
  SUBCASE("written as bytes") { CHECK(member_of(std::string("x")) == wire::Value::BYTES); }
  SUBCASE("not an integer") {
    CHECK(decode_error<int>(std::string("7")) == "expected an integer, found bytes");
  }
}

TEST_CASE("vectors") {
  SUBCASE("signed integers are packed") {
    std::vector<std::int64_t> v = {INT64_MIN, -1, 0, 1, INT64_MAX};
    check_round_trip(v);
    CHECK(member_of(v) == wire::Value::INTS);
    check_round_trip(std::vector<std::int8_t>{-128, 0, 127});
    check_round_trip(std::vector<char>{'a', '\0', 'z'});
  }
  SUBCASE("unsigned integers are packed") {
    std::vector<std::uint64_t> v = {0, 1, UINT64_MAX};
    check_round_trip(v);
    CHECK(member_of(v) == wire::Value::UINTS);
    check_round_trip(std::vector<std::uint16_t>{0, 65535});
  }
  SUBCASE("floating point is packed") {
    std::vector<double> v = {-0.5, 1e300, std::numeric_limits<double>::infinity()};
    check_round_trip(v);
    CHECK(member_of(v) == wire::Value::FLOATS);
    check_round_trip(std::vector<float>{1.5f, -2.25f});
  }
  SUBCASE("empty") {
    check_round_trip(std::vector<int>{});
    check_round_trip(std::vector<std::string>{});
    check_round_trip(std::vector<std::vector<int>>{});
  }
  SUBCASE("bool") {
    std::vector<bool> v = {true, false, false, true, true};
    check_round_trip(v);
    CHECK(member_of(v) == wire::Value::LIST);
    check_round_trip(std::vector<bool>{});
  }
  SUBCASE("other element types use a list") {
    std::vector<std::string> v = {"a", "", std::string("\0", 1)};
    check_round_trip(v);
    CHECK(member_of(v) == wire::Value::LIST);
    check_round_trip(std::vector<std::vector<int>>{{1, 2}, {}, {3}});
    check_round_trip(std::vector<Color>{Color::kRed, Color::kBlue});
  }
  SUBCASE("large") {
    std::vector<std::int32_t> v(100000);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::int32_t>(i * 7919 - 5000);
    check_round_trip(v);
  }
  SUBCASE("a packed element out of range names its index") {
    CHECK(decode_error<std::vector<std::int8_t>>(std::vector<int>{1, 2, 1000}) ==
          "element 2: integer 1000 out of range for int8_t");
    CHECK(decode_error<std::vector<std::uint32_t>>(std::vector<int>{-1}) ==
          "element 0: integer -1 out of range for uint32_t");
  }
  SUBCASE("packed signed and unsigned interconvert when in range") {
    CHECK(*round_trip_as<std::vector<std::int16_t>>(std::vector<std::uint64_t>{1, 2}) ==
          std::vector<std::int16_t>{1, 2});
  }
  SUBCASE("a list of values also decodes into a packed vector") {
    absl::StatusOr<std::vector<int>> v = decode_built<std::vector<int>>([](wire::Value::Builder b) {
      auto list = b.initList(2);
      list[0].setInt(5);
      list[1].setUint(6);
    });
    REQUIRE(v.ok());
    CHECK(*v == std::vector<int>{5, 6});
  }
  SUBCASE("wrong members") {
    CHECK(decode_error<std::vector<int>>(std::vector<double>{1.0}) ==
          "expected a list, found a packed list of floats");
    CHECK(decode_error<std::vector<double>>(std::vector<int>{1}) ==
          "expected a list, found a packed list of integers");
    CHECK(decode_error<std::vector<int>>(5) == "expected a list, found an integer");
    CHECK(decode_error<std::vector<std::string>>(std::vector<int>{1}) ==
          "expected a list, found a packed list of integers");
    CHECK(decode_error<std::vector<bool>>(std::vector<int>{1}) ==
          "expected a list of bools, found a packed list of integers");
    CHECK(decode_error<std::vector<std::string>>(std::vector<std::vector<int>>{{1}}) ==
          "element 0: expected bytes, found a packed list of integers");
  }
}

TEST_CASE("std::array") {
  check_round_trip(std::array<int, 3>{1, -2, 3});
  check_round_trip(std::array<std::string, 2>{"x", "y"});
  check_round_trip(std::array<bool, 2>{true, false});
  check_round_trip(std::array<double, 0>{});
  CHECK(decode_error<std::array<int, 2>>(std::vector<int>{1, 2, 3}) ==
        "expected a list (std::array) of 2 elements, found one of 3 elements");
}

TEST_CASE("pairs and tuples") {
  SUBCASE("pair") {
    check_round_trip(std::pair<int, std::string>(-7, "seven"));
    check_round_trip(std::pair<std::uint64_t, bool>(UINT64_MAX, true));
  }
  SUBCASE("tuple") {
    check_round_trip(std::tuple<int, double, std::string>(1, 2.5, "three"));
    check_round_trip(std::tuple<std::tuple<int>, std::vector<int>>({4}, {5, 6}));
    CHECK(member_of(std::tuple<int>(1)) == wire::Value::LIST);
  }
  SUBCASE("the empty tuple and monostate are none") {
    check_round_trip(std::tuple<>());
    check_round_trip(std::monostate());
    CHECK(member_of(std::tuple<>()) == wire::Value::NONE);
    CHECK(member_of(std::monostate()) == wire::Value::NONE);
    CHECK(decode_error<std::monostate>(0) == "expected none, found an integer");
    CHECK(decode_error<std::tuple<>>(std::tuple<int>(0)) ==
          "expected none (an empty tuple), found a list");
  }
  SUBCASE("wrong arity") {
    CHECK(decode_error<std::tuple<int, int>>(std::tuple<int, int, int>(1, 2, 3)) ==
          "expected a list (a tuple) of 2 elements, found one of 3 elements");
    CHECK(decode_error<std::tuple<int, int, int>>(std::pair<int, int>(1, 2)) ==
          "expected a list (a tuple) of 3 elements, found one of 2 elements");
    CHECK(decode_error<std::pair<int, int>>(std::tuple<int>(1)) ==
          "expected a list (a pair) of 2 elements, found one of 1 elements");
  }
  SUBCASE("a wrong element names its position") {
    CHECK(decode_error<std::tuple<int, std::string>>(std::tuple<int, int>(1, 2)) ==
          "tuple element 1: expected bytes, found an integer");
    CHECK(decode_error<std::pair<int, std::string>>(std::pair<std::string, std::string>(
              "a", "b")) == "first: expected an integer, found bytes");
  }
  SUBCASE("not a list") {
    CHECK(decode_error<std::tuple<int, int>>(std::string("ab")) ==
          "expected a list of 2 elements (a tuple), found bytes");
  }
}

TEST_CASE("optional") {
  SUBCASE("nullopt is none") {
    check_round_trip(std::optional<int>());
    CHECK(member_of(std::optional<int>()) == wire::Value::NONE);
  }
  SUBCASE("a value is a one-element list") {
    check_round_trip(std::optional<int>(0));
    check_round_trip(std::optional<std::string>(""));
    check_round_trip(std::optional<std::vector<int>>(std::vector<int>{}));
    CHECK(member_of(std::optional<int>(3)) == wire::Value::LIST);
  }
  SUBCASE("optional<optional<T>> keeps all three states") {
    using Nested = std::optional<std::optional<int>>;
    check_round_trip(Nested());
    check_round_trip(Nested(std::optional<int>()));
    check_round_trip(Nested(std::optional<int>(5)));
    CHECK(round_trip(Nested(std::optional<int>()))->has_value());
  }
  SUBCASE("errors") {
    CHECK(decode_error<std::optional<int>>(5) ==
          "expected none or a one-element list (an optional), found an integer");
    CHECK(decode_error<std::optional<int>>(std::tuple<int, int>(1, 2)) ==
          "expected a list (an engaged optional) of 1 elements, found one of 2 elements");
    CHECK(decode_error<std::optional<int>>(std::optional<std::string>("x")) ==
          "optional value: expected an integer, found bytes");
  }
}

TEST_CASE("maps") {
  SUBCASE("std::map") {
    check_round_trip(std::map<std::string, int>{{"a", 1}, {"b", -2}, {"", 0}});
    check_round_trip(std::map<int, std::vector<std::string>>{{3, {"x"}}, {-1, {}}});
    check_round_trip(std::map<int, int>{});
  }
  SUBCASE("std::unordered_map") {
    check_round_trip(std::unordered_map<std::uint64_t, std::string>{{UINT64_MAX, "max"}, {0, ""}});
    check_round_trip(std::unordered_map<std::string, double>{});
  }
  SUBCASE("written like a list of pairs") {
    std::map<std::string, int> m = {{"a", 1}, {"b", 2}};
    absl::StatusOr<std::vector<std::pair<std::string, int>>> pairs =
        round_trip_as<std::vector<std::pair<std::string, int>>>(m);
    REQUIRE(pairs.ok());
    CHECK(*pairs == std::vector<std::pair<std::string, int>>{{"a", 1}, {"b", 2}});
    absl::StatusOr<std::unordered_map<std::string, int>> back =
        round_trip_as<std::unordered_map<std::string, int>>(*pairs);
    REQUIRE(back.ok());
    CHECK(back->at("b") == 2);
  }
  SUBCASE("duplicate keys are an error") {
    std::vector<std::pair<int, int>> dup = {{1, 1}, {1, 2}};
    CHECK(decode_error<std::map<int, int>>(dup) == "map entry 1: duplicate key");
    CHECK(decode_error<std::unordered_map<int, int>>(dup) == "map entry 1: duplicate key");
  }
  SUBCASE("a bad entry names its index") {
    CHECK(decode_error<std::map<int, int>>(std::vector<std::pair<int, std::string>>{{1, "x"}}) ==
          "map entry 0: second: expected an integer, found bytes");
    CHECK(decode_error<std::map<int, int>>(std::vector<std::tuple<int>>{{1}}) ==
          "map entry 0: expected a list (a pair) of 2 elements, found one of 1 elements");
  }
}

TEST_CASE("deeply nested standard types") {
  using Inner = std::optional<std::tuple<int, double, std::string>>;
  using Nested = std::vector<std::map<std::string, Inner>>;
  Nested value = {
      {{"one", std::tuple<int, double, std::string>(1, 1.5, "uno")},
       {"none", std::nullopt},
       {std::string("\0bin", 4), std::tuple<int, double, std::string>(INT32_MIN, -0.0, "")}},
      {},
      {{"", std::tuple<int, double, std::string>(0, 1e-300, std::string(1000, 'z'))}},
  };
  check_round_trip(value);

  SUBCASE("an error deep inside names the path") {
    using Wrong =
        std::vector<std::map<std::string, std::optional<std::tuple<int, int, std::string>>>>;
    absl::StatusOr<Wrong> decoded = round_trip_as<Wrong>(value);
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.status().code() == absl::StatusCode::kDataLoss);
    CHECK(decoded.status().message() ==
          "element 0: map entry 0: second: optional value: tuple element 1: expected an integer, "
          "found a float");
  }
}

TEST_CASE("decoding overwrites an existing object completely") {
  capnp::MallocMessageBuilder message;
  auto root = message.initRoot<wire::Value>();
  SUBCASE("vector") {
    encode_value(std::vector<std::string>{"a"}, root);
    std::vector<std::string> out = {"x", "y", "z"};
    REQUIRE(Codec<std::vector<std::string>>::decode(root.asReader(), out).ok());
    CHECK(out == std::vector<std::string>{"a"});
  }
  SUBCASE("map") {
    encode_value(std::map<int, int>{{1, 1}}, root);
    std::map<int, int> out = {{2, 2}, {3, 3}};
    REQUIRE(decode_value(root.asReader(), out).ok());
    CHECK(out == std::map<int, int>{{1, 1}});
  }
  SUBCASE("optional") {
    encode_value(std::optional<int>(), root);
    std::optional<int> out = 5;
    REQUIRE(decode_value(root.asReader(), out).ok());
    CHECK_FALSE(out.has_value());
  }
}

TEST_CASE("a user-specialized codec") {
  check_round_trip(Point{3, -4});
  check_round_trip(std::vector<Point>{{1, 2}, {3, 4}});
  check_round_trip(
      std::map<std::string, std::optional<Point>>{{"o", Point{}}, {"n", std::nullopt}});
  CHECK(member_of(Point{1, 2}) == wire::Value::LIST);
  CHECK(decode_error<Point>(std::tuple<int, int, int>(1, 2, 3)) ==
        "expected a list (a tuple) of 2 elements, found one of 3 elements");
  CHECK(decode_error<std::vector<Point>>(std::vector<std::tuple<int, std::string>>{{1, "a"}}) ==
        "element 0: tuple element 1: expected an integer, found bytes");
}

CapnpStruct<Document> make_document() {
  return CapnpStruct<Document>::build([](Document::Builder b) {
    b.setId(UINT64_MAX);
    b.setTitle("A title");
    auto tags = b.initTags(3);
    tags.set(0, "red");
    tags.set(1, "");
    tags.set(2, "blue");
    const char body[] = {'\0', '\1', '\xff'};
    b.setBody(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(body), sizeof(body)));
  });
}

void check_document(Document::Reader d) {
  CHECK(d.getId() == UINT64_MAX);
  CHECK(std::string(d.getTitle().cStr()) == "A title");
  REQUIRE(d.getTags().size() == 3);
  CHECK(std::string(d.getTags()[0].cStr()) == "red");
  CHECK(std::string(d.getTags()[1].cStr()) == "");
  CHECK(std::string(d.getTags()[2].cStr()) == "blue");
  REQUIRE(d.getBody().size() == 3);
  CHECK(d.getBody()[2] == 0xff);
}

TEST_CASE("Cap'n Proto structs from the user's schema") {
  SUBCASE("build and read") {
    CapnpStruct<Document> doc = make_document();
    check_document(doc.reader());
    CHECK(doc.size_in_words() > 1);
  }
  SUBCASE("default is all defaults") {
    CapnpStruct<Document> doc;
    CHECK(doc.reader().getId() == 0);
    CHECK(doc.reader().getTags().size() == 0);
    absl::StatusOr<CapnpStruct<Document>> back = round_trip(doc);
    REQUIRE(back.ok());
    CHECK(back->reader().getId() == 0);
  }
  SUBCASE("copies are independent of the source message") {
    std::optional<CapnpStruct<Document>> copy;
    {
      capnp::MallocMessageBuilder message;
      auto b = message.initRoot<Document>();
      b.setId(9);
      b.setTitle("temporary");
      copy.emplace(b.asReader());
    }
    CHECK(copy->reader().getId() == 9);
    CHECK(std::string(copy->reader().getTitle().cStr()) == "temporary");
    CapnpStruct<Document> second = *copy;
    CapnpStruct<Document> moved = std::move(*copy);
    copy.reset();
    CHECK(second.reader().getId() == 9);
    CHECK(moved.reader().getId() == 9);
  }
  SUBCASE("round trip through the struct member; the result outlives the frame") {
    CHECK(member_of(make_document()) == wire::Value::STRUCT);
    absl::StatusOr<CapnpStruct<Document>> back = round_trip(make_document());
    REQUIRE(back.ok());
    check_document(back->reader());
  }
  SUBCASE("inside containers") {
    std::vector<std::pair<int, CapnpStruct<Document>>> v = {{1, make_document()}, {2, {}}};
    auto back = round_trip(v);
    REQUIRE(back.ok());
    REQUIRE(back->size() == 2);
    CHECK((*back)[0].first == 1);
    check_document((*back)[0].second.reader());
    CHECK((*back)[1].second.reader().getId() == 0);
  }
  SUBCASE("Reader and Builder encode directly") {
    CapnpStruct<Document> doc = make_document();
    absl::StatusOr<CapnpStruct<Document>> back = round_trip_as<CapnpStruct<Document>>(doc.reader());
    REQUIRE(back.ok());
    check_document(back->reader());

    capnp::MallocMessageBuilder message;
    auto b = message.initRoot<Document>();
    b.setId(77);
    back = round_trip_as<CapnpStruct<Document>>(b);
    REQUIRE(back.ok());
    CHECK(back->reader().getId() == 77);
  }
  SUBCASE("errors") {
    CHECK(decode_error<CapnpStruct<Document>>(5) == "expected a struct, found an integer");
    CHECK(decode_error<int>(make_document()) == "expected an integer, found a struct");
    absl::StatusOr<CapnpStruct<Document>> list_pointer = decode_built<CapnpStruct<Document>>(
        [](wire::Value::Builder b) { b.initStruct().initAs<capnp::List<std::int64_t>>(3); });
    REQUIRE_FALSE(list_pointer.ok());
    CHECK(list_pointer.status().code() == absl::StatusCode::kDataLoss);
    CHECK(list_pointer.status().message() == "expected a struct pointer, found a list pointer");
  }
}

TEST_CASE("sets round-trip, written like vectors; a duplicate element is kDataLoss") {
  SUBCASE("std::set") {
    check_round_trip(std::set<std::string>{"b", "a", ""});
    check_round_trip(std::set<int64_t>{-5, 0, INT64_MAX});
    check_round_trip(std::set<bool>{false, true});
    check_round_trip(std::set<std::pair<int, std::string>>{{1, "x"}, {1, "y"}});
    check_round_trip(std::set<int>{});
    CHECK(member_of(std::set<int64_t>{1, 2}) == wire::Value::INTS);
    CHECK(*round_trip_as<std::vector<int>>(std::set<int>{3, 1, 2}) == std::vector<int>{1, 2, 3});
  }
  SUBCASE("std::unordered_set") {
    check_round_trip(std::unordered_set<std::uint64_t>{UINT64_MAX, 0, 7});
    check_round_trip(std::unordered_set<std::string>{"x", "yy"});
    check_round_trip(std::unordered_set<double>{});
  }
  SUBCASE("malformed") {
    CHECK(decode_error<std::set<int>>(std::vector<int>{1, 2, 1}) == "set element 2: duplicate");
    CHECK(decode_error<std::unordered_set<std::string>>(std::vector<std::string>{"a", "a"}) ==
          "set element 1: duplicate");
    CHECK(decode_error<std::set<std::string>>(std::vector<int>{1}) ==
          "expected a list, found a packed list of integers");
    CHECK(decode_error<std::set<int>>(std::string("x")) == "expected a list, found bytes");
    CHECK(decode_error<std::set<std::uint8_t>>(std::vector<int>{1, 300}) ==
          "element 1: integer 300 out of range for uint8_t");
  }
}

TEST_CASE("variants round-trip with their index; a bad index is kDataLoss") {
  using V = std::variant<int, std::string, std::vector<double>, std::monostate>;
  SUBCASE("each alternative") {
    check_round_trip(V(42));
    check_round_trip(V(std::string("text")));
    check_round_trip(V(std::vector<double>{1.5, -2}));
    check_round_trip(V(std::monostate()));
    // Two alternatives of one type stay apart by index.
    using Twins = std::variant<int, int>;
    absl::StatusOr<Twins> second = round_trip(Twins(std::in_place_index<1>, 9));
    REQUIRE(second.ok());
    CHECK(second->index() == 1);
    CHECK(std::get<1>(*second) == 9);
    check_round_trip(std::vector<std::variant<bool, std::optional<int>>>{true, std::nullopt, 3});
  }
  SUBCASE("written as (index, value)") {
    absl::StatusOr<std::tuple<std::uint64_t, std::string>> raw =
        round_trip_as<std::tuple<std::uint64_t, std::string>>(V(std::string("s")));
    REQUIRE(raw.ok());
    CHECK(*raw == std::tuple<std::uint64_t, std::string>{1, "s"});
  }
  SUBCASE("malformed") {
    CHECK(decode_error<V>(std::tuple<int, int>(4, 0)) ==
          "variant index 4 out of range for a variant of 4 alternatives");
    CHECK(decode_error<V>(std::tuple<std::uint64_t, int>(UINT64_MAX, 0)) ==
          "variant index 18446744073709551615 out of range for a variant of 4 alternatives");
    CHECK(decode_error<V>(std::tuple<int, int>(-1, 0)) ==
          "variant index: integer -1 out of range for uint64_t");
    CHECK(decode_error<V>(std::tuple<int, int>(1, 5)) ==
          "variant alternative 1: expected bytes, found an integer");
    CHECK(decode_error<V>(std::tuple<int>(0)) ==
          "expected a list (a variant) of 2 elements, found one of 1 elements");
    CHECK(decode_error<V>(7) ==
          "expected a list of 2 elements (a variant: index, value), found an integer");
    CHECK(decode_error<V>(std::tuple<std::string, int>("0", 1)) ==
          "variant index: expected an integer, found bytes");
  }
}

TEST_CASE("absl::Duration and absl::Time round-trip exactly, infinities included") {
  SUBCASE("durations") {
    for (absl::Duration d :
         {absl::ZeroDuration(), absl::Nanoseconds(1), absl::Nanoseconds(1) / 4,
          -absl::Nanoseconds(1) / 4, absl::Seconds(-1), absl::Milliseconds(-1500),
          absl::Hours(24 * 365 * 1000) + absl::Nanoseconds(3), absl::InfiniteDuration(),
          -absl::InfiniteDuration(), absl::Seconds(std::numeric_limits<int64_t>::max()),
          absl::Seconds(std::numeric_limits<int64_t>::max()) + absl::Nanoseconds(999'999'999),
          absl::Seconds(std::numeric_limits<int64_t>::min()),
          absl::Seconds(std::numeric_limits<int64_t>::min()) + absl::Nanoseconds(1) / 4}) {
      CAPTURE(absl::FormatDuration(d));
      check_round_trip(d);
    }
    CHECK(member_of(absl::InfiniteDuration()) == wire::Value::FLOAT);
    CHECK(*round_trip_as<std::tuple<int64_t, int64_t>>(absl::Milliseconds(-1500)) ==
          std::tuple<int64_t, int64_t>{-2, 2'000'000'000});
  }
  SUBCASE("times") {
    check_round_trip(absl::UnixEpoch());
    check_round_trip(absl::Now());
    check_round_trip(absl::FromUnixSeconds(-86400) + absl::Nanoseconds(5));
    check_round_trip(absl::InfiniteFuture());
    check_round_trip(absl::InfinitePast());
  }
  SUBCASE("malformed") {
    CHECK(decode_error<absl::Duration>(1.5) ==
          "expected a list of 2 integers or an infinite float (a duration), found the float 1.5");
    CHECK(decode_error<absl::Duration>(std::nan("")).find("found the float nan") !=
          std::string::npos);
    CHECK(decode_error<absl::Duration>(std::tuple<int, int64_t>(0, 4'000'000'000)) ==
          "duration: quarter nanoseconds 4000000000 out of range [0, 4e9)");
    CHECK(decode_error<absl::Duration>(std::tuple<int, int>(0, -1)) ==
          "duration: quarter nanoseconds -1 out of range [0, 4e9)");
    CHECK(decode_error<absl::Duration>(std::tuple<std::uint64_t, int>(UINT64_MAX, 0)) ==
          "duration: tuple element 0: integer 18446744073709551615 out of range for int64_t");
    CHECK(decode_error<absl::Duration>(std::tuple<int>(1)) ==
          "duration: expected a list (a tuple) of 2 elements, found one of 1 elements");
    CHECK(decode_error<absl::Time>(std::string("now")) ==
          "duration: expected a list of 2 elements (a tuple), found bytes");
  }
}

TEST_CASE("std::chrono durations and time points round-trip through their count") {
  check_round_trip(std::chrono::nanoseconds(-123456789));
  check_round_trip(std::chrono::hours(7));
  check_round_trip(std::chrono::duration<double, std::milli>(2.5));
  check_round_trip(std::chrono::duration<std::uint8_t>(255));
  check_round_trip(std::chrono::system_clock::now());
  check_round_trip(std::chrono::steady_clock::now());
  check_round_trip(std::vector<std::chrono::milliseconds>{std::chrono::milliseconds(1)});
  CHECK(*round_trip_as<int64_t>(std::chrono::seconds(9)) == 9);
  SUBCASE("malformed") {
    CHECK(decode_error<std::chrono::duration<std::uint8_t>>(300) ==
          "std::chrono::duration: integer 300 out of range for uint8_t");
    CHECK(decode_error<std::chrono::seconds>(2.0) ==
          "std::chrono::duration: expected an integer, found a float");
    CHECK(decode_error<std::chrono::system_clock::time_point>(std::string("x")) ==
          "std::chrono::duration: expected an integer, found bytes");
  }
}

// Word `index` of a flat message (its segment table included), as an integer.
std::uint64_t& word_at(kj::Array<capnp::word>& flat, std::size_t index) {
  return *reinterpret_cast<std::uint64_t*>(flat.begin() + index);
}

TEST_CASE("malformed messages are kDataLoss, never an exception") {
  SUBCASE("a list pointer pointing out of bounds") {
    capnp::MallocMessageBuilder message;
    encode_value(std::vector<std::string>{"a", "b"}, message.initRoot<wire::Value>());
    kj::Array<capnp::word> flat = capnp::messageToFlatArray(message);
    // Word 0: segment table (one segment). Word 1: the root struct pointer. Its struct's pointer
    // section holds the `list` pointer; send that far past the end of the segment.
    const std::uint64_t root = word_at(flat, 1);
    REQUIRE((root & 3) == 0);
    const std::size_t offset = static_cast<std::uint32_t>(root) >> 2;
    const std::size_t data_words = static_cast<std::uint16_t>(root >> 32);
    const std::size_t list_pointer = 2 + offset + data_words;
    REQUIRE((word_at(flat, list_pointer) & 3) == 1);
    word_at(flat, list_pointer) = (word_at(flat, list_pointer) & ~std::uint64_t{0xfffffffc}) |
                                  (std::uint64_t{0x0fffffff} << 2);

    capnp::FlatArrayMessageReader reader(flat);
    wire::Value::Reader value = reader.getRoot<wire::Value>();
    REQUIRE(value.which() == wire::Value::LIST);
    absl::StatusOr<std::vector<std::string>> decoded;
    CHECK_NOTHROW(decoded = decode_value<std::vector<std::string>>(value));
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.status().code() == absl::StatusCode::kDataLoss);
    CHECK(std::string(decoded.status().message()).find("malformed message") == 0);

    std::vector<std::string> out;
    absl::Status status;
    CHECK_NOTHROW(status = Codec<std::vector<std::string>>::decode(value, out));
    CHECK(status.code() == absl::StatusCode::kDataLoss);
  }
  SUBCASE("nesting deeper than the reader allows") {
    using Deep = std::vector<std::vector<std::vector<std::vector<std::vector<int>>>>>;
    Deep deep = {{{{{1}}}}};
    capnp::MallocMessageBuilder message;
    encode_value(deep, message.initRoot<wire::Value>());
    kj::Array<capnp::word> flat = capnp::messageToFlatArray(message);
    capnp::ReaderOptions options;
    options.nestingLimit = 3;
    capnp::FlatArrayMessageReader reader(flat, options);
    absl::StatusOr<Deep> decoded;
    CHECK_NOTHROW(decoded = decode_value<Deep>(reader.getRoot<wire::Value>()));
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.status().code() == absl::StatusCode::kDataLoss);
  }
  SUBCASE("garbage words") {
    // A real root pointer to a Value, so that the reader gets that far; garbage after it.
    capnp::MallocMessageBuilder message;
    encode_value(0, message.initRoot<wire::Value>());
    kj::Array<capnp::word> valid = capnp::messageToFlatArray(message);
    std::mt19937_64 rng(7);
    int decoded_anything = 0;
    for (int round = 0; round < 2000; ++round) {
      kj::Array<capnp::word> flat = kj::heapArray<capnp::word>(16);
      for (std::size_t i = 0; i < flat.size(); ++i) word_at(flat, i) = rng();
      word_at(flat, 0) = (std::uint64_t{15} << 32);  // One segment of 15 words.
      word_at(flat, 1) = word_at(valid, 1);
      // The union discriminant: mostly a real member, sometimes an unknown one.
      word_at(flat, 2) = (word_at(flat, 2) & ~std::uint64_t{0xffff}) | (rng() % 13);
      try {
        capnp::FlatArrayMessageReader reader(flat);
        wire::Value::Reader value = reader.getRoot<wire::Value>();
        using Any = std::vector<std::map<std::string, std::optional<std::tuple<int, double>>>>;
        CHECK_NOTHROW((void)decode_value<Any>(value));
        CHECK_NOTHROW((void)decode_value<std::string>(value));
        CHECK_NOTHROW((void)decode_value<std::vector<int>>(value));
        CHECK_NOTHROW((void)decode_value<CapnpStruct<Document>>(value));
        CHECK_NOTHROW((void)decode_value<std::variant<int, std::string, std::set<int>>>(value));
        CHECK_NOTHROW((void)decode_value<std::unordered_set<std::string>>(value));
        CHECK_NOTHROW((void)decode_value<absl::Duration>(value));
        CHECK_NOTHROW((void)decode_value<absl::Time>(value));
        ++decoded_anything;
      } catch (const kj::Exception&) {
        // The reader itself refused the frame (bad segment table or root pointer).
      }
    }
    CHECK(decoded_anything > 0);
  }
  SUBCASE("random corruption of a valid frame") {
    using Complex =
        std::vector<std::map<std::string, std::optional<std::tuple<int, double, std::string>>>>;
    Complex value = {
        {{"k", std::tuple<int, double, std::string>(1, 2.0, "three")}, {"n", std::nullopt}},
        {{"z", std::tuple<int, double, std::string>(-1, 0.5, "")}}};
    capnp::MallocMessageBuilder message;
    encode_value(value, message.initRoot<wire::Value>());
    const kj::Array<capnp::word> original = capnp::messageToFlatArray(message);
    std::mt19937 rng(42);
    for (int round = 0; round < 3000; ++round) {
      kj::Array<capnp::word> flat = kj::heapArray<capnp::word>(original.size());
      std::memcpy(flat.begin(), original.begin(), original.asBytes().size());
      auto bytes = flat.asBytes();
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) {
        // Leave the segment table alone so that the reader gets past its header.
        const std::size_t at = 8 + rng() % (bytes.size() - 8);
        bytes[at] = static_cast<capnp::byte>(rng());
      }
      try {
        capnp::FlatArrayMessageReader reader(flat);
        wire::Value::Reader root = reader.getRoot<wire::Value>();
        absl::StatusOr<Complex> decoded;
        CHECK_NOTHROW(decoded = decode_value<Complex>(root));
        if (!decoded.ok()) CHECK(decoded.status().code() == absl::StatusCode::kDataLoss);
      } catch (const kj::Exception&) {
        // The reader itself refused the frame.
      }
    }
  }
}

}  // namespace
}  // namespace procpool
