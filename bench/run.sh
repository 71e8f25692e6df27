#!/usr/bin/env bash
# procpool's benchmarks, side by side with Python's Pool and the physical floors (issues 5, 10):
#
#   bash bench/run.sh            # see README for how long it takes
#   bash bench/run.sh --quick    # fewer repetitions; --only=apply,map_auto,... runs a subset
#   bash bench/run.sh --check    # exit 1 if a target is missed
#
# Builds the C++ benchmarks with `bazel build -c opt //bench/...` (and with --config=static for
# one row), runs them and Python 3's multiprocessing.Pool and concurrent.futures.ProcessPool-
# Executor on the same workloads, repetitions alternating, prints one table (medians with
# min–max, ratios, targets, load average) and writes it to bench/RESULTS.md. Exits 0 when the
# benchmarks ran (the table names missed targets, with why), 2 when one failed or left a row
# without a figure; with --check, 1 when a target is missed. Needs: bazel, g++, python3,
# libssl-dev (SHA-512 for the CPU-bound benchmark).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python3 bench/run.py "$@"
