"""A real single-member etcd server for tests, on free loopback ports, with fault controls.

:class:`EtcdServer` runs the ``etcd`` binary of the ``etcd`` extra (the one beside
``sys.executable``, else the one on ``PATH``) with its own data dir under ``root``. Every
wait is bounded; :meth:`stop` (also the context manager's exit) always leaves no process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from timing import bound


def etcd_binary() -> str | None:
    """The ``etcd`` executable to run, or ``None`` when there is none."""
    beside = Path(sys.executable).parent / "etcd"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member serving ``http://127.0.0.1:<client_port>``; its data persists in
    ``root/data`` across :meth:`stop`/:meth:`start`, and its log goes to ``root/etcd.log``."""

    def __init__(self, root: Path, start_timeout: float = bound(30)) -> None:
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("no etcd binary beside the interpreter or on PATH (install the etcd extra)")
        self.binary = binary
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "etcd.log"
        self.start_timeout = start_timeout
        self.client_port, self.peer_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server (on the same data dir and ports as before) and wait until it
        reports healthy; raise ``RuntimeError`` with the log's tail if it does not in time."""
        if self.running:
            return
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--name", "default",
                    "--data-dir", str(self.data_dir),
                    "--listen-client-urls", client,
                    "--advertise-client-urls", client,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"default={peer}",
                    "--log-level", "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._healthy(client):
                return
            time.sleep(0.05)
        self.kill()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"etcd did not become healthy within {self.start_timeout} s; log tail:\n{tail}")

    @staticmethod
    def _healthy(client_url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=bound(2)) as response:
                return b'"true"' in response.read()
        except OSError:
            return False

    def stop(self, timeout: float = bound(10)) -> None:
        """SIGTERM (resuming a paused server so it can exit), wait; SIGKILL after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL and reap: the abrupt end of a crash."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(bound(10))
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self.process is not None, "etcd is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None, "etcd is not running"
        self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
