"""Real ``dask scheduler`` and ``dask worker`` processes, and a TCP link that can be cut.

Every process runs in its own session on loopback and is killed (the whole group) when its
context ends, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from timing import bound, wait_for

TESTS = Path(__file__).parent


def _environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class DaskProcess:
    """One ``dask`` command line, started with :meth:`start`, ended with :meth:`kill`. With
    ``ready``, :meth:`start` returns once that line is in the process's log (raising, with the
    log's end, if the process exits first or takes longer than ``bound(60)``)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, ready: str | None = None) -> None:
        self.args, self.log, self.env, self.ready = args, log, env, ready
        self.process: subprocess.Popen | None = None

    def start(self) -> DaskProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            offset = log.tell()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dask", *self.args], stdout=log, stderr=subprocess.STDOUT,
                env=_environ(self.env), start_new_session=True,
            )
        if self.ready is not None:
            self._wait_ready(offset)
        return self

    def _wait_ready(self, offset: int) -> None:
        def written() -> str:
            with open(self.log, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")

        try:
            wait_for(lambda: self.ready in written() or self.process.poll() is not None, timeout=60,
                     what=f"{self.ready!r} in {self.log}")
        except AssertionError:
            self.kill()
            raise
        if self.ready not in written():
            raise RuntimeError(f"dask {self.args[0]} exited before {self.ready!r}; its log ends:\n{written()[-8000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker's Nanny and its worker) and reap it."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            self.process.wait(bound(30))

    def __enter__(self) -> DaskProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def dask_scheduler(port: int, log: Path) -> DaskProcess:
    """``dask scheduler`` on ``port`` with the RQML preload, started once it listens (so that
    nothing started after it, a worker's listener, can take its port first)."""
    return DaskProcess(
        ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0",
         "--preload", "rqml_dask.scheduler"],
        log, ready="Scheduler at:",
    )


def rqml_worker(scheduler: str, name: str, http_port: int, directory: Path, env: dict[str, str] | None = None,
                preloads: tuple[str, ...] = ()) -> DaskProcess:
    """``dask worker`` of class RQMLWorker, the node preload (and ``preloads``), one thread, with
    its Nanny (with the node preload too: its doors on a pqtls cluster)."""
    return DaskProcess(
        ["worker", scheduler, "--worker-class", "rqml_dask.node.RQMLWorker", "--preload", "rqml_dask.node",
         "--preload-nanny", "rqml_dask.node",
         *(arg for preload in preloads for arg in ("--preload", preload)),
         "--name", name, "--nthreads", "1", "--host", "127.0.0.1", "--dashboard-address", f"127.0.0.1:{http_port}",
         "--local-directory", str(directory)],
        directory / f"{name}.log", env,
    )


def node_worker(scheduler: str, name: str, log: Path, env: dict[str, str] | None = None,
                nanny: tuple[str, ...] | None = None) -> DaskProcess:
    """``dask worker`` with the node preload and one thread; with no Nanny (killed, it stays
    dead) unless ``nanny`` is given: then a Nanny with those preloads (``--preload-nanny``)."""
    supervision = ["--no-nanny"] if nanny is None else [arg for preload in nanny for arg in ("--preload-nanny", preload)]
    return DaskProcess(
        ["worker", scheduler, *supervision, "--preload", "rqml_dask.node", "--name", name, "--nthreads", "1",
         "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"],
        log, env,
    )


def bare_worker(scheduler: str, name: str, log: Path) -> DaskProcess:
    """A stock ``dask worker`` (with its Nanny): no worker class, no preload, one thread."""
    return DaskProcess(
        ["worker", scheduler, "--name", name, "--nthreads", "1", "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"],
        log,
    )


class TcpLink:
    """A loopback TCP relay to ``target_port`` that can be cut (every connection through it
    is aborted, new ones are closed at once) and restored, or leave one connection half-open."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_off = False
        self._streams: set[asyncio.StreamWriter] = set()
        self._by_port: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        """The near end's port -> its writer and the far end's, for every connection relayed."""
        self._silent: set[asyncio.StreamWriter] = set()
        """Writers of half-open connections: never written to or closed again."""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(bound(10)), "the TCP link did not start listening"

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._streams |= {writer, up_writer}
        self._by_port[writer.get_extra_info("peername")[1]] = (writer, up_writer)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    if sink in self._silent:
                        continue  # what the near end of a half-open connection sends goes nowhere
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                if sink not in self._silent:
                    sink.transport.abort()
                self._streams.discard(sink)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self) -> None:
        """Abort every connection through the link; returns once they are aborted."""

        async def abort_all() -> None:
            self.cut_off = True
            for stream in list(self._streams):
                stream.transport.abort()
            self._streams.clear()

        asyncio.run_coroutine_threadsafe(abort_all(), self._loop).result(bound(10))

    def half_open(self, near_port: int) -> None:
        """Break the connection whose near end (the client of the link) is at ``near_port`` as
        a partition or a NAT that dropped it does: the far end is aborted, the near end stays
        open and hears nothing more (what it sends is dropped). Other connections, and new
        ones, are relayed as before."""

        async def break_far_end() -> None:
            near, far = self._by_port[near_port]
            self._silent |= {near, far}
            far.transport.abort()

        asyncio.run_coroutine_threadsafe(break_far_end(), self._loop).result(bound(10))

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(bound(5))
