#!/usr/bin/env bash
# procpool's benchmarks, side by side with Python's Pool and the physical floors (issue 5):
#
#   bash bench/run.sh            # about 3-5 minutes on 2 cores
#   bash bench/run.sh --quick    # fewer repetitions; --only=apply,map_auto,... runs a subset
#
# Builds the C++ benchmarks with `bazel build -c opt //bench/...`, runs them and Python 3's
# multiprocessing.Pool and concurrent.futures.ProcessPoolExecutor on the same workloads in the
# same run, prints one table (medians with min–max, ratios, targets) and writes it to
# bench/RESULTS.md with the core count and date. Exits non-zero, naming each, if a target is
# missed. Needs: bazel, g++, python3, libssl-dev (SHA-512 for the CPU-bound benchmark).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python3 bench/run.py "$@"
