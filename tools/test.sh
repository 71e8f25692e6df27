#!/usr/bin/env bash
# The single "run every test" command of procpool:
#   0. installs the Debian packages it needs, if any is missing;
#   1. bazel test //... (keeps going past failures); extra arguments are passed to it,
#      e.g. `bash tools/test.sh --config=asan`;
#   2. builds and runs the separate consumer workspaces examples/consumer (one more check) and
#      examples/consumer_own_deps (procpool_deps(absl_repo=, capnp_repo=); one more check).
# The last line printed is exactly "N passed, M failed"; the exit status is non-zero if M > 0.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install_deps.sh

BAZEL="${BAZEL:-bazel}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
BEP="$WORK/bep.json"

passed=0
failed=0

# --- 1. Bazel tests --------------------------------------------------------------------------
echo "=== bazel test //... $*"
set +e
# Tests tagged "soak" are long; CI runs them on their own (pass --test_tag_filters=soak for them).
"$BAZEL" test //... --keep_going --test_output=errors --test_tag_filters=-soak \
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

# --- 2. Consumer workspace -------------------------------------------------------------------
if [[ "${SKIP_CONSUMER:-0}" == 1 ]]; then
  echo "${passed} passed, ${failed} failed"
  [[ $failed -eq 0 ]]
  exit
fi
echo "=== examples/consumer: bazel build //... && bazel run //:main"
if (cd examples/consumer && "$BAZEL" build //... </dev/null && "$BAZEL" run //:main </dev/null); then
  passed=$((passed + 1))
else
  echo "FAILED: examples/consumer" >&2
  failed=$((failed + 1))
fi
echo "=== examples/consumer_own_deps: procpool on the workspace's own Abseil and Cap'n Proto"
if (cd examples/consumer_own_deps && "$BAZEL" run //:main </dev/null); then
  passed=$((passed + 1))
else
  echo "FAILED: examples/consumer_own_deps" >&2
  failed=$((failed + 1))
fi

echo "${passed} passed, ${failed} failed"
[[ $failed -eq 0 ]]
