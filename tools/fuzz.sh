#!/usr/bin/env bash
# Builds the frame-decoder fuzzer with clang (libFuzzer + ASan + UBSan) and runs it for a bounded
# time: bash tools/fuzz.sh [seconds, default 60]. Exits non-zero if it finds a crash, leak or UB.
# Outside Bazel on purpose: the Bazel build uses GCC, and libFuzzer is clang's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_TO_RUN="${1:-60}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# The generated header goes where the sources include it from: procpool/internal/.
mkdir -p "$OUT/gen/procpool/internal" "$OUT/corpus"
capnp compile -I/usr/include -oc++:"$OUT/gen/procpool/internal" --src-prefix="$ROOT/lib/wire" \
  "$ROOT/lib/wire/protocol.capnp"
SOURCES=(lib/wire/frame_io.cc lib/wire/shared_region.cc lib/wire/wire_status.cc lib/common/unique_fd.cc
         "$OUT/gen/procpool/internal/protocol.capnp.c++")
FLAGS=(-std=c++20 -O1 -g -I"$ROOT" -I"$ROOT/include" -I"$OUT/gen")
LIBS=(-lcapnp -lkj -labsl_status -labsl_statusor -labsl_strings -labsl_strings_internal
      -labsl_str_format_internal -labsl_int128 -labsl_cord -labsl_cord_internal -labsl_cordz_info
      -labsl_cordz_functions -labsl_cordz_handle -labsl_raw_logging_internal -labsl_throw_delegate
      -labsl_synchronization -labsl_time -labsl_time_zone -labsl_base -labsl_spinlock_wait)

echo "=== building the fuzzer (clang, libFuzzer, ASan, UBSan)"
clang++ "${FLAGS[@]}" -DPROCPOOL_FUZZ_SEEDS tests/fuzz/frame_decoder_fuzzer.cc "${SOURCES[@]}" \
  "${LIBS[@]}" -o "$OUT/seeds"
"$OUT/seeds" "$OUT/corpus"
clang++ "${FLAGS[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  tests/fuzz/frame_decoder_fuzzer.cc "${SOURCES[@]}" "${LIBS[@]}" -o "$OUT/fuzzer"

echo "=== fuzzing the frame decoder for ${SECONDS_TO_RUN}s"
set +e
"$OUT/fuzzer" -max_total_time="$SECONDS_TO_RUN" -max_len=4096 -rss_limit_mb=2048 \
  -artifact_prefix="$OUT/" -print_final_stats=1 "$OUT/corpus" >"$OUT/log" 2>&1
status=$?
set -e
grep -E "^#[0-9]+ +DONE|stat::(number_of_executed_units|average_exec_per_sec|new_units_added)" "$OUT/log" || true
if [[ $status -ne 0 ]]; then
  tail -60 "$OUT/log"
  for artifact in "$OUT"/crash-* "$OUT"/leak-* "$OUT"/timeout-* "$OUT"/oom-*; do
    [[ -e "$artifact" ]] && { echo "--- $artifact (base64)"; base64 "$artifact"; }
  done
  echo "fuzz: FAILED (libFuzzer exit status $status)"
  exit 1
fi
echo "fuzz: no finding in ${SECONDS_TO_RUN}s"
