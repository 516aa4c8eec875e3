"""One live run per output store.

A run (``rqml run``, and :meth:`Pipeline.run <rqml_dask.pipeline.Pipeline.run>` from a
Python session) holds ``STORE.lock`` (beside the output store) for as long as it runs: an
exclusive ``flock`` on it, which the kernel releases when the process ends however it ends,
so a lock left by a run that died is taken over by the next run with no clean-up. The file
says who holds it (pid, host, since when) for the message a second run is refused with,
whether it comes from another process or another thread of this one; the thread that holds
it may take it again (``rqml run`` holds it from before it reads its input, and its
pipeline's ``run`` takes it inside). The lock is advisory: it keeps runs from runs, not
other writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class OutputBusy(RuntimeError):
    """Another live ``rqml run`` is writing this output store."""


def lock_path(store: Path) -> Path:
    """Where the lock of output ``store`` lives: ``STORE.lock``, beside it."""
    return store.with_name(store.name + ".lock")


_HELD: dict[Path, int] = {}
"""The locks this process holds: path -> the holding thread's identifier."""


@contextlib.contextmanager
def writing(store: Path) -> Iterator[None]:
    """Hold the lock of output ``store`` while the context is open (its file is removed at
    the end); :class:`OutputBusy`, naming the holder, if another live process or another
    thread of this one holds it. Within the thread that holds it, a nested ``writing`` of
    the same store holds nothing more."""
    path = lock_path(Path(os.path.abspath(store)))
    if _HELD.get(path) == threading.get_ident():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"{store} is being written by another rqml run ({_holder(path)}): wait for it to end, "
                             f"or give this pipeline another output.store") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the holder removed the file as we opened it: try again on the new one
        os.close(fd)
    _HELD[path] = threading.get_ident()
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        yield
    finally:
        del _HELD[path]
        os.unlink(path)  # while still held: a waiting opener sees another inode and tries again
        os.close(fd)


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words, as far as its file says."""
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']}, since {since}; its lock: {path}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its lock: {path}"
