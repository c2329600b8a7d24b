#!/usr/bin/env bash
# slurm/local-cluster.sh - a real SLURM cluster on this one machine, for trying cnnscale's sbatch scripts and for CI.
# Based on the project's tested recipe in ../shared/tools/local-slurm/ (start.sh + stop.sh), merged into one script.
# Debian/Ubuntu, as root, without systemd: slurmctld + slurmd (+ slurmdbd/MariaDB for sacct) from Debian's packages.
#
#   bash slurm/local-cluster.sh start [netns|loopback|single]   # default netns; idempotent (re-run only checks)
#   bash slurm/local-cluster.sh status                           # sinfo + daemons; exit 1 if not up
#   bash slurm/local-cluster.sh install [netns|loopback|single]  # only the Debian packages (start does it too)
#   bash slurm/local-cluster.sh stop                             # cancel jobs, stop daemons, remove namespaces
#
# Modes:
#   netns    - 2 nodes node1/node2 (${SUBNET}.11/.12), each slurmd in its own network namespace with its own hostname,
#              on bridge br-slurm; the nodes share this machine's filesystem (a venv path works) but cannot reach
#              its 127.0.0.1. Falls back to "loopback" if network namespaces can't be made.
#   loopback - 2 nodes node1/node2, two slurmd on 127.0.0.1 (ports 17001/2); adds "127.0.0.1 node1 node2" to
#              /etc/hosts (removed on stop).
#   single   - 1 node "localhost" on 127.0.0.1.
# Environment knobs:
#   SLURM_LOCAL_ACCOUNTING=1   also run MariaDB + slurmdbd so sacct works (0: off)
#   SLURM_LOCAL_CPUS=N         CPUs advertised per node (default: real count)
#   SLURM_LOCAL_SUBNET=10.201.0   /24 prefix used by netns mode
#   SLURM_LOCAL_SMOKE=1        run a 'srun hostname' smoke test after (re)start
#   SLURM_LOCAL_CRED_EXPIRE=15 credential lifetime (s); it is also how long a requeued job waits before it may
#                              start again (SLURM's default, 120 s, makes the preemption tests slow)
# Changes from the recipe: one script with start/stop/status; AuthInfo=cred_expire (requeue delay) in slurm.conf.
set -uo pipefail

ACTION="${1:-}"
MODE="${2:-${SLURM_LOCAL_MODE:-netns}}"
ACCOUNTING="${SLURM_LOCAL_ACCOUNTING:-1}"
SUBNET="${SLURM_LOCAL_SUBNET:-10.201.0}"
SMOKE="${SLURM_LOCAL_SMOKE:-1}"
CRED_EXPIRE="${SLURM_LOCAL_CRED_EXPIRE:-15}"
CLUSTER=localcluster
RUN=/run/slurm-local
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)   # the checkout, for cnnscale.lab.netns
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
MARK="# managed by start.sh"
HOSTS_MARK="# slurm-local"

log() { printf '[local-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- helpers
# running PID : process exists and is not a zombie (PID 1 may reap orphans late)
running() { local st; st=$(cat /proc/"$1"/stat 2>/dev/null) || return 1; st=${st##*) }; [ "${st:0:1}" != Z ]; }
# pid_alive PIDFILE NAME : pidfile's process is alive and its comm is NAME
pid_alive() {
  local pid; [ -s "$1" ] || return 1; pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] && running "$pid"
}
# stop_pidfile PIDFILE NAME : SIGTERM the process (only if comm matches), wait
stop_pidfile() {
  local pid i
  if pid_alive "$1" "$2"; then
    pid=$(cat "$1" 2>/dev/null) || { rm -f "$1"; return 0; }; kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do running "$pid" || break; sleep 0.1; done
    running "$pid" && { log "$2 ($pid) ignored SIGTERM, sending SIGKILL"; kill -9 "$pid" || true; }
  fi
  rm -f "$1"
}
# wait_for SECONDS DESCRIPTION CMD... : poll CMD until success
wait_for() {
  local secs=$1 what=$2; shift 2; local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2
  done
}

# ---------------------------------------------------------------- 1. install
install_packages() {
  local pkgs=(munge slurm-client slurmctld slurmd) need=0 c
  for c in munged sbatch slurmctld slurmd; do command -v "$c" >/dev/null || need=1; done
  if [ "$MODE" = netns ] && ! command -v ip >/dev/null; then pkgs+=(iproute2); need=1; fi
  if [ "$ACCOUNTING" = 1 ]; then
    pkgs+=(slurmdbd mariadb-server)
    for c in slurmdbd mariadbd; do command -v "$c" >/dev/null || need=1; done
    [ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/accounting_storage_mysql.so ] || \
      ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so >/dev/null 2>&1 || need=1
  fi
  [ "$need" = 1 ] || { log "packages already installed"; return 0; }
  log "installing: ${pkgs[*]}"
  # keep apt/dpkg from starting the services itself (no systemd here; we start them)
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local ok=0
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$RUN/apt.log" 2>&1 && ok=1
  if [ "$ok" = 0 ]; then
    log "first install attempt failed; running apt-get update and retrying"
    apt-get update -q >>"$RUN/apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$RUN/apt.log" 2>&1 && ok=1
  fi
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || { tail -n 30 "$RUN/apt.log"; die "apt-get install failed (log: $RUN/apt.log)"; }
  log "installed ($(slurmctld -V))"
}

# ---------------------------------------------------------------- 2. munge
start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged already running"; return 0; fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged || runuser -u munge -- /usr/sbin/munged --force
  wait_for 20 munged sh -c 'munge -n | unmunge' || die "munged did not come up (see /var/log/munge/munged.log)"
  touch "$RUN/started-munged"; log "munged started (pid $(cat /run/munge/munged.pid))"
}

# ---------------------------------------------------------------- 3. accounting
start_accounting() {
  [ "$ACCOUNTING" = 1 ] || return 0
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [ ! -d /var/lib/mysql/mysql ]; then
      log "initialising MariaDB data dir"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$RUN/mariadb-install.log" 2>&1
    fi
    setsid /usr/sbin/mariadbd --user=mysql --skip-log-bin --innodb-buffer-pool-size=128M \
      --innodb-lock-wait-timeout=900 </dev/null >>/var/log/slurm/mariadb.log 2>&1 &
    wait_for 60 mariadb mariadb -e 'select 1' || { tail -n 20 /var/log/slurm/mariadb.log; die "MariaDB did not start"; }
    touch "$RUN/started-mariadb"; log "MariaDB started (pid $(cat /run/mysqld/mysqld.pid 2>/dev/null))"
  else
    log "MariaDB already running"
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  local new; new=$(cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmdbpass
EOF
)
  if [ "$(cat "$DBDCONF" 2>/dev/null)" != "$new" ]; then
    printf '%s\n' "$new" > "$DBDCONF"; stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
  fi
  chown slurm:slurm "$DBDCONF"; chmod 0600 "$DBDCONF"
  if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then log "slurmdbd already running"; return 0; fi
  slurmdbd || die "slurmdbd failed to start (see /var/log/slurm/slurmdbd.log)"
  wait_for 30 slurmdbd bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || { tail -n 20 /var/log/slurm/slurmdbd.log; die "slurmdbd not listening on 6819"; }
  log "slurmdbd started (pid $(cat $RUN/slurmdbd.pid))"
}

# ---------------------------------------------------------------- 4. network
# The namespaces, veths and bridge are made and removed by the network lab's code (cnnscale/lab/netns.py, shared with
# `cnnscale study`'s network profiles), run from this checkout with the system python3 (stdlib only) or
# SLURM_LOCAL_PYTHON; if it cannot run, setup fails and `start` falls back to loopback mode as before.
lab_netns() {  # lab_netns up|down
  local py=${SLURM_LOCAL_PYTHON:-}
  [ -n "$py" ] || py=$(command -v python3 || echo "$REPO_ROOT/.venv/bin/python")
  PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" -m cnnscale.lab.netns "$1" --bridge br-slurm \
    --bridge-addr "$SUBNET.1/24" --node "slurm-n1,vslurm1,$SUBNET.11/24" --node "slurm-n2,vslurm2,$SUBNET.12/24"
}
setup_netns() {
  lab_netns up || return 1
  # /etc/hosts seen by processes on the emulated nodes (bind-mounted there only)
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s.1 slurmctl %s\n%s.11 node1\n%s.12 node2\n' \
    "$SUBNET" "$(hostname)" "$SUBNET" "$SUBNET" > "$RUN/hosts.netns"
}
teardown_netns() {
  lab_netns down
}
hosts_add_loopback() {
  grep -q "$HOSTS_MARK" /etc/hosts && return 0
  [ -z "$(tail -c1 /etc/hosts)" ] || echo >> /etc/hosts
  printf '127.0.0.1 node1 node2 %s\n' "$HOSTS_MARK" >> /etc/hosts
}
hosts_remove_loopback() {
  if grep -q "$HOSTS_MARK" /etc/hosts; then
    local tmp; tmp=$(grep -v "$HOSTS_MARK" /etc/hosts); printf '%s\n' "$tmp" > /etc/hosts  # in place (may be a bind mount)
  fi
}

# ---------------------------------------------------------------- 5. slurm.conf
gen_conf() {
  local hw mem topo ctl acct_host acct nodes
  hw=$(slurmd -C | head -n1)
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  topo=$(grep -o 'CPUs=.*ThreadsPerCore=[0-9]*' <<<"$hw")
  [ -z "${SLURM_LOCAL_CPUS:-}" ] || topo="CPUs=$SLURM_LOCAL_CPUS"   # needs config_overrides
  case "$MODE" in
    single)   ctl=localhost; acct_host=localhost
              nodes="NodeName=localhost NodeAddr=127.0.0.1 $topo RealMemory=$mem State=UNKNOWN";;
    loopback) ctl=localhost; acct_host=localhost
              nodes="NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] $topo RealMemory=$mem State=UNKNOWN";;
    netns)    ctl="localhost($SUBNET.1)"; acct_host="$SUBNET.1"
              nodes="NodeName=node1 NodeAddr=$SUBNET.11 NodeHostname=node1 $topo RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=$SUBNET.12 NodeHostname=node2 $topo RealMemory=$mem State=UNKNOWN";;
  esac
  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$acct_host
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat <<EOF
$MARK (mode=$MODE)
ClusterName=$CLUSTER
SlurmctldHost=$ctl
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# no cgroups, no systemd needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# default batch_sched_delay=3 makes trivial jobs wait ~3s; 0 gives ~1s turnaround
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
$acct
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# ---------------------------------------------------------------- 6. slurm daemons
node_list() { case "$MODE" in single) echo localhost;; *) echo node1 node2;; esac; }
stop_slurm_daemons() {
  local f pid
  for f in "$RUN"/slurmd-*.pid; do   # SIGTERM all slurmd first, then wait for each
    pid=$(cat "$f" 2>/dev/null) || continue
    if pid_alive "$f" slurmd; then kill "$pid" 2>/dev/null || true; fi
  done
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
}
start_slurmd() {  # start_slurmd NODENAME INDEX
  local n=$1 i=$2
  install -d -m 0755 "/var/lib/slurm/slurmd/$n"
  if [ "$MODE" = netns ]; then
    nsenter --net=/run/netns/slurm-n$i unshare --mount --uts --propagation private \
      sh -c "mount --bind '$RUN/hosts.netns' /etc/hosts && hostname $n && exec slurmd -N $n"
  else
    slurmd -N "$n"
  fi
}
nodes_ready() {  # all nodes idle/mix/alloc
  local st; st=$(sinfo -h -N -o '%t' 2>/dev/null) || return 1
  [ -n "$st" ] && ! grep -qvE '^(idle|mix|alloc|comp)$' <<<"$st"
}

# ---------------------------------------------------------------- stop
# stop_pidfiles NAME PIDFILE... : SIGTERM every live process (comm must be NAME),
# wait for all of them together (up to 15 s), then SIGKILL stragglers
stop_pidfiles() {
  local name=$1 f pid i pids=(); shift
  for f in "$@"; do
    pid=$(cat "$f" 2>/dev/null) || continue
    if pid_alive "$f" "$name"; then log "stopping $name (pid $pid)"; kill "$pid" 2>/dev/null && pids+=("$pid"); fi
  done
  for i in $(seq 1 150); do
    local alive=0; for pid in "${pids[@]}"; do running "$pid" && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do running "$pid" && { log "$name ($pid) still alive, SIGKILL"; kill -9 "$pid" 2>/dev/null; }; done
  for f in "$@"; do [ -e "$f" ] && rm -f "$f" 2>/dev/null; done
  return 0
}


# ================================================================ commands
cmd_start() {
  case "$MODE" in netns|loopback|single) ;; *) die "unknown mode '$MODE' (choose from: netns, loopback, single)";; esac
  T0=$(date +%s%N)
  set -e
  install -d -o slurm -g slurm -m 0755 "$RUN" 2>/dev/null || install -d -m 0755 "$RUN"
  install_packages
  chown slurm:slurm "$RUN"
  install -d -o slurm -g slurm -m 0755 /var/lib/slurm/slurmctld /var/log/slurm
  install -d -m 0755 /var/lib/slurm/slurmd /etc/slurm

  if [ "$MODE" = netns ]; then
    if ! setup_netns 2>"$RUN/netns.err"; then
      log "network namespaces unavailable ($(tr '\n' ' ' <"$RUN/netns.err")); falling back to loopback mode"
      MODE=loopback
    fi
  fi

  NEWCONF=$(gen_conf)
  restart=0
  if [ "$(cat "$CONF" 2>/dev/null)" != "$NEWCONF" ]; then
    if [ -e "$CONF" ] && ! grep -q "$MARK" "$CONF"; then cp -a "$CONF" "$CONF.bak.$(date +%s)"; fi
    log "writing $CONF (mode=$MODE)"
    stop_slurm_daemons   # before touching the network the old daemons use
    printf '%s\n' "$NEWCONF" > "$CONF"; chmod 0644 "$CONF"
  fi
  [ "$MODE" = netns ] || teardown_netns 2>/dev/null || true
  if [ "$MODE" = loopback ]; then hosts_add_loopback; else hosts_remove_loopback; fi
  echo "$MODE" > "$RUN/mode"

  start_munge
  start_accounting

  if pid_alive "$RUN/slurmctld.pid" slurmctld && scontrol ping 2>/dev/null | grep -q UP; then
    log "slurmctld already running"
  else
    stop_pidfile "$RUN/slurmctld.pid" slurmctld
    slurmctld || die "slurmctld failed (see /var/log/slurm/slurmctld.log)"; restart=1
    wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP' || { tail -n 20 /var/log/slurm/slurmctld.log; die "slurmctld not responding"; }
    log "slurmctld started (pid $(cat $RUN/slurmctld.pid))"
  fi

  i=0
  for n in $(node_list); do
    i=$((i+1))
    if pid_alive "$RUN/slurmd-$n.pid" slurmd; then log "slurmd $n already running"; continue; fi
    rm -f "$RUN/slurmd-$n.pid"
    start_slurmd "$n" "$i" || die "slurmd $n failed (see /var/log/slurm/slurmd-$n.log)"
    restart=1; log "slurmd $n started"
  done

  if ! wait_for 60 nodes nodes_ready; then
    log "nodes not ready, trying to resume them"; scontrol update nodename=ALL state=resume 2>/dev/null || true
    wait_for 30 nodes nodes_ready || { sinfo -N -l; sinfo -R; die "nodes did not become ready"; }
  fi
  ms=$(( ($(date +%s%N) - T0) / 1000000 ))
  log "cluster ready after $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s (mode=$MODE)"

  if [ "$SMOKE" = 1 ] && [ "$restart" = 1 ]; then
    nn=$(node_list | wc -w)
    out=$(cd "${TMPDIR:-/tmp}" && timeout 60 srun -N"$nn" -n"$nn" -l hostname 2>&1) || die "smoke test 'srun -N$nn hostname' failed: $out"
    log "smoke test ok: $(tr '\n' ' ' <<<"$out")"
  fi
  sinfo
  set +e
}

cmd_stop() {
  # 1. cancel jobs so no slurmstepd/job processes are left behind
  if pid_alive "$RUN/slurmctld.pid" slurmctld && command -v scancel >/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// }" ]; then
      log "cancelling jobs: $jobs"; scancel $jobs 2>/dev/null || true
      for i in $(seq 1 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi

  # 2. slurm daemons
  stop_pidfiles slurmd "$RUN"/slurmd-*.pid
  stop_pidfiles slurmctld "$RUN/slurmctld.pid"
  stop_pidfiles slurmdbd "$RUN/slurmdbd.pid"
  left=$(for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = slurmstepd ] && echo "${p#/proc/}"; done | tr '\n' ' ')
  [ -n "${left// }" ] && log "WARNING: slurmstepd processes still running (pids: $left)"

  # 3. MariaDB and munged, only if start.sh started them
  if [ -e "$RUN/started-mariadb" ]; then
    stop_pidfiles mariadbd /run/mysqld/mysqld.pid; rm -f "$RUN/started-mariadb"
  fi
  if [ -e "$RUN/started-munged" ]; then
    stop_pidfiles munged /run/munge/munged.pid; rm -f "$RUN/started-munged"
  fi

  # 4. network namespaces / bridge (netns mode) and /etc/hosts line (loopback mode)
  for i in 1 2; do [ -e /run/netns/slurm-n$i ] && log "deleting netns slurm-n$i"; done
  ip link show br-slurm >/dev/null 2>&1 && log "deleting bridge br-slurm"
  teardown_netns || log "WARNING: removing the namespaces failed (python -m cnnscale.lab.netns down)"
  if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    tmp=$(grep -v "$HOSTS_MARK" /etc/hosts); printf '%s\n' "$tmp" > /etc/hosts; log "removed node names from /etc/hosts"
  fi
  rm -f "$RUN/mode" "$RUN/hosts.netns"
  log "stopped"
  return 0
}

cmd_status() {
  local mode; mode=$(cat "$RUN/mode" 2>/dev/null || echo none)
  pid_alive "$RUN/slurmctld.pid" slurmctld || { log "not running (no slurmctld)"; return 1; }
  nodes_ready || { sinfo -N -l 2>/dev/null; log "slurmctld up (mode=$mode) but nodes are not ready"; return 1; }
  log "up (mode=$mode)"; sinfo
}

[ "$(id -u)" = 0 ] || die "must run as root"
case "$ACTION" in
  start)  cmd_start ;;
  install) install -d -m 0755 "$RUN"; install_packages ;;
  stop)   cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start [netns|loopback|single] | install [MODE] | stop | status" >&2; exit 2 ;;
esac
