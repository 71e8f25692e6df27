#!/usr/bin/env bash
# Generates procpool's reference with Doxygen (HTML into build/docs/html; open index.html) and
# fails on any Doxygen warning: every public type, function, field and enumerator of the headers
# in include/procpool/ must be documented with `///` comments (include/procpool/internal/ is
# excluded: implementation). Also checks that docs/guide.md, the reference's main page, lists the
# option structs' fields in the headers' order with their defaults and copies the README's error
# table exactly (tools/check_docs.py).
#   bash tools/docs.sh
# Installs doxygen (Debian's package) if it is missing: non-interactive, through sudo -n when not
# root. The last line printed is "N passed, N failed" (one check); the exit status is non-zero on
# any warning or mismatch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v doxygen >/dev/null 2>&1; then
  echo "docs: installing doxygen"
  SUDO=()
  if [[ "$(id -u)" -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "docs: not root and no sudo; install doxygen" >&2
      echo "0 passed, 1 failed"
      exit 1
    fi
    SUDO=(sudo -n)
  fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q doxygen </dev/null
fi

ok=1
echo "=== docs/guide.md against the headers and the README"
if ! python3 tools/check_docs.py --self-test || ! python3 tools/check_docs.py; then
  ok=0
fi

# The version shown on every page (Doxyfile's PROJECT_NUMBER), from version.h.
PROCPOOL_VERSION="$(sed -nE 's/^#define PROCPOOL_VERSION_(MAJOR|MINOR|PATCH) +([0-9]+)$/\2/p' \
  include/procpool/version.h | paste -sd.)"
export PROCPOOL_VERSION
echo "=== doxygen $(doxygen --version): procpool ${PROCPOOL_VERSION} into build/docs/html"
rm -rf build/docs
mkdir -p build/docs
start=$(date +%s.%N)
set +e
doxygen Doxyfile </dev/null
doxygen_rc=$?
set -e
elapsed=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $start))")
# Doxyfile: WARN_AS_ERROR = FAIL_ON_WARNINGS (a non-zero exit) and WARN_LOGFILE; check both.
if [[ $doxygen_rc -ne 0 || -s build/docs/warnings.log ]]; then
  # On stdout, like the rest, so that the warnings come before the count in any log.
  echo "FAILED: doxygen (exit status ${doxygen_rc}) warned:"
  sed "s|^$ROOT/||" build/docs/warnings.log
  ok=0
else
  echo "doxygen: no warnings, ${elapsed}s; open build/docs/html/index.html"
fi

if [[ $ok -eq 1 ]]; then
  echo "1 passed, 0 failed"
else
  echo "0 passed, 1 failed"
  exit 1
fi
