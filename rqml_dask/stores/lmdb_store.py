"""The node-local store: one LMDB environment per host path, shared by its worker processes.

Three databases: ``slots`` (checkpoint records by task key), ``done`` (outcomes) and
``pending`` (task keys whose newest record the shared store has not acknowledged yet, so a
restarted worker still replicates them). LMDB serialises writers across processes, so a
slot's read-merge-write inside one write transaction is atomic. Commits flush the data but
not the meta page (``metasync=False``): a machine crash may undo the last commit, never
corrupt the environment; a process crash (the common failure) loses nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import lmdb

from rqml_dask.config import node_settings
from rqml_dask.stores.base import RecordStore, SlotEntry, decode_slot, merge_slot

_environments: dict[Path, tuple[lmdb.Environment, int]] = {}
"""The environments open in this process, by resolved path, and how many holders each has."""
_environments_lock = threading.Lock()


def open_environment(path: Path) -> lmdb.Environment:
    """LMDB allows one open environment per path per process: share it, one more holder of
    it (each holder releases it with :func:`close_environment`). Its map size (the address
    space reserved, sparse: disk use follows the data) is ``rqml.node.lmdb-map-size``."""
    path = path.resolve()
    with _environments_lock:
        env, holders = _environments.get(path, (None, 0))
        if env is None:
            path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(str(path), map_size=node_settings().lmdb_map_size, max_dbs=4, max_spare_txns=4, metasync=False)
        _environments[path] = (env, holders + 1)
        return env


def close_environment(path: Path) -> None:
    """Release one holder's share of the environment of ``path`` (a no-op if this process
    has none open): the last holder's release closes it, with its map and files."""
    path = path.resolve()
    with _environments_lock:
        env, holders = _environments.pop(path, (None, 0))
        if env is not None and holders > 1:
            _environments[path] = (env, holders - 1)
            return
    if env is not None:
        env.close()


def open_databases(env: lmdb.Environment, *names: bytes) -> list:
    """The named databases of ``env`` (created if missing), opened in a write transaction of
    their own: ``Environment.open_db`` without one waits for LMDB's write lock holding the
    GIL, and deadlocks with any thread of the process inside a write transaction (it needs the
    GIL to finish it), e.g. a node's checkpoint writer while a task opens another pipeline's
    store."""
    with env.begin(write=True) as txn:
        return [env.open_db(name, txn=txn) for name in names]


class LMDBStore(RecordStore):
    scheme = "lmdb"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"lmdb://{self.path}"
        self.env = open_environment(self.path)
        self._slots, self._done, self._pending = open_databases(self.env, b"slots", b"done", b"pending")
        self._closed = False

    def close(self) -> None:
        """Release this store's share of its environment (closed with the last share in the
        process); the store is not used afterwards. Idempotent."""
        if not self._closed:
            self._closed = True
            close_environment(self.path)

    def put_checkpoint(self, key: str, entry: SlotEntry) -> list[SlotEntry] | None:
        with self.env.begin(write=True, db=self._slots) as txn:
            merged = merge_slot(txn.get(key.encode()), entry)
            if merged is None:
                return None
            txn.put(key.encode(), merged[0])
            return merged[1]

    def checkpoints(self, key: str) -> list[SlotEntry]:
        with self.env.begin(db=self._slots) as txn:
            return decode_slot(txn.get(key.encode()))

    def put_done(self, key: str, outcome: bytes) -> bool:
        with self.env.begin(write=True, db=self._done) as txn:
            return txn.put(key.encode(), outcome, overwrite=False)

    def done(self, key: str) -> bytes | None:
        with self.env.begin(db=self._done) as txn:
            value = txn.get(key.encode())
            return bytes(value) if value is not None else None

    def forget(self, key: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(key.encode(), db=self._slots)
            txn.delete(key.encode(), db=self._pending)

    def mark_pending(self, key: str) -> None:
        with self.env.begin(write=True, db=self._pending) as txn:
            txn.put(key.encode(), b"")

    def clear_pending(self, key: str) -> None:
        with self.env.begin(write=True, db=self._pending) as txn:
            txn.delete(key.encode())

    def pending(self) -> list[str]:
        with self.env.begin(db=self._pending) as txn:
            return [k.decode() for k, _ in txn.cursor()]
