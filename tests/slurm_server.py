"""A real one-host Slurm cluster for tests: ``munged``, ``slurmctld`` and ``slurmd`` of
Debian's ``slurm-wlm`` and ``munge`` (``scripts/test`` installs them), on free loopback
ports, with a generated ``slurm.conf`` and munge key under ``root``.

:class:`OneHostSlurm` starts the three daemons as the current user (root: slurmd runs jobs
as their owner) and waits until the node is idle; its :attr:`environ` points Slurm's commands
(``sbatch``, ``squeue``, ``scancel``) at this cluster. :meth:`stop` cancels every job and
stops the daemons, whatever state they are in. :func:`unavailable` says why Slurm cannot
start here (``None`` where it can).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from etcd_server import free_port
from timing import bound

DAEMONS = ("munged", "slurmctld", "slurmd")


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin") if os.access(p := Path(d) / name, os.X_OK)), None)


def unavailable() -> str | None:
    """Why a one-host Slurm cannot start on this machine, or ``None``."""
    missing = [name for name in (*DAEMONS, "sbatch", "squeue", "scancel") if _binary(name) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge (scripts/test does, as root)"
    if os.geteuid() != 0:
        return "a one-host Slurm needs root here (slurmd starts jobs as their owner)"
    return None


class OneHostSlurm:
    """One partition (``debug``) of one node (this host, ``CPUs`` = its cores, jobs may share
    them) served by daemons whose state, logs and sockets are all under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "run" / "munge.sock"
        self.environ = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: dict[str, Path] = {}

    def __enter__(self) -> "OneHostSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._write_conf()
        run, log = self.root / "run", self.root / "log"
        self._pids = {"munged": run / "munged.pid", "slurmctld": run / "slurmctld.pid", "slurmd": run / "slurmd.pid"}
        self._run("munged", "--force", f"--key-file={key}", f"--socket={self.socket}", f"--pid-file={run / 'munged.pid'}",
                  f"--log-file={log / 'munged.log'}", f"--seed-file={run / 'munge.seed'}")
        self._run("slurmctld", "-i")  # -i: ignore state a crashed controller left (there is none: a fresh root)
        self._run("slurmd")
        self._wait(lambda: "idle" in self.sinfo(), "the node idle in sinfo")

    def sinfo(self) -> str:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.environ, timeout=bound(10))
        return done.stdout

    def jobs(self) -> list[str]:
        """The ids of the jobs running or pending, oldest first."""
        done = subprocess.run(["squeue", "-h", "-o", "%i", "--sort", "i"], capture_output=True, text=True,
                              env=self.environ, timeout=bound(10), check=True)
        return done.stdout.split()

    def cancel(self, job: str) -> None:
        subprocess.run(["scancel", job], env=self.environ, timeout=bound(10), check=True)

    def stop(self) -> None:
        if self.conf.exists():
            subprocess.run(["scancel", "--user", str(os.getuid())], env=self.environ, timeout=bound(10), capture_output=True)
        for daemon in reversed(DAEMONS):
            pid_file = self._pids.get(daemon)
            if pid_file is None or not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + bound(10)
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.05)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            except (ValueError, IndexError, ProcessLookupError):
                pass

    def _run(self, daemon: str, *args: str) -> None:
        done = subprocess.run([_binary(daemon), *args], env=self.environ, capture_output=True, text=True, timeout=bound(30))
        if done.returncode != 0:
            raise RuntimeError(f"{daemon} did not start ({done.returncode}): {done.stderr.strip()}; logs in {self.root / 'log'}")

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + bound(30)
        while not ready():
            if time.monotonic() > deadline:
                logs = "\n".join(f"{p.name}: {p.read_text()[-800:]}" for p in sorted((self.root / "log").glob("*.log")))
                raise TimeoutError(f"Slurm: no {what} within {bound(30):g} s\n{logs}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        cpus = os.cpu_count() or 1
        memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
        root, user = self.root, "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        self.conf.write_text(f"""\
ClusterName=rqmltest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
