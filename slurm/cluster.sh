#!/usr/bin/env bash
# A local SLURM (slurmctld + slurmd + slurmdbd/MariaDB accounting + munge) for tests and CI: one node, or N nodes on
# this one machine. Runs as root WITHOUT systemd: every daemon is started directly and tracked by a pid file.
#
#   slurm/cluster.sh install   apt-get the Debian packages (skips what is present)
#   slurm/cluster.sh start [--nodes N]
#                              write configs, start all daemons, wait until every node is idle (no-op if up);
#                              N (default 1, or $HPCDISTILL_SLURM_NODES) > 1: each node a slurmd in its own network
#                              and UTS namespace (hostname nodeK, address 10.77.0.K+1) joined by a bridge to this
#                              host (10.77.0.1, where slurmctld listens); /etc/hosts names them. Nothing leaves
#                              the machine: the bridge has no route out.
#   slurm/cluster.sh stop      cancel jobs, kill leftover job processes, stop all daemons, and remove every
#                              namespace, bridge and /etc/hosts line this script made
#   slurm/cluster.sh status    which daemons are up, plus sinfo
#   slurm/cluster.sh env       print `export SLURM_CONF=...` (eval it before using sbatch/sinfo/submitit)
#   slurm/cluster.sh selftest  start it, then check its own behaviour (slurm/selftest; not hpcdistill's tests)
#
# State folder: $HPCDISTILL_SLURM_DIR (default /tmp/hpcdistill-slurm). Start-up waits are bounded by
# $HPCDISTILL_SLURM_TIMEOUT seconds (default 60).
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin   # Debian puts the daemons there; a non-login root shell may not have them

STATE_DIR=${HPCDISTILL_SLURM_DIR:-/tmp/hpcdistill-slurm}
TIMEOUT=${HPCDISTILL_SLURM_TIMEOUT:-60}
CLUSTER_NAME=hpcdistill
NODE=$(hostname -s)
NODES=${HPCDISTILL_SLURM_NODES:-1}
if [[ ${1:-} == start && ${2:-} == --nodes ]]; then
    NODES=${3:?start --nodes N}
elif [[ ${1:-} != start && -s $STATE_DIR/etc/slurm.conf ]]; then
    NODES=$(grep -c '^NodeName=' "$STATE_DIR/etc/slurm.conf")   # status, stop: the running cluster's nodes
fi
[[ $NODES =~ ^[1-9][0-9]?$ ]] || { echo "cluster.sh: error: --nodes $NODES: a count from 1 to 99" >&2; exit 1; }
BRIDGE=hpcdbr0        # the namespaced nodes' switch; its address is the host's on their network
SUBNET=10.77.0
HOSTS_MARK="# hpcdistill-slurm node"
CONF_DIR=$STATE_DIR/etc
LOG_DIR=$STATE_DIR/log
RUN_DIR=$STATE_DIR/run
MARK_DIR=$STATE_DIR/started          # one empty file per daemon this script started (stop touches only those)
export SLURM_CONF=$CONF_DIR/slurm.conf   # slurmdbd finds slurmdbd.conf next to it
MYSQL_SOCK=/run/mysqld/mysqld.sock
MYSQL_PID=/run/mysqld/mysqld.pid
MUNGE_PID=/run/munge/munged.pid
DB_NAME=slurm_acct_db
DB_USER=slurm
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

log() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (the local test cluster runs its daemons as root)"; }

pid_alive() {  # pid_alive PIDFILE -> 0 if the process named in PIDFILE is running
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION LOGFILE CMD... -> polls CMD every 0.2 s; dies with the log tail on timeout
    local secs=$1 what=$2 logfile=$3 deadline
    shift 3
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "cluster.sh: error: timed out after ${secs}s waiting for $what; last lines of $logfile:" >&2
            tail -n 25 "$logfile" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_names() {  # the nodes' names: this host's for one node, node1..nodeN for several
    if ((NODES == 1)); then echo "$NODE"; else seq -f 'node%g' 1 "$NODES"; fi
}

slurmd_pidfile() { if ((NODES == 1)); then echo "$RUN_DIR/slurmd.pid"; else echo "$RUN_DIR/slurmd-$1.pid"; fi; }

# Schedulable: idle, mixed, allocated or completing, and responding (sinfo adds '*' to a node not responding).
node_ready() {
    local name
    for name in $(node_names); do
        [[ $(timeout 10 sinfo -h -n "$name" -o %T 2>/dev/null) =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    done
}

# The namespaced nodes' network: a bridge on the host, one network + UTS namespace per node (veth into the bridge),
# and /etc/hosts lines naming them (rewritten in place: /etc/hosts may be a bind mount that cannot be replaced).
net_up() {
    local i ns
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    for ((i = 1; i <= NODES; i++)); do
        ns=hpcdnode$i
        if ! ip netns list | grep -qw "$ns"; then
            ip netns add "$ns"
            ip link add "hpcdv$i" type veth peer name eth0 netns "$ns"
            ip link set "hpcdv$i" master "$BRIDGE" up
            ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
            ip -n "$ns" link set lo up
            ip -n "$ns" link set eth0 up
            ip -n "$ns" route add default via "$SUBNET.1"
        fi
    done
    hosts_lines
}

hosts_lines() {  # hosts_lines -> /etc/hosts without this script's lines, plus one per node when several
    local kept i
    kept=$(grep -v "$HOSTS_MARK" /etc/hosts || true)
    {
        echo "$kept"
        for ((i = 1; i <= NODES && NODES > 1; i++)); do echo "$SUBNET.$((i + 1)) node$i $HOSTS_MARK"; done
    } >/etc/hosts.hpcdistill && cat /etc/hosts.hpcdistill >/etc/hosts && rm -f /etc/hosts.hpcdistill
}

net_down() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^hpcdnode[0-9]+$/ {print $1}'); do
        ip netns del "$ns" 2>/dev/null || true   # its veth end goes with it, and the host end with that
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then NODES=1 hosts_lines; fi
}

cmd_install() {
    need_root
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "packages already installed: ${PACKAGES[*]}"
        return
    fi
    log "installing ${missing[*]}"
    # policy-rc.d in containers stops the packages' services from auto-starting, which is what we want.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

node_lines() {  # node_lines TOPOLOGY MEM_MB -> one NodeName line per node (the machine's memory shared out)
    local i
    if ((NODES == 1)); then
        echo "NodeName=$NODE NodeAddr=127.0.0.1 ${1}RealMemory=$2 State=UNKNOWN"
        return
    fi
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=node$i NodeHostname=node$i NodeAddr=$SUBNET.$((i + 1)) ${1}RealMemory=$(($2 / NODES)) State=UNKNOWN"
    done
}

write_configs() {
    local topology mem_mb CTLD_ADDR=127.0.0.1 SUFFIX=""
    # Several nodes: each slurmd has its own spool, pid and log file (%n: the node's name), and reaches slurmctld
    # on the bridge.
    if ((NODES > 1)); then CTLD_ADDR=$SUBNET.1 SUFFIX=-%n; fi
    # The node's real layout as slurmd sees it (CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore):
    # a bare CPUs=N is rewritten when slurmd registers, and a job submitted in that moment can be sized for
    # two nodes and stay pending for ever (Reason=PartitionConfig).
    topology=$(slurmd -C | head -n 1 | tr ' ' '\n' |
        grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    [[ $topology == CPUs=* ]] || die "could not read the node layout from 'slurmd -C'"
    # Half of RAM for jobs, so slurmd never sees less memory than configured.
    mem_mb=$(awk '/^MemTotal:/ {m = int($2 / 1024 / 2); print (m < 1024 ? 1024 : m)}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool" "$MARK_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by slurm/cluster.sh; rewritten at every start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups without systemd: plain /proc process tracking, no task binding, no per-job accounting sampling.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a per-CPU default each job is given the whole node's memory and jobs run one at a time.
DefMemPerCPU=1024
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool$SUFFIX
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd$SUFFIX.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd$SUFFIX.log
SlurmctldDebug=info
SlurmdDebug=info
# Accounting: submitit learns that a job died (without writing its result) only from sacct.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# Requeue: submitit's SIGUSR1 handler calls \`scontrol requeue \$SLURM_JOB_ID\` on timeout/preemption.
JobRequeue=1
# Used only when slurmctld has no saved state: continue after the ids already in the accounting database, so a
# removed state folder does not make job ids (and submitit result files, sacct records) repeat.
FirstJobId=$(first_job_id)
# Finished jobs stay visible to squeue/scontrol for 5 minutes (sacct keeps them for ever).
MinJobAge=300
# Fast turn-around for tests: short kill grace, schedule often, nodes come back by themselves after a restart.
KillWait=5
InactiveLimit=0
OverTimeLimit=0
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=200000
$(node_lines "$topology" "$mem_mb")
PartitionName=debug Nodes=$(node_names | paste -sd, -) Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd.conf holds the database password: it must be private (slurmdbd refuses otherwise).
    (
        umask 077
        cat >"$CONF_DIR/slurmdbd.conf" <<EOF
# Written by slurm/cluster.sh; rewritten at every start.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$(db_password)
StorageLoc=$DB_NAME
EOF
    )
    chmod 600 "$CONF_DIR/slurmdbd.conf"
}

first_job_id() {
    local max
    max=$(mariadb --socket="$MYSQL_SOCK" -u root -N -B \
        -e "SELECT COALESCE(MAX(id_job), 0) FROM $DB_NAME.${CLUSTER_NAME}_job_table" 2>/dev/null) || max=0
    [[ $max =~ ^[0-9]+$ ]] || max=0
    echo $((max + 1))
}

db_password() {  # a random password, generated once per state folder
    local f=$STATE_DIR/db_password
    if [[ ! -s $f ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$f")
    fi
    cat "$f"
}

start_munge() {
    if pid_alive "$MUNGE_PID"; then return; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    # munged refuses to run as root with a munge-owned key.
    runuser -u munge -- munged --pid-file="$MUNGE_PID"
    touch "$MARK_DIR/munged"
    wait_for 10 munged /var/log/munge/munged.log bash -c "munge -n | unmunge"
}

start_mariadb() {
    if pid_alive "$MYSQL_PID"; then return; fi
    install -d -o mysql -g mysql -m 755 /run/mysqld
    touch "$LOG_DIR/mariadb.log" && chown mysql:mysql "$LOG_DIR/mariadb.log"
    # mariadbd stays in the foreground: detach it into its own session.
    setsid mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCK" --pid-file="$MYSQL_PID" \
        --log-error="$LOG_DIR/mariadb.log" </dev/null >/dev/null 2>&1 &
    touch "$MARK_DIR/mariadb"
    wait_for "$TIMEOUT" mariadb "$LOG_DIR/mariadb.log" mariadb-admin --socket="$MYSQL_SOCK" ping
    # root authenticates over the socket (unix_socket plugin) on Debian.
    mariadb --socket="$MYSQL_SOCK" -u root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$(db_password)';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

start_slurmdbd() {
    if pid_alive "$RUN_DIR/slurmdbd.pid"; then return; fi
    slurmdbd   # daemonizes; finds slurmdbd.conf next to \$SLURM_CONF
    touch "$MARK_DIR/slurmdbd"
    # slurmctld dies ("we have no TRES from it") if slurmdbd is not listening yet.
    wait_for "$TIMEOUT" "slurmdbd on port 6819" "$LOG_DIR/slurmdbd.log" port_open 6819
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
}

start_slurmctld() {
    if pid_alive "$RUN_DIR/slurmctld.pid"; then
        scontrol reconfigure >/dev/null   # pick up the rewritten slurm.conf
        return
    fi
    slurmctld -f "$SLURM_CONF"
    touch "$MARK_DIR/slurmctld"
    wait_for "$TIMEOUT" slurmctld "$LOG_DIR/slurmctld.log" scontrol ping
}

start_slurmd() {
    local i
    if ((NODES == 1)); then
        if pid_alive "$RUN_DIR/slurmd.pid"; then return; fi
        slurmd -f "$SLURM_CONF" -N "$NODE"
        touch "$MARK_DIR/slurmd"
        return
    fi
    for ((i = 1; i <= NODES; i++)); do
        pid_alive "$(slurmd_pidfile "node$i")" && continue
        mkdir -p "$STATE_DIR/spool-node$i"
        # Its own hostname (UTS) and network: the job steps it forks inherit both, as on a separate machine.
        # nsenter, not `ip netns exec`: that remounts /sys for the namespace, hiding /sys/fs/cgroup from slurmd.
        nsenter --net="/var/run/netns/hpcdnode$i" unshare --uts \
            bash -c "hostname node$i && exec slurmd -f '$SLURM_CONF' -N node$i"
        touch "$MARK_DIR/slurmd-node$i"
    done
}

all_up() {
    local p
    for p in "$MUNGE_PID" "$MYSQL_PID" "$RUN_DIR/slurmdbd.pid" "$RUN_DIR/slurmctld.pid"; do
        pid_alive "$p" || return 1
    done
    for p in $(node_names); do pid_alive "$(slurmd_pidfile "$p")" || return 1; done
    [[ $(grep -c '^NodeName=' "$SLURM_CONF") == "$NODES" ]] && node_ready   # as many nodes as asked for
}

cmd_start() {
    need_root
    command -v slurmctld >/dev/null || die "slurmctld not found; run: $0 install"
    local t0=$SECONDS
    if [[ -s $SLURM_CONF ]] && all_up; then
        log "already running (SLURM_CONF=$SLURM_CONF)"
        return
    fi
    # One cluster per machine: the ports are fixed, so a cluster from another state folder cannot coexist.
    if port_open 6817 && ! pid_alive "$RUN_DIR/slurmctld.pid"; then
        die "port 6817 is taken by a slurmctld not started from $STATE_DIR (another state folder?); stop it first"
    fi
    if port_open 6819 && ! pid_alive "$RUN_DIR/slurmdbd.pid"; then
        die "port 6819 is taken by a slurmdbd not started from $STATE_DIR (another state folder?); stop it first"
    fi
    mkdir -p "$LOG_DIR" "$RUN_DIR" "$MARK_DIR"
    # Another node count than the running cluster's: stop its slurmds and nodes first (the controller is rewritten).
    if [[ -s $SLURM_CONF ]] && [[ $(grep -c '^NodeName=' "$SLURM_CONF") != "$NODES" ]]; then
        stop_slurmds
        net_down
        rm -rf "$STATE_DIR/ctld"   # its saved node table would keep the old nodes
        stop_daemons slurmctld="$RUN_DIR/slurmctld.pid"
    fi
    if ((NODES > 1)); then net_up; fi
    start_munge
    start_mariadb
    write_configs   # after MariaDB: the first job id comes from the accounting database
    start_slurmdbd
    start_slurmctld
    start_slurmd
    # A node left DOWN/DRAIN by an earlier unclean stop (or a test) is put back into service.
    local name
    for name in $(node_names); do
        if timeout 10 sinfo -h -n "$name" -o %T 2>/dev/null | grep -Eq '^(down|drain)'; then
            scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
        fi
    done
    wait_for "$TIMEOUT" "nodes $(node_names | paste -sd, -) to become ready" "$LOG_DIR/slurmctld.log" node_ready
    log "started in $((SECONDS - t0))s; nodes $(node_names | paste -sd, -) up; export SLURM_CONF=$SLURM_CONF"
}

stop_daemons() {  # stop_daemons NAME=PIDFILE... -> SIGTERM all at once, wait up to 20 s, then SIGKILL
    local arg name pidfile pid pids=() i alive
    for arg in "$@"; do
        name=${arg%%=*} pidfile=${arg#*=}
        if pid_alive "$pidfile"; then
            pid=$(<"$pidfile")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$name=$pid")
        fi
        rm -f "$MARK_DIR/$name"
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for arg in "${pids[@]}"; do kill -0 "${arg#*=}" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.2
    done
    for arg in "${pids[@]}"; do
        if kill -0 "${arg#*=}" 2>/dev/null; then
            log "${arg%%=*} (${arg#*=}) ignored SIGTERM for 20s; killing it"
            kill -KILL "${arg#*=}" 2>/dev/null || true
        fi
    done
}

stop_slurmds() {  # every slurmd this state folder started, whatever node count it was started with
    local f args=()
    for f in "$RUN_DIR"/slurmd.pid "$RUN_DIR"/slurmd-*.pid; do
        [[ -e $f ]] && args+=("$(basename "$f" .pid)=$f")
    done
    if ((${#args[@]})); then stop_daemons "${args[@]}"; fi
}

job_pids() {  # pids of live (not zombie) slurmstepd processes and all their descendants
    local steps pid
    steps=$(ps -eo pid=,stat=,comm= | awk '$3 == "slurmstepd" && $2 !~ /^Z/ {print $1}')
    for pid in $steps; do
        echo "$pid"
        descendants "$pid"
    done
}

descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}

cmd_stop() {
    need_root
    local t0=$SECONDS i pids
    if pid_alive "$RUN_DIR/slurmctld.pid"; then
        local ids
        ids=$(timeout 20 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $ids ]]; then timeout 20 scancel $ids >/dev/null 2>&1 || true; fi
        # Job steps end after KillWait; wait for them before taking the daemons away.
        for ((i = 0; i < 75; i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # submitit jobs ignore SIGTERM: whatever is still running under a slurmstepd is killed.
    pids=$(job_pids)
    if [[ -n $pids ]]; then
        log "killing leftover job processes: $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
    fi
    # Each daemon takes ~2 s to exit, so they are stopped in parallel, in three dependency stages:
    # slurmctld flushes accounting to slurmdbd, which flushes to MariaDB.
    stop_slurmds
    stop_daemons slurmctld="$RUN_DIR/slurmctld.pid"
    net_down
    # MariaDB and munged may belong to the system: stop them only if this script started them.
    local system=()
    if [[ -e $MARK_DIR/munged ]]; then system+=(munged="$MUNGE_PID"); fi
    stop_daemons slurmdbd="$RUN_DIR/slurmdbd.pid" "${system[@]}"
    if [[ -e $MARK_DIR/mariadb ]]; then stop_daemons mariadb="$MYSQL_PID"; fi
    log "stopped in $((SECONDS - t0))s"
}

cmd_status() {
    local name pidfile state rc=0
    for name in munged mariadb slurmdbd slurmctld $(node_names | sed 's/^/slurmd@/'); do
        case $name in
            munged) pidfile=$MUNGE_PID ;;
            mariadb) pidfile=$MYSQL_PID ;;
            slurmd@*) pidfile=$(slurmd_pidfile "${name#slurmd@}") ;;
            *) pidfile=$RUN_DIR/$name.pid ;;
        esac
        if pid_alive "$pidfile"; then state="up (pid $(<"$pidfile"))"; else state=down; rc=1; fi
        printf '%-10s %s\n' "$name" "$state"
    done
    echo "SLURM_CONF=$SLURM_CONF"
    if pid_alive "$RUN_DIR/slurmctld.pid"; then timeout 20 sinfo || rc=1; fi
    return $rc
}

cmd_env() { echo "export SLURM_CONF=$SLURM_CONF"; }

# The cluster's own behaviour the launcher relies on (slurm/selftest): states, srun tasks, time-limit requeues,
# submitit. Needs pytest and submitit: the project's .venv when there is one.
cmd_selftest() {
    local here python
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    python=${PYTHON:-$here/../.venv/bin/python}
    [[ -x $python ]] || python=python3
    "$python" -m pytest -q -p no:cacheprovider "$here/selftest"
}

# start/stop from several shells or test sessions at once are serialised on a lock in the state folder
# (flock -o: the daemons started under it must not inherit the lock).
if [[ ${1:-} == start || ${1:-} == stop ]] && [[ -z ${HPCDISTILL_SLURM_LOCKED:-} ]]; then
    need_root
    mkdir -p "$STATE_DIR"
    HPCDISTILL_SLURM_LOCKED=1 exec flock -o -w 300 "$STATE_DIR/.lock" bash "${BASH_SOURCE[0]}" "$@"
fi

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    selftest) cmd_selftest ;;
    *) die "usage: $0 install|start [--nodes N]|stop|status|env|selftest" ;;
esac
