#!/usr/bin/env bash
# slurm_local.sh: a real one-node SLURM on 127.0.0.1 (Debian's slurm-wlm, no systemd, no cgroups),
# so the launch scripts are tested against the scheduler they are written for. Needs root.
#
#   launch/slurm_local.sh up       install slurm-wlm (+ munge) if missing, write the config, start the
#                                  daemons, wait for the node to be idle, print `export SLURM_CONF=...`
#   launch/slurm_local.sh down     cancel all jobs, stop the daemons this script started (by pid)
#   launch/slurm_local.sh status
#
# Environment:
#   SLURM_ROOT    directory for config, state, logs and pids   (default /tmp/paced-slurm)
#   SLURM_AUTH    munge | none   (none: auth/none, for throwaway CI machines only)
#   SLURM_CPUS    CPUs the node advertises (default 8). May exceed the real count (config_overrides),
#                 so the rollout service job runs beside a training job on a 2-core machine.
#   SLURM_MEM_MB  memory the node advertises (default 85 % of MemTotal)
#   SLURM_CTLD_PORT, SLURMD_PORT   (default 6817, 6818)
set -euo pipefail

SLURM_ROOT=${SLURM_ROOT:-/tmp/paced-slurm}
SLURM_AUTH=${SLURM_AUTH:-munge}
SLURM_CPUS=${SLURM_CPUS:-8}
SLURM_MEM_MB=${SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)}
SLURM_CTLD_PORT=${SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
CONF=$SLURM_ROOT/etc/slurm.conf
RUN=$SLURM_ROOT/run
LOG=$SLURM_ROOT/log
NODE=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "[slurm_local] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=0 b
  for b in slurmctld slurmd sbatch srun scontrol; do command -v "$b" >/dev/null || missing=1; done
  if [ "$SLURM_AUTH" = munge ]; then command -v munged >/dev/null || missing=1; fi
  [ "$missing" = 0 ] && return 0
  [ "$(id -u)" = 0 ] || { log "slurm-wlm is missing and installing it needs root"; exit 1; }
  local added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep the postinst scripts from starting services
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed $(slurmctld -V)"
}

start_munge() {
  [ "$SLURM_AUTH" = munge ] || return 0
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged
  local _
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { log "munged did not come up"; exit 1; }
  cp /run/munge/munged.pid "$RUN/munged.pid"  # marks munged as ours, so `down` stops it
}

write_conf() {
  local auth=munge
  [ "$SLURM_AUTH" = none ] && auth=none
  cat >"$CONF" <<EOF
ClusterName=paced-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURM_CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
AuthType=auth/${auth}
CredType=cred/${auth}
StateSaveLocation=${SLURM_ROOT}/state/ctld
SlurmdSpoolDir=${SLURM_ROOT}/state/d
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG}/jobcomp.log
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${SLURM_CPUS} Sockets=1 CoresPerSocket=${SLURM_CPUS} ThreadsPerCore=1 RealMemory=${SLURM_MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  install_packages
  down quiet
  rm -rf "$SLURM_ROOT/state"  # a fresh start: no drained node or old jobs from an earlier run
  mkdir -p "$SLURM_ROOT"/etc "$SLURM_ROOT"/state/ctld "$SLURM_ROOT"/state/d "$RUN" "$LOG"
  write_conf
  start_munge
  /usr/sbin/slurmctld -f "$CONF"
  /usr/sbin/slurmd -f "$CONF"
  local state="" _
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.2
  done
  # Another cluster on the same ports would answer sinfo too: insist that ours are the daemons running.
  if ! alive "$RUN/slurmctld.pid" || ! alive "$RUN/slurmd.pid"; then
    log "slurmctld or slurmd did not stay up (ports $SLURM_CTLD_PORT/$SLURMD_PORT taken by another cluster?)"
    tail -n 5 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
    exit 1
  fi
  if [ "$state" != idle ]; then
    log "node $NODE is not idle (state '$state')"
    tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
    exit 1
  fi
  log "node $NODE idle with $SLURM_CPUS CPUs, auth $SLURM_AUTH"
  echo "export SLURM_CONF=$CONF"
}

down() {
  local quiet=${1:-} f pid _
  if alive "$RUN/slurmctld.pid"; then  # job steps outlive slurmd: cancel the jobs first
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for f in slurmd slurmctld munged; do
    [ -s "$RUN/$f.pid" ] || continue
    pid=$(cat "$RUN/$f.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
      [ -n "$quiet" ] || log "stopped $f (pid $pid)"
    fi
    rm -f "$RUN/$f.pid"
  done
}

status() {
  local f
  for f in slurmctld slurmd munged; do
    if alive "$RUN/$f.pid"; then echo "$f: running (pid $(cat "$RUN/$f.pid"))"; else echo "$f: not running"; fi
  done
  if alive "$RUN/slurmctld.pid"; then sinfo && squeue; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status   (see the header of this script)" >&2; exit 2 ;;
esac
