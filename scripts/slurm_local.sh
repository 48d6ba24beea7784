#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing the workflow's SLURM profile.
#
#   scripts/slurm_local.sh up     STATE_DIR   install (if missing), configure, start, wait until idle
#   scripts/slurm_local.sh status STATE_DIR   daemons, node state, queue
#   scripts/slurm_local.sh down   STATE_DIR   stop every daemon that `up` started, by PID
#
# Needs root on Debian (apt-get). No systemd: the daemons are started by hand, as on a container.
# What it sets up (tested with SLURM 22.05 / munge 0.5.15 on Debian 12):
#   - slurm.conf without accounting (no slurmdbd): jobs are followed with squeue, so the
#     Snakemake profile needs `slurm-status-command: squeue`; MinJobAge=300 >= 3 x the plugin's
#     initial status wait;
#   - fake GPUs: gres.conf `Name=gpu File=/dev/null` (one per line; SLURM only needs a device
#     file to count), so `sbatch --gpus=1` runs and sets CUDA_VISIBLE_DEVICES; no CUDA is involved;
#   - /etc/slurm/slurm.conf and gres.conf are symlinks into STATE_DIR: Debian's SLURM reads that
#     path, and the executor plugin's job step strips SLURM_CONF from its srun environment.
# Every wait has a timeout. `down` stops only processes whose PIDs `up` recorded in STATE_DIR
# (and checks each PID still runs the expected program); it removes the /etc/slurm symlinks only
# if they point into STATE_DIR. A munged that was already running is used and left running.
#
# Environment: SLURM_LOCAL_GPUS (fake GPUs, 1-4, default 1), SLURM_LOCAL_TIMEOUT (seconds to wait
# for the node to become idle, default 60), SLURM_LOCAL_APT_TIMEOUT (apt-get, default 300).
# Exit codes: 0 ok, 1 failure, 2 usage / not root / not Debian, 3 packages could not be installed,
# 4 another SLURM controller or a real /etc/slurm config is in the way.
set -euo pipefail

usage() {
    sed -n '2,6p' "$0" >&2
    exit 2
}

[[ $# -eq 2 ]] || usage
ACTION=$1
mkdir -p "$2"
STATE=$(cd "$2" && pwd)
GPUS=${SLURM_LOCAL_GPUS:-1}
IDLE_TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
APT_TIMEOUT=${SLURM_LOCAL_APT_TIMEOUT:-300}
ETC=/etc/slurm
FAKE_DEVICES=(/dev/null /dev/zero /dev/full /dev/urandom)

log() { printf '[slurm_local] %s\n' "$*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# PID recorded in STATE/NAME.pid if that process is alive and runs program NAME.
pid_of() {
    local name=$1 pidfile="$STATE/$1.pid" pid
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$name" ]] || return 1
    echo "$pid"
}

# PIDs of live (not zombie) processes running any of the given programs.
live_pids() {
    local name pid
    for name in "$@"; do
        for pid in $(pgrep -x "$name" || true); do
            [[ $(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) == Z ]] || printf '%s ' "$pid"
        done
    done
}

started() { [[ -f $STATE/started ]] && grep -qx "$1" "$STATE/started"; }

require_root_debian() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)" 2
    [[ -f /etc/debian_version ]] && command -v apt-get >/dev/null ||
        die "needs Debian with apt-get" 2
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    local t0 pkgs=(slurm-wlm munge slurm-client)
    t0=$(now)
    export DEBIAN_FRONTEND=noninteractive
    log "installing ${pkgs[*]} ..."
    if ! timeout "$APT_TIMEOUT" apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$STATE/log/apt.log" 2>&1; then
        log "apt-get install failed; apt-get update and retry"
        timeout "$APT_TIMEOUT" apt-get update -q >>"$STATE/log/apt.log" 2>&1 ||
            die "apt-get update failed (see $STATE/log/apt.log)" 3
        timeout "$APT_TIMEOUT" apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$STATE/log/apt.log" 2>&1 ||
            die "apt-get install ${pkgs[*]} failed (see $STATE/log/apt.log)" 3
    fi
    log "installed in $(elapsed "$t0") s"
}

write_config() {
    local node cpus mem_kb mem_mb gpus_line i
    node=$(hostname -s)
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
    mem_mb=$((mem_kb / 1024 - 2048))
    ((mem_mb >= 500)) || mem_mb=500
    [[ $GPUS =~ ^[0-4]$ ]] || die "SLURM_LOCAL_GPUS must be 0..4, got '$GPUS'" 2
    gpus_line=""
    ((GPUS > 0)) && gpus_line=" Gres=gpu:$GPUS"
    cat >"$STATE/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh: a single-node test cluster without accounting.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MinJobAge=300
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName=$node CPUs=$cpus RealMemory=$mem_mb$gpus_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$STATE/gres.conf"
    for ((i = 0; i < GPUS; i++)); do
        echo "NodeName=$node Name=gpu File=${FAKE_DEVICES[$i]}" >>"$STATE/gres.conf"
    done
}

link_config() {
    mkdir -p "$ETC"
    local f target
    for f in slurm.conf gres.conf; do
        if [[ -e $ETC/$f || -L $ETC/$f ]]; then
            if [[ ! -L $ETC/$f ]]; then
                die "$ETC/$f is a real file (a configured SLURM?); not replacing it" 4
            fi
            target=$(readlink "$ETC/$f")
            if [[ $target != "$STATE/$f" && -e $target ]]; then
                die "$ETC/$f points to $target (another local cluster?); run its 'down' first" 4
            fi
        fi
        ln -sfn "$STATE/$f" "$ETC/$f"
    done
}

unlink_config() {
    local f
    for f in slurm.conf gres.conf; do
        if [[ -L $ETC/$f && $(readlink "$ETC/$f") == "$STATE/$f" ]]; then
            rm -f "$ETC/$f"
        fi
    done
}

start_munge() {
    if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        log "munged already running; using it (and leaving it running)"
        return 0
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        timeout 30 runuser -u munge -- mungekey --create >/dev/null 2>&1 ||
            die "no /etc/munge/munge.key and mungekey failed"
    fi
    timeout 10 runuser -u munge -- munged --pid-file=/run/munge/munged.pid >/dev/null 2>&1 ||
        die "munged did not start (see /var/log/munge/munged.log)"
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s /run/munge/munged.pid ]] && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$STATE/munged.pid"
    pid_of munged >/dev/null || die "munged pid file does not name a running munged"
    echo munged >>"$STATE/started"
    timeout 5 munge -n | timeout 5 unmunge >/dev/null || die "munge credential round trip failed"
}

start_daemon() {
    local name=$1
    timeout 30 "$name" >>"$STATE/log/$name.start.log" 2>&1 ||
        die "$name did not start (see $STATE/log/$name.log, $STATE/log/$name.start.log)"
    local i
    for ((i = 0; i < 100; i++)); do
        pid_of "$name" >/dev/null && break
        sleep 0.1
    done
    pid_of "$name" >/dev/null || die "$name wrote no pid file $STATE/$name.pid"
    echo "$name" >>"$STATE/started"
}

wait_idle() {
    local deadline state reason
    deadline=$(($(date +%s) + IDLE_TIMEOUT))
    while :; do
        state=$(timeout 10 sinfo -h -N -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle ]] && return 0
        if (($(date +%s) >= deadline)); then
            reason=$(timeout 10 sinfo -h -N -o '%T %E' 2>/dev/null || true)
            die "node not idle after ${IDLE_TIMEOUT}s: '${reason:-no answer from slurmctld}' (logs in $STATE/log)"
        fi
        sleep 0.2
    done
}

up() {
    require_root_debian
    local t0 t1
    t0=$(now)
    if pid_of slurmctld >/dev/null; then
        log "already up (slurmctld pid $(pid_of slurmctld))"
        wait_idle
        return 0
    fi
    local others
    others=$(live_pids slurmctld slurmd)
    if [[ -n $others ]]; then
        die "a slurmctld/slurmd not started from $STATE is running (pids: $others)" 4
    fi
    mkdir -p "$STATE/state" "$STATE/spool" "$STATE/log"
    : >"$STATE/started"
    trap 'rc=$?; if ((rc != 0)); then log "bring-up failed; stopping what was started"; down_quiet; fi' EXIT
    install_packages
    write_config
    link_config
    t1=$(now)
    start_munge
    log "munge $(elapsed "$t1") s"
    t1=$(now)
    start_daemon slurmctld
    start_daemon slurmd
    wait_idle
    trap - EXIT
    log "slurmctld+slurmd to idle $(elapsed "$t1") s; total $(elapsed "$t0") s"
    log "node: $(sinfo -h -N -o '%N %T cpus=%c mem=%m gres=%G')"
}

stop_one() {
    local name=$1 pid i
    started "$name" || return 0
    if pid=$(pid_of "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            log "$name (pid $pid) ignored SIGTERM for 15 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [[ -d /proc/$pid ]] || break
                sleep 0.1
            done
        fi
        log "stopped $name (pid $pid)"
    fi
    sed -i "/^$name\$/d" "$STATE/started"
}

cancel_jobs() {
    # Jobs of this private cluster (ours by construction): cancel them so that their processes
    # (slurmstepd and the job's children) end before the daemons go.
    started slurmctld && pid_of slurmctld >/dev/null || return 0
    local ids i
    ids=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
    [[ -n ${ids// /} ]] || return 0
    log "cancelling jobs $ids"
    # shellcheck disable=SC2086
    timeout 10 scancel $ids 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do
        [[ -z $(timeout 10 squeue -h -t running,completing -o %i 2>/dev/null || true) ]] && break
        sleep 0.2
    done
}

down_quiet() {
    # Order: jobs, node daemon, controller, then munge (the others authenticate through it).
    cancel_jobs
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
    unlink_config
}

down() {
    [[ -d $STATE ]] || return 0
    down_quiet
}

status() {
    local name pid
    for name in munged slurmctld slurmd; do
        if pid=$(pid_of "$name"); then
            echo "$name: running, pid $pid$(started "$name" && echo ', started by up' || true)"
        else
            echo "$name: not running from $STATE"
        fi
    done
    if pid_of slurmctld >/dev/null; then
        timeout 10 sinfo -N -o '%N %T %c %m %G %E' || true
        timeout 10 squeue --states=all -o '%i %T %j %k %b' || true
    fi
}

case $ACTION in
up) up ;;
down) down ;;
status) status ;;
*) usage ;;
esac
