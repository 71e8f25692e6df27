// What //tests:test_pch precompiles (bazel/precompiled_header.bzl): the headers that most test
// and benchmark files include, parsed once for all of them. .bazelrc puts it in front of each
// file of tests/ and bench/ (-include tests/test_pch.h). Only procpool's public headers, Abseil,
// Cap'n Proto and the standard library: nothing of tests/ or lib/, and not doctest (test_main.cc
// configures it before its include).
#ifndef PROCPOOL_TESTS_TEST_PCH_SOURCE_H_
#define PROCPOOL_TESTS_TEST_PCH_SOURCE_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "capnp/message.h"
#include "capnp/serialize.h"
#include "procpool/procpool.h"

#endif  // PROCPOOL_TESTS_TEST_PCH_SOURCE_H_
