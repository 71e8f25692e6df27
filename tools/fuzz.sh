#!/usr/bin/env bash
# Builds the fuzz targets with clang (libFuzzer + ASan + UBSan) and runs each for a bounded time:
#   bash tools/fuzz.sh [seconds per target, default 60]
# - frame_decoder: whatever bytes a worker writes, the pool's frame decoding ends in a status;
# - remote_host:   whatever a peer dialling a remote pool sends, the pool's handshake, its
#                  reading of a worker host's frames and of a worker's data connection end in a
#                  refusal, a closed connection or a failed task; and whatever TLS records reach a
#                  pool whose connections are TLS, a failed handshake or a broken connection;
# - scheduler:     whatever frames a worker sends (read by the pool's own path, supervision then
#                  the scheduler, over fake links: no process), every call ends, each task with
#                  exactly one outcome;
# - crash_stack:   whatever a dead worker left in its page's crash stack, and whatever ELF file
#                  it names there, reading the stack ends in printable text;
# - metrics_request: whatever bytes a client of the metrics endpoint sends, in whatever pieces,
#                  the server keeps at most its limit and answers one well-formed HTTP response.
# Exits non-zero if any finds a crash, leak or UB. Outside Bazel on purpose: the Bazel build
# uses GCC, and libFuzzer is clang's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_TO_RUN="${1:-60}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# The generated header goes where the sources include it from: procpool/internal/.
mkdir -p "$OUT/gen/procpool/internal" "$OUT/corpus-frame_decoder" "$OUT/corpus-remote_host" \
  "$OUT/corpus-scheduler" "$OUT/corpus-crash_stack" "$OUT/corpus-metrics_request"
capnp compile -I/usr/include -oc++:"$OUT/gen/procpool/internal" --src-prefix="$ROOT/lib/wire" \
  "$ROOT/lib/wire/protocol.capnp"
FLAGS=(-std=c++20 -O1 -g -I"$ROOT" -I"$ROOT/include" -I"$OUT/gen")
# What the library links, as CMakeLists.txt's PROCPOOL_ABSL_COMPONENTS name it, through the
# system's pkg-config files (not a hand-kept list of archives).
mapfile -t LIBS < <(pkg-config --libs absl_base absl_status absl_statusor absl_strings \
  absl_str_format absl_synchronization absl_time absl_span absl_flat_hash_map absl_symbolize \
  capnp openssl | tr ' ' '\n' | grep -v '^$')
SANITIZE=(-fsanitize=address,undefined -fno-sanitize-recover=all)

# The library below the pool (every layer but pool_core and progress_bar, as CMakeLists.txt and
# lib/BUILD.bazel place the files), and of pool_core the metrics endpoint's server, each file
# compiled once, instrumented for the fuzzers, into one archive: each program links what it uses of
# it. Found in the tree, not listed here, so a file a fuzzed path comes to need is there without
# anyone adding it.
mapfile -t LIB_SOURCES < <(find lib/common lib/wire lib/worker lib/link lib/scheduler \
  lib/supervision -name '*.cc' | sort; echo lib/worker_registry.cc; echo lib/metrics_server.cc;
  echo "$OUT/gen/procpool/internal/protocol.capnp.c++")
echo "=== building the fuzzers (clang, libFuzzer, ASan, UBSan): ${#LIB_SOURCES[@]} library files"
mkdir -p "$OUT/obj"
compile_one() {
  local object="$OUT/obj/$(echo "$1" | tr '/' '_').o"
  clang++ "${FLAGS[@]}" "${SANITIZE[@]}" -fsanitize=fuzzer-no-link -c "$1" -o "$object"
}
running=0
for source in "${LIB_SOURCES[@]}"; do
  compile_one "$source" &
  running=$((running + 1))
  if [[ $running -ge $(nproc) ]]; then wait -n; running=$((running - 1)); fi
done
wait
ar rcs "$OUT/libfuzzed.a" "$OUT"/obj/*.o

# The seed writer: the frame decoder's fuzzer with a main of its own (no libFuzzer).
clang++ "${FLAGS[@]}" "${SANITIZE[@]}" -DPROCPOOL_FUZZ_SEEDS tests/fuzz/frame_decoder_fuzzer.cc \
  "$OUT/libfuzzed.a" "${LIBS[@]}" -o "$OUT/seeds"
"$OUT/seeds" "$OUT/corpus-frame_decoder"
for target in frame_decoder remote_host scheduler crash_stack metrics_request; do
  clang++ "${FLAGS[@]}" "${SANITIZE[@]}" -fsanitize=fuzzer "tests/fuzz/${target}_fuzzer.cc" \
    "$OUT/libfuzzed.a" "${LIBS[@]}" -o "$OUT/$target"
done
# Seeds for the scheduler: scripts of (step, worker, ...) bytes (see the fuzzer's comment).
printf '' >"$OUT/corpus-scheduler/empty"
printf '\x00\x00\x01\x00\x02\x00\x00\x00\x01\x00\x02\x00\x06\x00' >"$OUT/corpus-scheduler/honest"
printf '\x00\x00\x00\x01\x05\x00\x40\x06\x00\x05\x00\xff\x06\x00' >"$OUT/corpus-scheduler/stall"
printf '\x00\x00\x01\x00\x00\x00\x04\x00\x00\x10\x00\x01\x06\x00' >"$OUT/corpus-scheduler/flipped"
printf '\x00\x01\x01\x01\x07\x01\x01\x06\x00\x08\x00\x01' >"$OUT/corpus-scheduler/death"
# Seeds for the remote host: the first byte picks the handshake (0), a connected host (1) or a
# worker's data connection after its attach frame (2), in plaintext; with bit 2 (4), TLS records
# to a pool keyed by its token (a ClientHello's record header, then an application-data record).
printf '\x00' >"$OUT/corpus-remote_host/handshake"
printf '\x04\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03' >"$OUT/corpus-remote_host/tls-hello"
printf '\x04\x17\x03\x03\x00\x11\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10' \
  >"$OUT/corpus-remote_host/tls-record"
# Seeds for the crash stack: a page as a worker writes it, naming this fuzzer's own binary (mode
# 0), and a real ELF file's first 4 KiB (mode 1).
printf '\x00\xff\xff@0 /proc/self/exe\n@1 /no/such/file\n#0 0x1 0+0x2000\n#1 0x2 ?\n#2 0x3 1+0x10\n' \
  >"$OUT/corpus-crash_stack/page"
{ printf '\x01'; head -c 4096 /bin/true; } >"$OUT/corpus-crash_stack/elf"
# Seeds for the metrics endpoint: a byte for the head's limit (0: 8 KiB; n: 8n bytes), a byte for
# how many piece sizes follow, the sizes (each + 1) the client's bytes are cut into, those bytes.
printf '\x00\x00GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n' >"$OUT/corpus-metrics_request/get"
printf '\x00\x00HEAD /metrics HTTP/1.1\r\n\r\n' >"$OUT/corpus-metrics_request/head"
printf '\x00\x00GET http://127.0.0.1:9464/metrics HTTP/1.1\r\n\r\n' \
  >"$OUT/corpus-metrics_request/absolute"
printf '\x00\x03\x00\x04\x01GET /metrics?name[]=x HTTP/1.0\n\n' \
  >"$OUT/corpus-metrics_request/query-pieces"
printf '\x00\x00POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n' \
  >"$OUT/corpus-metrics_request/post"
printf '\x00\x00\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n' \
  >"$OUT/corpus-metrics_request/garbage"
printf '\x04\x01\x07HEAD /metrics HTTP/1.1\r\nCookie: aaaaaaaaaaaaaaaaaaaaaaaa' \
  >"$OUT/corpus-metrics_request/too-large"
cp "$OUT"/corpus-frame_decoder/* "$OUT/corpus-remote_host/" 2>/dev/null || true
for seed in "$OUT"/corpus-frame_decoder/*; do
  { printf '\x01'; cat "$seed"; } >"$OUT/corpus-remote_host/connected-$(basename "$seed")"
  { printf '\x02'; cat "$seed"; } >"$OUT/corpus-remote_host/data-$(basename "$seed")"
done

failed=0
for target in frame_decoder remote_host scheduler crash_stack metrics_request; do
  echo "=== fuzzing ${target} for ${SECONDS_TO_RUN}s"
  set +e
  "$OUT/$target" -max_total_time="$SECONDS_TO_RUN" -max_len=4096 -rss_limit_mb=2048 \
    -artifact_prefix="$OUT/$target-" -print_final_stats=1 "$OUT/corpus-$target" >"$OUT/log" 2>&1
  status=$?
  set -e
  grep -E "^#[0-9]+ +DONE|stat::(number_of_executed_units|average_exec_per_sec|new_units_added)" \
    "$OUT/log" || true
  if [[ $status -ne 0 ]]; then
    tail -60 "$OUT/log"
    for artifact in "$OUT/$target"-crash-* "$OUT/$target"-leak-* "$OUT/$target"-timeout-* \
                    "$OUT/$target"-oom-*; do
      [[ -e "$artifact" ]] && { echo "--- $artifact (base64)"; base64 "$artifact"; }
    done
    echo "fuzz: ${target} FAILED (libFuzzer exit status $status)"
    failed=1
  fi
done
if [[ $failed -ne 0 ]]; then
  echo "fuzz: FAILED"
  exit 1
fi
echo "fuzz: no finding in ${SECONDS_TO_RUN}s per target"
