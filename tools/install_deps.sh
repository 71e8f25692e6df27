#!/usr/bin/env bash
# Installs the Debian packages procpool builds with, if any is missing (quick when all are present).
# Non-interactive; uses sudo only when not root. Usage: bash tools/install_deps.sh
set -euo pipefail

PACKAGES=(bazel-bootstrap libabsl-dev libcapnp-dev capnproto doctest-dev g++ python3 clang libclang-rt-14-dev libssl-dev
  ccache cmake pkg-config prometheus iproute2)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install_deps: all packages present (${PACKAGES[*]})"
  exit 0
fi

echo "install_deps: installing ${missing[*]}"
SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_deps: not root and no sudo; install these packages: ${missing[*]}" >&2
    exit 1
  fi
  SUDO=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  "${missing[@]}" </dev/null
