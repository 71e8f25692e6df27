#!/usr/bin/env bash
# procpool built with clang (Debian's clang 14 against libstdc++ 12), as CI runs it beside
# tools/test.sh, whose suites g++ builds:
#   1. CMake with clang++: the library (every layer warning-free under -Wall -Wextra -Werror), its
#      layering (procpool_layering), the test suites and the examples, into a temporary directory;
#      then `ctest -LE 'soak|slurm'` (one check). Not the benchmarks: bench_imap_memory feeds
#      imap a std::views::iota on purpose (see below); Bazel builds them with g++;
#   2. every public header compiles on its own with clang++ -Wall -Wextra -Wpedantic -Werror, as
#      //tests:public_headers_test does with g++ (one check);
# The documentation's snippets are compiled by g++ only (tools/test.sh): some use std::views,
# which libstdc++ 12 and clang before 16 cannot compile together (LLVM issue 44178); procpool's
# own headers avoid them, and the suites leave what uses them out of a clang build
# (PROCPOOL_TEST_STD_VIEWS, tests/test_support.h).
# The last line printed is exactly "N passed, M failed"; the exit status is non-zero if M > 0.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install_deps.sh

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
passed=0
failed=0
JOBS="$(nproc)"
CMAKE_GEN=()
if command -v ninja >/dev/null 2>&1; then CMAKE_GEN=(-G Ninja); fi
BUILD="$WORK/cmake-clang"

# The library's layers are unity builds (one translation unit each: a third of the CPU of a
# file-by-file build); the tests are not (tests/CMakeLists.txt). tools/test.sh's Bazel build
# compiles every library file alone.
# --- 1. CMake + ctest with clang -----------------------------------------------------------------
echo "=== CMake with clang++: library, layering, tests, examples; ctest -LE 'soak|slurm'"
built=0
if CC=clang CXX=clang++ cmake -S . -B "$BUILD" "${CMAKE_GEN[@]}" --log-level=NOTICE \
      -DCMAKE_BUILD_TYPE=Debug -DPROCPOOL_WERROR=ON -DPROCPOOL_BUILD_BENCHMARKS=OFF \
      -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=0 </dev/null \
    && cmake --build "$BUILD" -j "$JOBS" </dev/null \
    && cmake --build "$BUILD" -j "$JOBS" --target procpool_layering </dev/null; then
  built=1
fi
if [[ $built -eq 1 ]] \
    && ctest --test-dir "$BUILD" -LE 'soak|slurm' -j "$JOBS" --output-on-failure </dev/null; then
  passed=$((passed + 1))
else
  echo "FAILED: the clang build or its tests" >&2
  failed=$((failed + 1))
fi

# --- 2. Each public header alone -------------------------------------------------------------------
echo "=== every public header alone, clang++ -Wall -Wextra -Wpedantic -Werror"
GEN="$WORK/gen/procpool/internal"
mkdir -p "$GEN"
headers_ok=1
if ! capnp compile -I/usr/include --src-prefix=lib/wire -oc++:"$GEN" lib/wire/protocol.capnp; then
  headers_ok=0
fi
while IFS= read -r header; do
  [[ $headers_ok -eq 1 ]] || break
  echo "#include \"${header#include/}\"" >"$WORK/header.cc"
  if ! clang++ -std=c++20 -Wall -Wextra -Wpedantic -Werror -fsyntax-only -Iinclude -I"$WORK/gen" \
      "$WORK/header.cc"; then
    echo "FAILED: $header does not compile on its own with clang++" >&2
    headers_ok=0
  fi
done < <(find include/procpool -name '*.h' | sort)
if [[ $headers_ok -eq 1 ]]; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi

echo "${passed} passed, ${failed} failed"
[[ $failed -eq 0 ]]
