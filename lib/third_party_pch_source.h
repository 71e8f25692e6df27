// What //lib:third_party_pch precompiles (bazel/precompiled_header.bzl): the Abseil, Cap'n Proto
// and standard headers that most of the library's files include, parsed once for all of them.
// .bazelrc puts it in front of each file of lib/ and examples/ in this workspace's builds only
// (-include lib/third_party_pch.h; the examples reach it through //:procpool); a consumer's
// build of @procpool compiles every file without it, and CMake builds the examples without it.
// Only third-party headers: none of procpool's own, whose layering the build checks.
#ifndef PROCPOOL_LIB_THIRD_PARTY_PCH_SOURCE_H_
#define PROCPOOL_LIB_THIRD_PARTY_PCH_SOURCE_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "kj/exception.h"

#endif  // PROCPOOL_LIB_THIRD_PARTY_PCH_SOURCE_H_
