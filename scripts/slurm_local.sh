#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for testing the sweep launcher for real.
#   scripts/slurm_local.sh start [DIR]   install (apt) and start munged, slurmctld, slurmd
#   scripts/slurm_local.sh stop [DIR]    stop them
# Needs root and apt-get. Clients then need SLURM_CONF=DIR/slurm.conf and DIR/bin on PATH
# (a `sacct` stand-in answering from squeue: there is no accounting database).
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:-/tmp/q8-slurm}

stop() {
  for f in slurmd slurmctld munged; do
    if [ -f "$dir/run/$f.pid" ]; then kill "$(cat "$dir/run/$f.pid")" 2>/dev/null || true; rm -f "$dir/run/$f.pid"; fi
  done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "slurm_local: needs root" >&2; exit 2; }
command -v slurmctld >/dev/null && command -v munged >/dev/null || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }
}
stop
mkdir -p "$dir"/{run,log,spool/ctld,spool/d,bin,munge/key}
chmod 0755 "$dir" "$dir/run"        # munged refuses a socket inside a 0700 folder
chmod 0700 "$dir/munge/key"
[ -f "$dir/munge/key/munge.key" ] || { dd if=/dev/urandom of="$dir/munge/key/munge.key" bs=1024 count=1 status=none; chmod 0400 "$dir/munge/key/munge.key"; }
sock="$dir/run/munge.socket"
timeout 20 munged --force --key-file="$dir/munge/key/munge.key" --socket="$sock" \
  --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=q8local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${Q8_SLURM_PORT:-16817}
SlurmdPort=$(( ${Q8_SLURM_PORT:-16817} + 1 ))
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MinJobAge=3600
ReturnToService=2
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

# sacct without an accounting database: answer from squeue (MinJobAge keeps finished jobs).
cat > "$dir/bin/sacct" <<'SACCT'
#!/usr/bin/env bash
ids=""
while [ $# -gt 0 ]; do case $1 in -j) ids=$2; shift 2;; -j*) ids=${1#-j}; shift;; *) shift;; esac; done
echo "JobID|State|NodeList"
squeue -h -t all ${ids:+-j "$ids"} -o "%i|%T|%N" 2>/dev/null | sed 's/|$/|None/'
SACCT
chmod +x "$dir/bin/sacct"

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if timeout 5 sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then echo "slurm_local: up ($SLURM_CONF)"; exit 0; fi
  sleep 0.5
done
echo "slurm_local: the node did not come up; see $dir/log" >&2
exit 1
