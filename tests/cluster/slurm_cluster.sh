#!/usr/bin/env bash
# A throw-away one-node SLURM cluster for the cluster test, on Debian 12 as root, without
# systemd or cgroups (slurm-wlm 22.05). Facts behind the choices: docs/cluster_test.md.
#
#   slurm_cluster.sh start   install (apt) and start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   slurm_cluster.sh stop    stop exactly the daemons that `start` started, by their PID files
#
# The cluster mirrors what profiles/slurm/config.yaml asks for, so the profile is tested as
# shipped: partitions "cpu" and "gpu" (same node), account "kinpet", and fake GPUs (a GRES
# backed by plain files: GPU jobs schedule, no CUDA device exists, jobs fall back to the CPU).
# Accounting (slurmdbd + MariaDB) is on because the executor plugin polls `sacct`, and the
# test counts the jobs with it.
set -euo pipefail

MARK="# written by kinpet tests/cluster/slurm_cluster.sh"
RUN=/run/kinpet-slurm                 # PID files of the daemons this script started
CONF=/etc/slurm/slurm.conf
FAKE_GPUS=${FAKE_GPUS:-2}
NODE="$(hostname -s)"

log() { echo "[slurm_cluster] $*" >&2; }

stop_cluster() {
    # Children first (slurmd, slurmctld), the databases last; never by name, only by PID file.
    local pf pid
    for pf in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid" "$RUN/mariadbd.pid" \
        "$RUN/munged.pid"; do
        [[ -s "$pf" ]] || continue
        pid=$(cat "$pf")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            log "stopped $(basename "$pf" .pid) (PID $pid)"
        fi
        rm -f "$pf"
    done
}

install_packages() {
    local pkgs="slurm-wlm munge slurmdbd mariadb-server" missing="" p
    for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    [[ -z "$missing" ]] && return 0
    log "apt-get install$missing"
    # Package scripts must not start daemons on their own (we start and stop ours by PID):
    # policy-rc.d exit 101 forbids it. Only add one if the machine has none.
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    return 0
}

wait_for() { # wait_for SECONDS COMMAND...: poll until the command succeeds
    local n=$(($1 * 4)); shift
    for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    log "timed out waiting for: $*"
    return 1
}

start_cluster() {
    # Never overwrite a real cluster's configuration.
    if [[ -e "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script: refusing to touch it"
        exit 3
    fi
    stop_cluster # leftovers of an interrupted earlier run
    install_packages

    mkdir -p "$RUN" /etc/slurm /run/munge /var/log/munge /var/lib/munge /run/slurm \
        /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/mysqld
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chown mysql:mysql /run/mysqld
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi

    # Fake GPUs: slurmd counts a GPU per File=, and a plain file is enough.
    : >/etc/slurm/gres.conf
    for i in $(seq 0 $((FAKE_GPUS - 1))); do
        touch "$RUN/fakegpu$i"
        echo "NodeName=$NODE Name=gpu Type=fake File=$RUN/fakegpu$i" >>/etc/slurm/gres.conf
    done

    # The node claims at least 8 CPUs and 64 GiB, whatever the machine has (config_overrides
    # below), so that the profile's requests for real data (e.g. 32 GB for predict) still
    # schedule here; the tiny test jobs use a fraction of that.
    local cpus mem_mb=65536
    cpus=$(nproc)
    ((cpus < 8)) && cpus=8
    cat >"$CONF" <<CONF
$MARK
ClusterName=kinpettest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# no cgroups on this machine: track processes by parent PID, no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
# trust the node description below rather than the hardware (see CPUs/RealMemory)
SlurmdParameters=config_overrides
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# jobs must name an existing account (-A), as on most real clusters
AccountingStorageEnforce=associations
# keep the plugin's job comment (rule and wildcards) and GPU counts for sacct
AccountingStoreFlags=job_comment
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MinJobAge=300
# a job without --mem would otherwise reserve the whole node's memory
DefMemPerCPU=1000
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:fake:$FAKE_GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
CONF

    cat >/etc/slurm/slurmdbd.conf <<DBD
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=kinpet-test-only
StorageLoc=slurm_acct_db
DBD
    chmod 600 /etc/slurm/slurmdbd.conf

    # munged and mariadbd drop to their own users and write their PID files where those
    # users may; we copy the PIDs into $RUN, the list of what `stop` ends.
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$RUN/munged.pid"

    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
        --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
        >/var/log/slurm/mariadb.log 2>&1 </dev/null &
    wait_for 60 mariadb -e 'select 1'
    cp /run/mysqld/mysqld.pid "$RUN/mariadbd.pid"
    mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'kinpet-test-only';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    /usr/sbin/slurmdbd
    wait_for 60 sacctmgr -n show cluster
    sacctmgr -i -Q add cluster kinpettest >/dev/null 2>&1 || true
    sacctmgr -i -Q add account kinpet Description=kinpet Organization=kinpet >/dev/null 2>&1 || true
    sacctmgr -i -Q add user "$(id -un)" Account=kinpet >/dev/null 2>&1 || true

    /usr/sbin/slurmctld
    /usr/sbin/slurmd
    wait_for 60 bash -c "sinfo -h -o '%T' | grep -qE 'idle|mixed|allocated|drain'"
    # a node drained by an earlier bad configuration keeps that state across restarts
    if sinfo -h -o '%T' | grep -qE 'drain|down|inval'; then
        scontrol update nodename="$NODE" state=resume || true
    fi
    wait_for 30 bash -c "sinfo -h -o '%T' | grep -qE 'idle|mixed'"
    sinfo -o '%P %a %D %T %N %c %m %G' >&2
}

case "${1:-}" in
start) start_cluster ;;
stop) stop_cluster ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
