#!/usr/bin/env bash
# Installs what procpool needs (Debian packages) and runs the quickstart example.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install_deps.sh
exec bazel run //examples/quickstart:quickstart "$@"
