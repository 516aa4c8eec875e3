"""The Consul shared store: slots and done markers as Consul KV keys, written by check-and-set.

Keys are ``{prefix}slots/{key}`` and ``{prefix}done/{key}``. A checkpoint put reads the slot
and its ``ModifyIndex``, merges, and writes with ``cas=ModifyIndex`` (``cas=0`` for a key
not yet there: create only); a refused write means another writer got there first, so the
slot is read and merged again. A done marker is put with ``cas=0``, so the first outcome
stays.

The client is ``py-consul`` (HTTP, synchronous); its ``requests`` session is not documented
as thread-safe, so calls through it are serialised. Every request is bounded by
``timeout`` seconds; a refused or timed-out connection and any error the agent answers
with (e.g. 500 "No cluster leader", 403 ACL denied) are :class:`StoreUnavailable`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import consul
import requests

from rqml_dask.stores.base import RecordStore, SlotEntry, StoreUnavailable, decode_slot, merge_slot

T = TypeVar("T")


class ConsulStore(RecordStore):
    scheme = "consul"

    def __init__(self, host: str, port: int, prefix: str = "rqml/", timeout: float = 2.0) -> None:
        self.url = f"consul://{host}:{port}"
        self.prefix = prefix
        self.timeout = timeout
        self._client = consul.Consul(host=host, port=port, connections_timeout=timeout)
        self._lock = threading.Lock()

    def _slot(self, key: str) -> str:
        return f"{self.prefix}slots/{key}"

    def _done(self, key: str) -> str:
        return f"{self.prefix}done/{key}"

    def _run(self, operation: str, call: Callable[[], T]) -> T:
        """``call()`` under the client lock; transport and agent errors become
        :class:`StoreUnavailable` naming the URL and ``operation``."""
        try:
            with self._lock:
                return call()
        except (requests.RequestException, consul.ConsulException) as exc:
            raise StoreUnavailable(f"{self.url}: {operation} failed: {type(exc).__name__}: {exc}") from exc

    def _get(self, name: str) -> dict[str, Any] | None:
        """The KV item (``Value`` as bytes, ``ModifyIndex``) or ``None``."""
        _, item = self._client.kv.get(name)
        return item

    def put_checkpoint(self, key: str, entry: SlotEntry) -> list[SlotEntry] | None:
        name = self._slot(key)
        while True:
            item = self._run(f"put_checkpoint({key!r})", lambda: self._get(name))
            merged = merge_slot(item["Value"] if item else None, entry)
            if merged is None:
                return None
            cas = item["ModifyIndex"] if item else 0
            if self._run(f"put_checkpoint({key!r})", lambda: self._client.kv.put(name, merged[0], cas=cas)):
                return merged[1]

    def checkpoints(self, key: str) -> list[SlotEntry]:
        item = self._run(f"checkpoints({key!r})", lambda: self._get(self._slot(key)))
        return decode_slot(item["Value"] if item else None)

    def put_done(self, key: str, outcome: bytes) -> bool:
        return self._run(f"put_done({key!r})", lambda: self._client.kv.put(self._done(key), outcome, cas=0))

    def done(self, key: str) -> bytes | None:
        item = self._run(f"done({key!r})", lambda: self._get(self._done(key)))
        if item is None:
            return None
        return item["Value"] or b""  # Consul returns an empty value as null

    def forget(self, key: str) -> None:
        self._run(f"forget({key!r})", lambda: self._client.kv.delete(self._slot(key)))

    def close(self) -> None:
        self._client.http.session.close()
