#!/usr/bin/env bash
# A single-node Slurm on this machine, from Debian's packages, for the tests and examples whose
# workers are launched by srun. Everything it writes lives in one private directory
# ($PROCPOOL_SLURM_DIR, default /run/procpool-slurm): its own munged (own key, own socket), the
# slurm.conf, the controller's state, the spool, logs and pidfiles. /etc/slurm, /etc/munge and any
# munged or Slurm already on the machine are left alone (private ports, private munge socket).
#
#   bash tools/slurm_local.sh up       installs what is missing, starts munged, slurmctld, slurmd;
#                                      returns once `srun -n 2 hostname` works (idempotent)
#   bash tools/slurm_local.sh down     cancels every job, stops the daemons it started, removes
#                                      its directory (idempotent)
#   bash tools/slurm_local.sh status   exit 0 when the daemons run and the node takes jobs
#   eval "$(bash tools/slurm_local.sh env)"
#                                      exports SLURM_CONF, which every Slurm command needs to
#                                      find this cluster (sinfo, srun, sbatch, salloc, scancel)
#
# Non-interactive (CI=true, no stdin); runs as root, or through `sudo -n` when not root. Every wait
# has a deadline; on failure it prints the daemons' log tails and exits non-zero.
#
# The cluster: one node named after `hostname -s` at 127.0.0.1, CPUs = nproc, one default
# partition "procpool" where jobs that pass --oversubscribe share CPUs (up to 16 jobs a CPU),
# ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, select/cons_tres with CR_CPU (memory is
# not a consumable resource: with Slurm's default CR_Core_Memory a job without --mem takes the
# whole node's memory and every other job queues behind it). Private ports 16817 (slurmctld) and
# 16818 (slurmd) keep it apart from a system Slurm; PROCPOOL_SLURM_{DIR,CTLD_PORT,SLURMD_PORT}
# override the defaults (pass the same values to `env`, `status` and `down`).
set -euo pipefail

DIR="${PROCPOOL_SLURM_DIR:-/run/procpool-slurm}"
CTLD_PORT="${PROCPOOL_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${PROCPOOL_SLURM_SLURMD_PORT:-16818}"
CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
PACKAGES=(slurmctld slurmd slurm-client munge)
# How long each wait may take, in seconds.
DAEMON_DEADLINE=30
SRUN_DEADLINE=60
STOP_DEADLINE=15

log() { echo "slurm_local: $*"; }
die() {
  echo "slurm_local: ERROR: $*" >&2
  show_logs >&2
  exit 1
}

show_logs() {
  local f
  for f in "$MUNGE_DIR/munged.log" "$DIR/slurmctld.log" "$DIR/slurmd.log"; do
    if [[ -s "$f" ]]; then
      echo "----- last lines of $f"
      tail -n 25 "$f"
    fi
  done
}

# --- timing -------------------------------------------------------------------------------------
STEP_NAME=""
STEP_START=""
UP_START="$EPOCHREALTIME"
step() {
  step_done
  STEP_NAME="$1"
  STEP_START="$EPOCHREALTIME"
}
step_done() {
  if [[ -n "$STEP_NAME" ]]; then
    log "$(printf '%-34s %6.2fs' "$STEP_NAME" "$(elapsed "$STEP_START")")"
    STEP_NAME=""
  fi
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

# Runs "$@" until it succeeds or `seconds` pass. Returns 1 on the deadline.
wait_for() {
  local seconds="$1"
  shift
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 0.2
  done
}

# --- processes ----------------------------------------------------------------------------------
# The command line of a daemon of ours: it names a file in $DIR.
DAEMON_CMDLINE="^(/usr/s?bin/)?(munged|slurmctld|slurmd)(-wlm)? .*${DIR//./\\.}/"
# A pid from a pidfile is ours only if the process still runs our command line (pids are reused,
# and a crashed run leaves its pidfiles behind).
pid_is_ours() {
  local pid="$1"
  [[ "$pid" =~ ^[0-9]+$ ]] &&
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qE -- "$DAEMON_CMDLINE"
}

# Pids of the daemons of this cluster, found by their command lines (they name $DIR), whether or
# not their pidfiles are still there.
our_daemons() {
  local p
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qE -- "$DAEMON_CMDLINE"; then
      echo "${p#/proc/}"
    fi
  done
}

# Pids of the slurmstepd processes our slurmd started (their environment names our SLURM_CONF) and
# of everything below them (the tasks of job steps).
our_steps() {
  local p stepds=()
  for p in /proc/[0-9]*; do
    if [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd* ]] &&
      tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF -- "SLURM_CONF=$CONF"; then
      stepds+=("${p#/proc/}")
    fi
  done
  [[ ${#stepds[@]} -gt 0 ]] || return 0
  # "pid ppid" of every process (the command name in /proc/PID/stat may hold spaces and parens).
  for p in /proc/[0-9]*/stat; do
    awk '{ sub(/^.*\) /, ""); split(FILENAME, f, "/"); print f[3], $2 }' "$p" 2>/dev/null
  done | awk -v roots="${stepds[*]}" '
    { parent[$1] = $2 }
    END {
      n = split(roots, r, " "); for (i = 1; i <= n; i++) mine[r[i]] = 1
      do {
        grew = 0
        for (c in parent) if (!(c in mine) && (parent[c] in mine)) { mine[c] = 1; grew = 1 }
      } while (grew)
      for (c in mine) print c
    }'
}

our_pids() { our_daemons; our_steps; }

daemon_pid() {  # name -> pid if that daemon of ours runs
  local pidfile
  case "$1" in
    munged) pidfile="$MUNGE_DIR/munged.pid" ;;
    *) pidfile="$DIR/$1.pid" ;;
  esac
  local pid
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if pid_is_ours "$pid"; then echo "$pid"; else return 1; fi
}

# Asks politely (SIGTERM), waits with a deadline, then SIGKILL, and waits for them to go. All pids
# at once: each Slurm daemon and munged takes about 2s to exit.
stop_pids() {
  local pids=("$@") pid
  [[ ${#pids[@]} -gt 0 ]] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for pid in "${pids[@]}"; do
    if ! wait_gone "$STOP_DEADLINE" "$pid"; then
      log "$(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid) ignored SIGTERM for" \
        "${STOP_DEADLINE}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone 5 "$pid" || log "pid $pid is still there after SIGKILL"
    fi
  done
}

# Waits until the pid is gone or a zombie (whoever reaps it is not us), at most `seconds`.
wait_gone() {
  local deadline=$((SECONDS + $1)) pid="$2" state
  while kill -0 "$pid" 2>/dev/null; do
    state="$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" == Z ]] && return 0
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

# --- pieces of `up` -----------------------------------------------------------------------------
install_packages() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] ||
      missing+=("$pkg")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi
  log "installing ${missing[*]}"
  # The packages' maintainer scripts try to start the daemons through invoke-rc.d; without systemd
  # (a container) that is denied or fails harmlessly, and we start our own copies below anyway.
  DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >/dev/null ||
    die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    </dev/null >"$DIR/apt.log" 2>&1 || {
    tail -n 30 "$DIR/apt.log" >&2
    die "apt-get install failed"
  }
  rm -f "$DIR/apt.log"
}

node_name() {
  local n
  n="$(hostname -s 2>/dev/null || true)"
  [[ -n "$n" ]] || n="$(uname -n)"
  echo "${n%%.*}"
}

write_conf() {  # writes the config to $1
  local out="$1" node cpus mem_mb
  node="$(node_name)"
  cpus="$(nproc)"
  # 90% of MemTotal: a node configured with more memory than slurmd finds is drained.
  mem_mb="$(awk '/^MemTotal:/ { m = int($2 / 1024 * 0.9); print (m > 0 ? m : 1) }' /proc/meminfo)"
  cat >"$out" <<EOF
# Written by procpool's tools/slurm_local.sh; rewritten on every \`up\`.
ClusterName=procpool
SlurmctldHost=${node}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCKET}
StateSaveLocation=${DIR}/ctld
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=${DIR}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# A node that was down comes back by itself once its slurmd registers.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or runs out of time (default 30).
KillWait=5
MailProg=/bin/true
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=procpool Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES:16
EOF
}

start_munged() {
  mkdir -p "$MUNGE_DIR"
  chown munge:munge "$MUNGE_DIR"
  # 0755: every user's Slurm commands must reach the socket; munged refuses a directory others can
  # write to.
  chmod 0755 "$MUNGE_DIR"
  if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key" ||
      die "could not create the munge key"
  fi
  chmod 0600 "$MUNGE_DIR/munge.key"
  # munged refuses a log file that is not its own.
  install -o munge -g munge -m 0640 /dev/null "$MUNGE_DIR/munged.log"
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$MUNGE_DIR/munged.log" 2>&1 ||
    die "munged did not start"
  wait_for "$DAEMON_DEADLINE" \
    bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'" ||
    die "munged does not answer on $MUNGE_SOCKET after ${DAEMON_DEADLINE}s"
}

start_slurmctld() {
  # -c: start with no jobs from an earlier run.
  slurmctld -f "$CONF" -c </dev/null >>"$DIR/slurmctld.log" 2>&1 || die "slurmctld did not start"
  wait_for "$DAEMON_DEADLINE" bash -c "scontrol ping | grep -q 'is UP'" ||
    die "slurmctld does not answer after ${DAEMON_DEADLINE}s"
}

node_state() { sinfo -h -N -n "$(node_name)" -o %T 2>/dev/null | head -n 1; }

start_slurmd() {
  slurmd -f "$CONF" -N "$(node_name)" </dev/null >>"$DIR/slurmd.log" 2>&1 ||
    die "slurmd did not start"
  wait_for "$DAEMON_DEADLINE" bash -c "[[ \"\$(sinfo -h -N -n '$(node_name)' -o %T)\" == idle ]]" ||
    die "node $(node_name) is not idle after ${DAEMON_DEADLINE}s (state: $(node_state))"
}

check_srun() {
  local want=2 extra=()
  # One CPU cannot hold two tasks unless the allocation is overcommitted.
  if (($(nproc) < 2)); then extra=(--overcommit); fi
  local out rc=0
  out="$(timeout -k 5 "$SRUN_DEADLINE" srun -n "$want" "${extra[@]}" hostname </dev/null \
    2>"$DIR/srun_check.err")" || rc=$?
  if [[ $rc -ne 0 || "$(grep -c . <<<"$out")" -ne $want ]]; then
    die "srun -n $want hostname exited $rc (124: ran past ${SRUN_DEADLINE}s) and printed:" \
      "$out $(cat "$DIR/srun_check.err")"
  fi
  rm -f "$DIR/srun_check.err"
}

healthy() {
  daemon_pid munged >/dev/null && daemon_pid slurmctld >/dev/null && daemon_pid slurmd >/dev/null &&
    [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]
}

# Stops everything of ours: jobs first (so their tasks are killed by slurmstepd), then slurmd,
# any slurmstepd left over, slurmctld, munged. Works with or without pidfiles.
stop_all() {
  # Cancelled jobs end only through a live slurmd: without one they stay "completing".
  if daemon_pid slurmctld >/dev/null && daemon_pid slurmd >/dev/null; then
    local jobs
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
      # shellcheck disable=SC2086  # one job id a word
      timeout 10 scancel $jobs 2>/dev/null || true
      # shellcheck disable=SC2016  # expanded by the inner bash
      wait_for "$STOP_DEADLINE" bash -c '[[ -z "$(squeue -h -o %A)" ]]' ||
        log "jobs still listed after ${STOP_DEADLINE}s: $(squeue -h 2>&1 | head -n 5)"
    fi
  fi
  # Steps whose slurmd is gone (slurmstepd ignores SIGTERM): their tasks and slurmstepd, quickly.
  # shellcheck disable=SC2046  # one pid a word
  STOP_DEADLINE=2 stop_pids $(our_steps)
  # The daemons, by pidfile and by command line (a crashed run's pidfiles may be gone).
  local name pids
  pids="$(for name in slurmd slurmctld munged; do daemon_pid "$name" || true; done; our_daemons)"
  # shellcheck disable=SC2046  # one pid a word
  stop_pids $(sort -u <<<"$pids")
}

# --- commands -----------------------------------------------------------------------------------
cmd_up() {
  export SLURM_CONF="$CONF"
  mkdir -p "$DIR"
  chmod 0755 "$DIR"
  step "packages"
  install_packages

  local new="$DIR/slurm.conf.new"
  write_conf "$new"
  if [[ -f "$CONF" ]] && cmp -s "$new" "$CONF" && healthy; then
    rm -f "$new"
    # The node busy with jobs of the caller's: a check would queue behind them.
    if [[ "$(node_state)" == idle ]]; then
      step "srun -n 2 hostname (already up)"
      check_srun
    fi
    step_done
    log "already up ($(elapsed "$UP_START")s); SLURM_CONF=$CONF"
    return 0
  fi

  step "stop what a previous run left"
  stop_all
  # A fresh cluster every time; the munge key survives, nothing else needs to.
  find "$DIR" -mindepth 1 -maxdepth 1 ! -name munge ! -name slurm.conf.new -exec rm -rf {} +
  rm -f "$MUNGE_DIR"/munged.{pid,log,seed} "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  mv "$new" "$CONF"
  : >"$DIR/plugstack.conf"
  mkdir -p "$DIR/ctld" "$DIR/spool"
  chmod 0755 "$DIR/ctld" "$DIR/spool"

  step "start munged"
  start_munged
  step "start slurmctld"
  start_slurmctld
  step "start slurmd, wait for node idle"
  start_slurmd
  step "srun -n 2 hostname"
  check_srun
  step_done
  log "up in $(elapsed "$UP_START")s: node $(node_name), $(nproc) CPUs, partition procpool;" \
    "SLURM_CONF=$CONF"
}

cmd_down() {
  export SLURM_CONF="$CONF"
  if [[ ! -d "$DIR" ]] && [[ -z "$(our_pids)" ]]; then
    log "already down"
    return 0
  fi
  step "stop jobs and daemons"
  stop_all
  local left
  left="$(our_pids)"
  if [[ -n "$left" ]]; then
    ps -o pid,comm,args -p "$(tr '\n' , <<<"$left" | sed 's/,$//')" >&2 || true
    die "processes of the cluster are still running: $(tr '\n' ' ' <<<"$left")"
  fi
  step "remove $DIR"
  rm -rf "$DIR"
  step_done
  log "down in $(elapsed "$UP_START")s"
}

cmd_status() {
  export SLURM_CONF="$CONF"
  local name pid ok=0
  for name in munged slurmctld slurmd; do
    if pid="$(daemon_pid "$name")"; then
      log "$name running (pid $pid)"
    else
      log "$name not running"
      ok=1
    fi
  done
  if [[ $ok -eq 0 ]]; then
    local state
    state="$(node_state)"
    log "node $(node_name): ${state:-unknown}"
    [[ "$state" =~ ^(idle|mixed|allocated)$ ]] || ok=1
  fi
  return $ok
}

cmd="${1:-}"
case "$cmd" in
  up | down)
    if [[ "$(id -u)" -ne 0 ]]; then
      if ! command -v sudo >/dev/null 2>&1; then
        echo "slurm_local: $cmd needs root or sudo" >&2
        exit 1
      fi
      exec sudo -n env PROCPOOL_SLURM_DIR="$DIR" PROCPOOL_SLURM_CTLD_PORT="$CTLD_PORT" \
        PROCPOOL_SLURM_SLURMD_PORT="$SLURMD_PORT" bash "${BASH_SOURCE[0]}" "$cmd" </dev/null
    fi
    "cmd_$cmd"
    ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF='$CONF'" ;;
  *)
    echo "usage: bash tools/slurm_local.sh up|down|status|env" >&2
    exit 2
    ;;
esac
