"""A real single-node SLURM (slurmctld + slurmd + munge, Debian packages) for the tests.

Installs the packages with apt-get when they are missing (needs root), writes a slurm.conf with
state, spool and logs under a temporary directory, starts the daemons, and stops them by their
pid files at the end. ``start`` returns None with the reason when this machine cannot do it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _have() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"))


def install() -> str | None:
    """Install SLURM and munge if missing; returns why not, or None when they are there."""
    if _have():
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root (apt-get install slurmctld slurmd munge)"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            return f"{' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None if _have() else "SLURM binaries still missing after apt-get install"


class Cluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.pids = []

    def write_conf(self) -> None:
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 ** 20
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        r = self.root
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=prores-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPort=6917
SlurmdPort=6918
MpiDefault=none
JobRequeue=1
KillWait=60
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
NodeName={host} CPUs={cpus} RealMemory={int(mem_mb * 0.8)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> str | None:
        """Start munge and the two daemons; returns why not, or None once the node is idle."""
        if not os.path.exists("/etc/munge/munge.key"):
            r = subprocess.run(["mungekey", "-c"], capture_output=True, text=True)
            if r.returncode:
                return f"mungekey -c failed: {r.stderr.strip()}"
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)
            r = subprocess.run(["munged", "--force"], capture_output=True, text=True)
            if r.returncode:
                return f"munged failed: {r.stderr.strip()}"
        self.write_conf()
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([daemon, "-f", self.conf], capture_output=True, text=True, env=self.env)
            if r.returncode:
                return f"{daemon} failed to start: {r.stderr.strip()[-300:]}"
        t0 = time.time()
        while time.time() - t0 < 60:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
            if out.strip() == "idle":
                return None
            time.sleep(1)
        return f"the SLURM node never became idle (sinfo: {out.strip()!r}); see {self.root}/log"

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pidfile = os.path.join(self.root, f"{name}.pid")
            try:
                pid = int(open(pidfile).read().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except (OSError, ValueError):
                pass

    def run(self, *cmd, check=True) -> str:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=120)
        if check and r.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed: {r.stderr or r.stdout}")
        return r.stdout

    def job(self, job_id: str) -> dict:
        """scontrol show job, as a dict of its KEY=VALUE fields."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields = {}
        for word in out.split():
            if "=" in word:
                k, v = word.split("=", 1)
                fields[k] = v
        return fields
