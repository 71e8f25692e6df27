#!/usr/bin/env bash
# Clang's thread-safety analysis over lib/: members marked ABSL_GUARDED_BY(mu_) are only touched
# with mu_ held, and helpers marked ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) only called so
# (lib/common/mutex.h). The Bazel build uses GCC, which has no such analysis; this runs clang in
# syntax-only mode over every lib/ source. Ends with "N passed, N failed" (one check).
#   bash tools/thread_safety.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
mkdir -p "$OUT/gen/procpool/internal"
capnp compile -I/usr/include -oc++:"$OUT/gen/procpool/internal" --src-prefix="$ROOT/lib/wire" \
  "$ROOT/lib/wire/protocol.capnp"
failed=0
checked=0
while IFS= read -r source; do
  checked=$((checked + 1))
  if ! clang++ -std=c++20 -fsyntax-only -Wthread-safety -Werror=thread-safety \
      -Wno-unknown-warning-option -I"$ROOT" -I"$ROOT/include" -I"$OUT/gen" "$source" \
      2>"$OUT/log"; then
    echo "thread_safety: $source"
    cat "$OUT/log"
    failed=1
  fi
done < <(find lib -name '*.cc' | sort)
if [[ $failed -eq 0 ]]; then
  echo "thread_safety: $checked sources, no finding"
  echo "1 passed, 0 failed"
else
  echo "0 passed, 1 failed"
  exit 1
fi
