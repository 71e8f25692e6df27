#!/usr/bin/env bash
# A procpool pool whose workers are the ranks of an `mpirun` job: the parent listens, and mpirun
# starts N copies of the same program that dial it (no MPI_Init: mpirun is only the launcher).
#
#   bash run_pool_mpirun.sh ./slurm_pool_example 4 [mpirun options...]
#
# The frames go over procpool's own TCP connections, not MPI messages: if one rank dies, mpirun
# tears the whole job down (Open MPI sends SIGTERM to the other ranks; MPICH kills them), and with
# MPI messages the parent would be left waiting without an error. Here the parent sees each
# connection close and fails only the tasks those workers ran (kAborted), and its calls return.
# With Open MPI as root add --allow-run-as-root, and --oversubscribe for more ranks than cores.
set -euo pipefail
program="$1"
workers="${2:-4}"
shift 2 || true

# The token reaches the ranks through their environment (-x), never their command line.
PROCPOOL_TOKEN="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
export PROCPOOL_TOKEN
addr_file="$(mktemp)"
trap 'rm -f "$addr_file"' EXIT

"$program" --workers="$workers" --listen="$(hostname):0" --address-file="$addr_file" &
parent=$!
for _ in $(seq 600); do
  [[ -s "$addr_file" ]] && break
  kill -0 "$parent" 2>/dev/null || break
  sleep 0.1
done
[[ -s "$addr_file" ]] || { echo "run_pool_mpirun: the parent did not listen" >&2; exit 1; }

mpirun -np "$workers" -x PROCPOOL_TOKEN "$@" \
  "$program" --procpool-connect="$(cat "$addr_file")" &
ranks=$!
rc=0
wait "$parent" || rc=$?
# The parent closed every connection: each rank's serve() returned, so mpirun ends by itself.
wait "$ranks" || true
exit "$rc"
