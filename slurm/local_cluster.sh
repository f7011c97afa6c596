#!/usr/bin/env bash
# A real Slurm cluster on 127.0.0.1, for the tests and for trying the launcher:
#
#   slurm/local_cluster.sh start [--nodes N]   install what is missing, configure, start, wait until idle
#   slurm/local_cluster.sh status              the recorded daemons and sinfo
#   slurm/local_cluster.sh stop                cancel this cluster's jobs, stop exactly the recorded PIDs
#   slurm/local_cluster.sh env                 prints `export SLURM_CONF=...` (eval it to use sbatch & co.)
#
# Debian's Slurm 22.05: slurmctld, N slurmd on this one host (`slurmd -N nK`, one port each,
# NodeHostname = this host, NodeAddr = 127.0.0.1, so multi-node jobs run here), munge, and
# slurmdbd over a private MariaDB (without accounting submitit never sees a cancelled job end).
# Everything (configuration, state, logs, PIDs, the database) lives under one folder:
# $SLURM_LOCAL_DIR, default <repo>/.cache/slurm. Ports: $SLURM_LOCAL_PORT (default 26800) + 0..40.
# Idempotent: start on a running cluster only waits for it; stop on a stopped one does nothing.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
D="${SLURM_LOCAL_DIR:-$REPO/.cache/slurm}"
BASE="${SLURM_LOCAL_PORT:-26800}"
NODES=2
CMD="${1:-status}"
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --nodes=*) NODES="${1#*=}"; shift ;;
    *) echo "error: unknown option $1 (slurm/local_cluster.sh start|stop|status|env [--nodes N])" >&2; exit 2 ;;
  esac
done

CONF="$D/etc/slurm.conf"
MUNGE_SOCKET="$D/munge/munge.socket.2"
DB_PORT=$((BASE + 6)); CTLD_PORT=$((BASE + 17)); DBD_PORT=$((BASE + 19))
HOST="$(hostname -s)"
export SLURM_CONF="$CONF"

log() { echo "local_cluster: $*" >&2; }
die() { echo "error: local_cluster: $*" >&2; exit 2; }

alive() { [ -f "$D/pids/$1.pid" ] && kill -0 "$(cat "$D/pids/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    if [ "$t" -ge $((limit * 2)) ]; then die "timed out waiting for $what (logs in $D/log)"; fi
    sleep 0.5
  done
}

install_missing() {
  local want="slurmctld slurmd slurm-client munge slurmdbd mariadb-server" missing=""
  for p in $want; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  log "installing:$missing"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  # policy-rc.d keeps Debian from starting the packaged system services: ours run from $D
  $sudo env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q $missing >"$D/log/apt.log" 2>&1 \
    || { $sudo apt-get update -q >>"$D/log/apt.log" 2>&1 \
         && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >>"$D/log/apt.log" 2>&1; } \
    || die "apt-get install failed (see $D/log/apt.log)"
}

write_config() {
  # every node offers at least 4 CPUs (config_overrides: slurmd takes the configuration's word), so
  # multi-task jobs fit on small machines; `nproc --all` ignores OMP_NUM_THREADS
  local cpus; cpus=$(nproc --all); [ "$cpus" -ge 4 ] || cpus=4
  mkdir -p "$D/etc" "$D/state" "$D/spool" "$D/log" "$D/pids" "$D/munge" "$D/db"
  chmod 700 "$D/munge"
  {
    echo "# written by slurm/local_cluster.sh; $NODES nodes on 127.0.0.1"
    echo "ClusterName=framework"
    echo "SlurmctldHost=$HOST(127.0.0.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10"
    echo "CredType=cred/munge"
    echo "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
    echo "StateSaveLocation=$D/state"
    echo "SlurmdSpoolDir=$D/spool/%n"
    echo "SlurmctldPidFile=$D/log/slurmctld.pidfile"
    echo "SlurmdPidFile=$D/log/slurmd-%n.pidfile"
    echo "SlurmctldLogFile=$D/log/slurmctld.log"
    echo "SlurmdLogFile=$D/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SwitchType=switch/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "ReturnToService=2"
    echo "SlurmdParameters=config_overrides"
    echo "JobRequeue=1"
    echo "KillWait=15"
    echo "MinJobAge=600"
    echo "InactiveLimit=0"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=60"
    echo "AccountingStorageType=accounting_storage/slurmdbd"
    echo "AccountingStorageHost=127.0.0.1"
    echo "AccountingStoragePort=$DBD_PORT"
    echo "AccountingStoragePass=$MUNGE_SOCKET"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    for i in $(seq 1 "$NODES"); do
      echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((BASE + 20 + i)) CPUs=$cpus RealMemory=1000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
  {
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET"
    echo "DbdHost=localhost"
    echo "DbdAddr=127.0.0.1"
    echo "DbdPort=$DBD_PORT"
    echo "SlurmUser=root"
    echo "PidFile=$D/log/slurmdbd.pidfile"
    echo "LogFile=$D/log/slurmdbd.log"
    echo "StorageType=accounting_storage/mysql"
    echo "StorageHost=127.0.0.1"
    echo "StoragePort=$DB_PORT"
    echo "StorageUser=slurm"
    echo "StoragePass=framework-local"
    echo "StorageLoc=slurm_acct_db"
  } >"$D/etc/slurmdbd.conf"
  chmod 600 "$D/etc/slurmdbd.conf"
  echo "$NODES" >"$D/nodes"
}

spawn() {  # spawn NAME COMMAND... : runs in the background, records its PID
  local name=$1; shift
  nohup "$@" >>"$D/log/$name.out" 2>&1 &
  echo $! >"$D/pids/$name.pid"
}

db_ready() { mariadb --no-defaults --socket="$D/db/mysql.sock" -u root -e "select 1"; }
ctld_ready() { scontrol ping | grep -q UP; }
nodes_idle() {
  local n; n=$(sinfo -h -N -o "%N %t" 2>/dev/null | grep -c -E " (idle|mix|alloc)$" || true)
  [ "$n" -ge "$NODES" ]
}

start() {
  mkdir -p "$D/log" "$D/pids"
  if alive slurmctld; then
    NODES=$(cat "$D/nodes" 2>/dev/null || echo "$NODES")
    log "already running ($NODES nodes)"; wait_for 90 "idle nodes" nodes_idle; echo "export SLURM_CONF=$CONF"; return 0
  fi
  stop_daemons quiet
  install_missing
  write_config
  if [ ! -f "$D/munge/munge.key" ]; then
    dd if=/dev/urandom bs=1 count=1024 of="$D/munge/munge.key" 2>/dev/null
    chmod 400 "$D/munge/munge.key"
  fi
  spawn munged munged -F -f --socket="$MUNGE_SOCKET" --key-file="$D/munge/munge.key" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
  wait_for 20 munged test -S "$MUNGE_SOCKET"
  if [ ! -d "$D/db/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$D/db/data" --user=root --auth-root-authentication-method=socket \
      >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $D/log/mariadb-install.log)"
  fi
  spawn mariadbd mariadbd --no-defaults --datadir="$D/db/data" --socket="$D/db/mysql.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --pid-file="$D/db/mariadbd.pid" --user=root --log-error="$D/log/mariadbd.log"
  wait_for 60 mariadb db_ready
  mariadb --no-defaults --socket="$D/db/mysql.sock" -u root -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'framework-local';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  spawn slurmdbd env SLURM_CONF="$CONF" slurmdbd -D  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 60 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  spawn slurmctld slurmctld -D -i -f "$CONF"
  wait_for 60 slurmctld ctld_ready
  for i in $(seq 1 "$NODES"); do
    spawn "slurmd-n$i" slurmd -D -N "n$i" -f "$CONF"
  done
  wait_for 120 "$NODES idle nodes" nodes_idle
  log "up: $NODES nodes, configuration $CONF, logs $D/log"
  echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
  local quiet=${1:-}
  [ -d "$D/pids" ] || return 0
  local order="" f name
  for f in "$D"/pids/slurmd-*.pid; do [ -f "$f" ] && order="$order $(basename "$f" .pid)"; done
  order="$order slurmctld slurmdbd mariadbd munged"
  for name in $order; do
    f="$D/pids/$name.pid"
    [ -f "$f" ] || continue
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      [ -n "$quiet" ] || log "stopping $name ($pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

stop() {
  if alive slurmctld; then
    local jobs; jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo $jobs)"
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_daemons
  log "stopped"
}

status() {
  local name f any=0
  for f in "$D"/pids/*.pid; do
    [ -f "$f" ] || continue
    any=1; name=$(basename "$f" .pid)
    if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$name: running ($(cat "$f"))"; else echo "$name: dead"; fi
  done
  [ "$any" = 1 ] || { echo "not running ($D)"; return 0; }
  alive slurmctld && sinfo -N || true
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "unknown command $CMD (start|stop|status|env)" ;;
esac
