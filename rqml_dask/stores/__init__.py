"""Checkpoint record stores, opened by URL.

``lmdb://PATH`` is the node-local store (:class:`LMDBStore`); ``etcd://HOST:PORT`` and
``consul://HOST:PORT`` are shared stores every node reaches. All implement
:class:`RecordStore`: a task's ``KEEP`` newest records, newest first, where an older record
never replaces a newer one, and a done marker put once. The etcd and Consul clients are
optional extras (``rqml-dask[etcd]``, ``rqml-dask[consul]``), imported only when such a URL
is opened.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from rqml_dask.stores.base import RecordStore, SlotEntry, StoreUnavailable
from rqml_dask.stores.lmdb_store import LMDBStore

__all__ = ["LMDBStore", "RecordStore", "SlotEntry", "StoreUnavailable", "open_store"]

ACCEPTED = "lmdb://PATH, etcd://HOST:PORT or consul://HOST:PORT"


def open_store(url: str) -> RecordStore:
    """The store ``url`` names; ``ValueError`` naming ``url`` and the accepted forms if it
    names none."""
    scheme, _, rest = url.partition("://")
    if scheme == "lmdb" and rest:
        return LMDBStore(rest)
    if scheme in ("etcd", "consul"):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.hostname and port and rest == parts.netloc:
            if scheme == "etcd":
                from rqml_dask.stores.etcd_store import EtcdStore

                return EtcdStore(parts.hostname, port)
            from rqml_dask.stores.consul_store import ConsulStore

            return ConsulStore(parts.hostname, port)
    raise ValueError(f"unsupported store URL {url!r}: expected {ACCEPTED}")
