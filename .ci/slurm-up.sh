#!/usr/bin/env bash
# Starts a one-node Slurm cluster on this machine for the Slurm executor's tests: installs
# Debian's slurm-wlm and munge if they are missing, writes a slurm.conf for this host, starts
# munged, slurmctld and slurmd as root, and waits until the node is idle. Idempotent: a cluster
# that is already up is left as it is. Needs root; no systemd, no cgroups, no accounting daemon
# (finished jobs go to a job-completion log, which `sacct --completion` reads).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-up: must run as root" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm-up: installing slurm-wlm and munge" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

node_idle() {
    sinfo --noheader --format=%T 2>/dev/null | grep -qx idle
}

if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && node_idle; then
    echo "slurm-up: the cluster is already up" >&2
    exit 0
fi

host=$(hostname -s)
cpus=$(nproc)
# RealMemory in MiB, less a little for the system, so that slurmd's own count is never lower.
memory=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.95 }' /proc/meminfo)

mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
cat >/etc/slurm/slurm.conf <<EOF
# One-node test cluster written by .ci/slurm-up.sh. Addresses are the loopback's, so that
# the host's name need not resolve.
ClusterName=rudder-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
JobAcctGatherType=jobacct_gather/none
# Keep finished jobs visible to squeue and scontrol for ten minutes.
MinJobAge=600
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

# munge: the package's post-install step creates the key; a bare machine may lack it.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --force
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

# Restart the Slurm daemons (by the pid files they wrote) so that they read this configuration.
for daemon in slurmd slurmctld; do
    pidfile=/run/slurm/$daemon.pid
    if [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null; then
        for _ in $(seq 100); do
            kill -0 "$(cat "$pidfile")" 2>/dev/null || break
            sleep 0.1
        done
    fi
done
slurmctld
slurmd

for _ in $(seq 300); do
    if node_idle; then
        echo "slurm-up: node $host idle ($cpus CPUs, ${memory} MiB)" >&2
        exit 0
    fi
    # A node that came back from an earlier run may be marked down until told otherwise.
    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    sleep 0.2
done
echo "slurm-up: the node did not become idle; sinfo says:" >&2
sinfo >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
