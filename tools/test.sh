#!/usr/bin/env bash
# The single "run every test" command of procpool:
#   0. installs the Debian packages it needs, if any is missing;
#   1. bazel test //... (keeps going past failures); extra arguments are passed to it,
#      e.g. `bash tools/test.sh --config=asan`;
#   2. runs //tests:static_link_test built with --config=static (one more check; plain runs only);
#   3. builds and runs the separate consumer workspaces examples/consumer (one more check) and
#      examples/consumer_own_deps (procpool_deps(absl_repo=, capnp_repo=); one more check);
#   4. the CMake build, with clang where installed: configures and builds the library (each layer
#      warning-free under -Wall -Wextra -Werror; step 1 asks the same of g++ through .bazelrc),
#      links each layer alone with only the layers below it (procpool_layering) and builds the
#      examples (one check);
#   5. installs that build into a temporary prefix and builds and runs examples/consumer_cmake
#      against it through find_package(procpool), builds the same program with
#      `pkg-config --cflags --libs procpool` with g++ and with clang++ and runs both, and checks
#      that version.h, the CMake package, procpool.pc and CHANGELOG.md name the same version (one
#      check);
#   6. compiles every C++ snippet of README.md and docs/guide.md, each as its own translation unit
#      (tools/check_snippets.py; one check).
# Steps 3-6 run in the background while step 1's tests run (step 1 compiles everything first):
# the tests mostly wait, those steps mostly compile. Their output follows step 2's.
# The test suites are built and run once here, by Bazel with g++ (step 1). CI (.ci/run) builds
# and runs them again with clang through CMake and ctest (tools/test_clang.sh), which also checks
# tests/CMakeLists.txt.
# SKIP_CONSUMER=1 leaves out steps 3-6 (CI's soak and sanitizer runs: they only vary Bazel flags).
# TEST_TARGETS="//tests:a_test //tests:b_test" runs those in step 1 instead of //... (CI's run of
# some suites under tools/enosys_run).
# The last line printed is exactly "N passed, M failed"; the exit status is non-zero if M > 0.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install_deps.sh

BAZEL="${BAZEL:-bazel}"
# The consumer workspaces compile with clang, which install_deps.sh installs (CC, if set, is used
# instead): each builds the whole library again as a user's workspace would, and clang takes
# about half of g++'s CPU for it. This workspace's suites stay with g++ (the system compiler):
# with clang 14 the std::views checks compile out (test_support.h), and CI builds them with
# clang through CMake as well (tools/test_clang.sh).
# Both go through ccache (installed by install_deps.sh), with a cache that lives only as long as
# this run ($WORK/ccache): the second workspace compiles the library's files with the same
# preprocessed text, flags and compiler as the first, so ccache hands it the first's objects
# (measured: the second's build took 46 CPU-seconds instead of 135; the first's, 147 instead of
# 135, for filling the cache). Any file whose preprocessed text differs (its own Abseil's
# headers, a define of its own that procpool's code reads) is compiled afresh. The cache is
# keyed on the preprocessed text, not on the command line: that is what lets the two workspaces'
# differing -iquote paths share it.
CONSUMER_CC=()
if [[ -z "${CC:-}" ]] && command -v clang >/dev/null 2>&1; then
  CONSUMER_CC=(--repo_env=CC=clang)
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [[ ${#CONSUMER_CC[@]} -gt 0 && -x /usr/lib/ccache/clang ]]; then
  mkdir -p "$WORK/ccache"
  # CCACHE_NOCPP2: a miss compiles the text ccache preprocessed to look it up, instead of
  # preprocessing the file a second time (the first workspace: 108 CPU-seconds instead of 125).
  CONSUMER_CC=(--repo_env=CC=/usr/lib/ccache/clang --action_env=CCACHE_DIR="$WORK/ccache"
    --action_env=CCACHE_NOCPP2=1 --sandbox_writable_path="$WORK/ccache")
fi
BEP="$WORK/bep.json"

passed=0
failed=0

# --- Steps 3-6: the checks outside this workspace's Bazel build ------------------------------
# They compile procpool again (other workspaces, CMake, the snippets) and so need the CPU, while
# step 1's tests mostly wait on workers, pipes and timeouts. So they run in the background while
# step 1's tests run (after step 1 has compiled everything), as two streams side by side: step 3
# (consumer_checks), and steps 4-6 (cmake_and_snippet_checks). Each stream has stretches on one
# core (a Bazel server's start and analysis, a CMake configure, a link, one compile of
# consumer_cmake) that the other fills. Their output is printed after step 2 and each writes its
# counts to $WORK/<stream>.counts.
consumer_checks() {
  local passed=0 failed=0
  # --- 3. Consumer workspaces ------------------------------------------------------------------
  echo "=== examples/consumer: bazel build //... && bazel run //:main"
  if (cd examples/consumer && "$BAZEL" build "${CONSUMER_CC[@]}" //... </dev/null \
        && "$BAZEL" run "${CONSUMER_CC[@]}" //:main </dev/null); then
    passed=$((passed + 1))
  else
    echo "FAILED: examples/consumer" >&2
    failed=$((failed + 1))
  fi
  echo "=== examples/consumer_own_deps: procpool on the workspace's own Abseil and Cap'n Proto"
  if (cd examples/consumer_own_deps && "$BAZEL" run "${CONSUMER_CC[@]}" //:main </dev/null); then
    passed=$((passed + 1))
  else
    echo "FAILED: examples/consumer_own_deps" >&2
    failed=$((failed + 1))
  fi
  echo "$passed $failed" >"$WORK/consumer_checks.counts"
}

cmake_and_snippet_checks() {
  local passed=0 failed=0
  # --- 4. CMake build -----------------------------------------------------------------------------
  JOBS="$(nproc)"
  CMAKE_GEN=()
  if command -v ninja >/dev/null 2>&1; then CMAKE_GEN=(-G Ninja); fi
  CMAKE_BUILD="$WORK/cmake-build"
  # With clang where installed (install_deps.sh installs it): its warnings are asked of the
  # library here, g++'s in step 1 (.bazelrc), and clang takes about three quarters of g++'s CPU
  # for this build (measured: 64 CPU-seconds instead of 86). The installed library is then
  # used from g++ and clang++ (step 5).
  CMAKE_CC=()
  if command -v clang >/dev/null 2>&1 && command -v clang++ >/dev/null 2>&1; then
    CMAKE_CC=(-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++)
  fi
  echo "=== CMake: the library (-Werror), its layering, the examples"
  # -O0 without debug information (build type None) and linked by gold: this build is for
  # correctness, and takes about half of the CPU of the default RelWithDebInfo (Debug's -g and
  # the default linker took another 20%). No tests or benchmarks: step 1 ran the suites, and CI builds and runs
  # them with CMake too (clang, tools/test_clang.sh). A unity build (each layer one translation
  # unit): the headers are parsed once a layer, not once a file, which takes about 40% of the CPU
  # of a file-by-file build. Step 1 has compiled every file alone (so a file that misses an include
  # fails there), and the warnings and the layering are those of the same code.
  # cmake_built says whether the build succeeded: the install check below needs it.
  cmake_built=0
  if cmake -S . -B "$CMAKE_BUILD" "${CMAKE_GEN[@]}" "${CMAKE_CC[@]}" --log-level=NOTICE \
        -DCMAKE_BUILD_TYPE=None \
        -DCMAKE_EXE_LINKER_FLAGS=-fuse-ld=gold -DCMAKE_SHARED_LINKER_FLAGS=-fuse-ld=gold \
        -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=0 \
        -DPROCPOOL_BUILD_TESTS=OFF -DPROCPOOL_BUILD_BENCHMARKS=OFF -DPROCPOOL_WERROR=ON \
        </dev/null \
      && cmake --build "$CMAKE_BUILD" -j "$JOBS" </dev/null \
      && cmake --build "$CMAKE_BUILD" -j "$JOBS" --target procpool_layering </dev/null; then
    cmake_built=1
    passed=$((passed + 1))
  else
    echo "FAILED: the CMake build (library, layering or examples)" >&2
    failed=$((failed + 1))
  fi

  # --- 5. Installed procpool: find_package, pkg-config, one version ----------------------------
  # Every command of the check; the first that fails fails it.
  consumer_cmake() {
    local prefix="$WORK/prefix" build="$WORK/consumer-cmake-build"
    cmake --install "$CMAKE_BUILD" --prefix "$prefix" </dev/null >/dev/null || return 1
    cmake -S examples/consumer_cmake -B "$build" "${CMAKE_GEN[@]}" --log-level=NOTICE \
      -DCMAKE_PREFIX_PATH="$prefix" \
      </dev/null || return 1
    cmake --build "$build" </dev/null || return 1
    "$build/consumer_cmake" </dev/null || return 1

    # The same program through pkg-config alone, with pkg-config's version as the expected one.
    local pcdir
    pcdir="$(dirname "$(find "$prefix" -name procpool.pc -print -quit)")"
    export PKG_CONFIG_PATH="$pcdir"
    local pc_version
    pc_version="$(pkg-config --modversion procpool)" || return 1
    # shellcheck disable=SC2046  # pkg-config's flags are meant to be split
    c++ -o "$WORK/consumer_pkgconfig" examples/consumer_cmake/main.cc \
      -DPROCPOOL_EXPECTED_VERSION="\"$pc_version\"" $(pkg-config --cflags --libs procpool) \
      || return 1
    "$WORK/consumer_pkgconfig" </dev/null || return 1
    # And with clang (another compiler, another reading of the public headers), where installed.
    if command -v clang++ >/dev/null 2>&1; then
      # shellcheck disable=SC2046
      clang++ -o "$WORK/consumer_pkgconfig_clang" examples/consumer_cmake/main.cc \
        -DPROCPOOL_EXPECTED_VERSION="\"$pc_version\"" $(pkg-config --cflags --libs procpool) \
        || return 1
      "$WORK/consumer_pkgconfig_clang" </dev/null || return 1
    fi

    # version.h (which CMakeLists.txt reads) and the newest CHANGELOG.md entry name one version.
    local header_version changelog_version
    header_version="$(sed -nE 's/^#define PROCPOOL_VERSION_(MAJOR|MINOR|PATCH) +([0-9]+)$/\2/p' \
      include/procpool/version.h | paste -sd.)"
    changelog_version="$(sed -nE 's/^## \[([0-9]+\.[0-9]+\.[0-9]+)\].*/\1/p' CHANGELOG.md | head -1)"
    if [[ "$header_version" != "$pc_version" || "$header_version" != "$changelog_version" ]]; then
      echo "version mismatch: version.h $header_version, procpool.pc $pc_version," \
        "CHANGELOG.md $changelog_version" >&2
      return 1
    fi
    echo "consumer_cmake: version $header_version in version.h, procpool.pc and CHANGELOG.md"
  }
  echo "=== examples/consumer_cmake: install, find_package(procpool), pkg-config, versions"
  if [[ $cmake_built -eq 1 ]] && (consumer_cmake); then
    passed=$((passed + 1))
  else
    echo "FAILED: examples/consumer_cmake (installed procpool)" >&2
    failed=$((failed + 1))
  fi

  # --- 6. The documentation's C++ snippets compile ---------------------------------------------
  echo "=== README.md and docs/guide.md: every C++ snippet compiles"
  if python3 tools/check_snippets.py README.md docs/guide.md </dev/null; then
    passed=$((passed + 1))
  else
    echo "FAILED: a C++ snippet of README.md or docs/guide.md does not compile" >&2
    failed=$((failed + 1))
  fi
  echo "$passed $failed" >"$WORK/cmake_and_snippet_checks.counts"
}

run_outside=1
if [[ "${SKIP_CONSUMER:-0}" == 1 ]]; then run_outside=0; fi
OUTSIDE_STREAMS=(consumer_checks cmake_and_snippet_checks)
outside_pids=()
if [[ $run_outside -eq 1 ]]; then
  # Compile everything first (all of the CPU), then start the outside checks beside the tests.
  echo "=== bazel build //... $*"
  "$BAZEL" build //... --keep_going "$@" </dev/null || true
  for stream in "${OUTSIDE_STREAMS[@]}"; do
    "$stream" >"$WORK/$stream.log" 2>&1 </dev/null &
    outside_pids+=("$!")
  done
fi

# --- 1. Bazel tests --------------------------------------------------------------------------
TARGETS="${TEST_TARGETS:-//...}"
echo "=== bazel test ${TARGETS} $*"
set +e
# Tests tagged "soak" are long, and those tagged "slurm" need a Slurm cluster
# (tools/slurm_local.sh): CI runs both on their own (pass --test_tag_filters=soak or =slurm).
# shellcheck disable=SC2086  # TARGETS is a list of labels
"$BAZEL" test ${TARGETS} --keep_going --test_output=errors --test_tag_filters=-soak,-slurm \
  --build_event_json_file="$BEP" "$@" </dev/null
bazel_rc=$?
set -e

# Count test targets from the build event protocol: a test passes if its summary is PASSED or
# FLAKY; a test with any other summary, or with none (it failed to build), fails.
read -r bp bf < <(python3 - "$BEP" <<'PY'
import json, sys

# A test counts by its summary (PASSED or FLAKY pass, anything else fails). A test target that
# did not build has no summary: it fails too. A test left out by --test_tag_filters builds fine
# and has no summary: it does not count.
tests, status, built = set(), {}, {}
try:
    with open(sys.argv[1]) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            ev = json.loads(line)
            eid = ev.get("id", {})
            if "targetConfigured" in eid:
                conf = ev.get("configured", {})
                if "testSize" in conf or conf.get("targetKind", "").endswith("_test rule"):
                    tests.add(eid["targetConfigured"]["label"])
            elif "targetCompleted" in eid:
                label = eid["targetCompleted"]["label"]
                built[label] = bool(ev.get("completed", {}).get("success", False))
            elif "testSummary" in eid:
                label = eid["testSummary"]["label"]
                tests.add(label)
                status[label] = ev.get("testSummary", {}).get("overallStatus", "NO_STATUS")
except FileNotFoundError:
    pass
ok = sorted(t for t in tests if status.get(t) in ("PASSED", "FLAKY"))
bad = sorted(t for t in tests
             if (t in status and status[t] not in ("PASSED", "FLAKY"))
             or (t not in status and not built.get(t, False)))
for t in bad:
    print("FAILED: %s (%s)" % (t, status.get(t, "did not build")), file=sys.stderr)
print(len(ok), len(bad))
PY
)
passed=$((passed + bp))
failed=$((failed + bf))
# 0: all passed; 3: some tests failed (counted above); 4: no test targets.
if [[ $bazel_rc -ne 0 && $bazel_rc -ne 3 && $bazel_rc -ne 4 && $bf -eq 0 ]]; then
  echo "FAILED: bazel test exited with status $bazel_rc (build or analysis error)" >&2
  failed=$((failed + 1))
fi

# --- 2. The static build option ------------------------------------------------------------
# --config=static links Abseil and Cap'n Proto from their static archives (deps.bzl); this test
# fails if anything of them is still mapped as a shared object, or if a pool does not work.
# Only in the plain run: runs with flags (a tag filter, a sanitizer config: CI's soak, Slurm and
# ASan steps) are about other tests, and a tag filter would leave this step no test to run.
# --platform_suffix= (none): the static build only links differently, so in step 1's output
# directory it compiles nothing again but the test itself (--config=static gives it a directory of
# its own, for switching back and forth by hand).
if [[ $# -eq 0 ]]; then
  echo "=== bazel test --config=static //tests:static_link_test"
  if "$BAZEL" test --config=static --platform_suffix= //tests:static_link_test \
      --test_output=errors </dev/null; then
    passed=$((passed + 1))
  else
    echo "FAILED: //tests:static_link_test with --config=static" >&2
    failed=$((failed + 1))
  fi
fi

if [[ ${#outside_pids[@]} -gt 0 ]]; then
  for pid in "${outside_pids[@]}"; do wait "$pid" || true; done
  for stream in "${OUTSIDE_STREAMS[@]}"; do
    cat "$WORK/$stream.log"
    if [[ -s "$WORK/$stream.counts" ]]; then
      read -r op of <"$WORK/$stream.counts"
    else
      echo "FAILED: the checks outside the Bazel build ($stream) ended without their counts" >&2
      op=0 of=1
    fi
    passed=$((passed + op))
    failed=$((failed + of))
  done
fi

echo "${passed} passed, ${failed} failed"
[[ $failed -eq 0 ]]
