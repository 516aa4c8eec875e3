"""The record-store interface every checkpoint store implements, and its slot encoding.

A store keeps, per task key, a *slot*: the ``KEEP`` newest checkpoint records of that task,
newest first, each ranked by ``(iteration, node)``. A put succeeds only if its record
outranks the newest one stored, so a late or replayed older checkpoint never overwrites a
newer one; every store does the read-merge-write of a slot atomically (an LMDB write
transaction, an etcd compare-and-swap on the key's revision, a Consul check-and-set).
Beside slots a store keeps *done markers*: the outcome of a finished task, put once.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import msgpack

KEEP = 2
"""Records kept per task: the newest, and the previous one to fall back to if it is damaged."""


class StoreUnavailable(ConnectionError):
    """The store cannot be reached now; the caller keeps the write and retries later."""


@dataclass(frozen=True)
class SlotEntry:
    iteration: int
    node: str
    record: bytes

    @property
    def rank(self) -> tuple[int, str]:
        return (self.iteration, self.node)


def decode_slot(value: bytes | None) -> list[SlotEntry]:
    if not value:
        return []
    return [SlotEntry(int(i), str(n), bytes(r)) for i, n, r in msgpack.unpackb(value)]


def encode_slot(entries: list[SlotEntry]) -> bytes:
    return msgpack.packb([[e.iteration, e.node, e.record] for e in entries])


def merge_slot(value: bytes | None, entry: SlotEntry) -> tuple[bytes, list[SlotEntry]] | None:
    """The slot with ``entry`` added as newest, and the entries it pushed out; ``None`` if the
    slot already holds a record of equal or higher rank."""
    entries = decode_slot(value)
    if entries and entries[0].rank >= entry.rank:
        return None
    entries = [entry, *entries]
    return encode_slot(entries[:KEEP]), entries[KEEP:]


class RecordStore(abc.ABC):
    """Checkpoint records and done markers by task key. Implementations are thread-safe and
    raise :class:`StoreUnavailable` when the backing service cannot be reached."""

    scheme: str
    url: str

    @abc.abstractmethod
    def put_checkpoint(self, key: str, entry: SlotEntry) -> list[SlotEntry] | None:
        """Store ``entry`` if it outranks the task's newest record; return the entries it
        evicted (older than the ``KEEP`` newest), or ``None`` when it was refused."""

    @abc.abstractmethod
    def checkpoints(self, key: str) -> list[SlotEntry]:
        """The task's stored records, newest first."""

    @abc.abstractmethod
    def put_done(self, key: str, outcome: bytes) -> bool:
        """Record a task's outcome unless one is recorded already; ``False`` then."""

    @abc.abstractmethod
    def done(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    def forget(self, key: str) -> None:
        """Drop the task's checkpoint records (its done marker stays)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""
