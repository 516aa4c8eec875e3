"""The etcd shared store: slots and done markers as etcd keys, written by compare-and-swap.

Keys are ``{prefix}slots/{key}`` and ``{prefix}done/{key}``. A checkpoint put reads the slot
and its ``mod_revision``, merges, and writes in a transaction that succeeds only if the key
is unchanged (``version == 0`` for a key not yet there); a lost race re-reads the slot from
the failed transaction and merges again. A done marker is put in a transaction on
``version == 0``, so the first outcome stays.

The client is ``aetcd`` (gRPC, asyncio) on an event loop of the store's own, in a daemon
thread; the public methods are synchronous and thread-safe. Every operation is bounded by
``timeout`` seconds: a stopped server fails a call at once, a hung one at the deadline,
both as :class:`StoreUnavailable`. gRPC reconnects by itself; the channel retries about
every second, so the store works again within about a second of the server's return.
A write that timed out may still have been applied; retrying it is safe (the retry is then
refused as not newer, or, for a done marker, returns ``False``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import aetcd

from rqml_dask.stores.base import RecordStore, SlotEntry, StoreUnavailable, decode_slot, merge_slot

T = TypeVar("T")

CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}
"""gRPC's default reconnect backoff grows to 2 minutes over a long outage, and calls fail at
once until the next attempt; capping it lets the store notice a returned server quickly."""

_UNAVAILABLE = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError)


class EtcdStore(RecordStore):
    scheme = "etcd"

    def __init__(self, host: str, port: int, prefix: str = "rqml/", timeout: float = 2.0) -> None:
        self.url = f"etcd://{host}:{port}"
        self.prefix = prefix
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"EtcdStore {self.url}", daemon=True)
        self._thread.start()
        self._client = aetcd.Client(host, port, timeout=timeout, options=CHANNEL_OPTIONS)
        self._txn = self._client.transactions

    def _slot(self, key: str) -> bytes:
        return f"{self.prefix}slots/{key}".encode()

    def _done(self, key: str) -> bytes:
        return f"{self.prefix}done/{key}".encode()

    def _run(self, operation: str, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the store's loop, bounded by ``timeout``; connection failures and
        timeouts become :class:`StoreUnavailable` naming the URL and ``operation``."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, self.timeout), self._loop)
        try:
            # The margin lets wait_for's own deadline fire first; this one guards a stuck loop.
            return future.result(self.timeout + 1.0)
        except _UNAVAILABLE as exc:
            future.cancel()
            detail = str(exc) or f"no answer within {self.timeout} s"
            raise StoreUnavailable(f"{self.url}: {operation} failed: {type(exc).__name__}: {detail}") from exc

    def put_checkpoint(self, key: str, entry: SlotEntry) -> list[SlotEntry] | None:
        return self._run(f"put_checkpoint({key!r})", self._put_checkpoint(self._slot(key), entry))

    async def _put_checkpoint(self, name: bytes, entry: SlotEntry) -> list[SlotEntry] | None:
        current = await self._client.get(name)
        while True:
            merged = merge_slot(current.value if current else None, entry)
            if merged is None:
                return None
            unchanged = (
                self._txn.mod(name) == current.mod_revision if current else self._txn.version(name) == 0
            )
            succeeded, responses = await self._client.transaction(
                compare=[unchanged],
                success=[self._txn.put(name, merged[0])],
                failure=[self._txn.get(name)],
            )
            if succeeded:
                return merged[1]
            found = responses[0]  # the failure branch's read: [(value, Get)], empty if deleted
            current = found[0][1] if found else None

    def checkpoints(self, key: str) -> list[SlotEntry]:
        found = self._run(f"checkpoints({key!r})", self._client.get(self._slot(key)))
        return decode_slot(found.value if found else None)

    def put_done(self, key: str, outcome: bytes) -> bool:
        name = self._done(key)
        succeeded, _ = self._run(
            f"put_done({key!r})",
            self._client.transaction(
                compare=[self._txn.version(name) == 0], success=[self._txn.put(name, outcome)], failure=[]
            ),
        )
        return succeeded

    def done(self, key: str) -> bytes | None:
        found = self._run(f"done({key!r})", self._client.get(self._done(key)))
        return found.value if found else None

    def forget(self, key: str) -> None:
        self._run(f"forget({key!r})", self._client.delete(self._slot(key)))

    def close(self) -> None:
        """Close the client and stop the loop thread (bounded by ``timeout``); idempotent."""
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(self.timeout)
        except TimeoutError:
            pass  # the loop stops below regardless
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout)
            if not self._thread.is_alive():
                self._loop.close()
