"""The record stores: slot semantics on every backend, and real faults (racing writer
processes, a stopped or hung etcd server, LMDB shared between processes)."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aetcd
import pytest
from etcd_server import free_port
from timing import bound

from rqml_dask.stores import RecordStore, SlotEntry, StoreUnavailable, open_store
from rqml_dask.stores.base import KEEP, decode_slot
from rqml_dask.stores.consul_store import ConsulStore

KEY = "tile 3/x@0123abcd"
"""A task key with a space and a slash: each backend must keep it whole."""

NO_CONSUL = "no Consul agent on PATH (none is installable on this machine)"

Rank = tuple[int, str]


@pytest.fixture
def consul_url(tmp_path):
    """``consul://`` URL of a dev-mode agent on free loopback ports; skipped without one."""
    binary = shutil.which("consul")
    if binary is None:
        pytest.skip(NO_CONSUL)
    http = free_port()
    # Every port free or off, so the agent runs beside anything (-grpc-tls-port: Consul >= 1.14).
    ports = {"-http-port": http, "-dns-port": -1, "-grpc-port": -1, "-grpc-tls-port": -1,
             "-server-port": free_port(), "-serf-lan-port": free_port(), "-serf-wan-port": free_port()}
    log = tmp_path / "consul.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [binary, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
             *(f"{flag}={port}" for flag, port in ports.items())],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + bound(30)
        while True:
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/status/leader", timeout=1) as r:
                    if r.read().strip(b'"\n'):
                        break
            except OSError:
                pass
            time.sleep(0.1)
        yield f"consul://127.0.0.1:{http}"
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)


@pytest.fixture(params=["lmdb", pytest.param("etcd", marks=pytest.mark.etcd), "consul"])
def store(request, tmp_path):
    if request.param == "lmdb":
        url = f"lmdb://{tmp_path / 'lmdb'}"
    elif request.param == "etcd":
        url = request.getfixturevalue("etcd").url
    else:
        url = request.getfixturevalue("consul_url")
    s = open_store(url)
    yield s
    s.close()


def entry(iteration: int, node: str = "n") -> SlotEntry:
    return SlotEntry(iteration, node, f"{node}:{iteration}".encode())


def ranks(entries: list[SlotEntry] | None) -> list[Rank] | None:
    return None if entries is None else [e.rank for e in entries]


# --- slot semantics, every backend --------------------------------------------------------


def test_newest_iteration_wins(store: RecordStore) -> None:
    assert store.checkpoints(KEY) == []
    assert store.put_checkpoint(KEY, entry(5)) == []
    assert store.put_checkpoint(KEY, entry(5)) is None  # equal rank: a replay
    assert store.put_checkpoint(KEY, entry(4)) is None  # older
    assert store.checkpoints(KEY) == [entry(5)]
    assert store.put_checkpoint(KEY, entry(6)) == []
    assert store.checkpoints(KEY) == [entry(6), entry(5)]


def test_keep_evicts_oldest(store: RecordStore) -> None:
    evicted = [ranks(store.put_checkpoint(KEY, entry(i))) for i in range(1, KEEP + 3)]
    assert evicted == [[]] * KEEP + [[(1, "n")], [(2, "n")]]
    assert ranks(store.checkpoints(KEY)) == [(i, "n") for i in range(KEEP + 2, 2, -1)]
    assert all(e.record == f"n:{e.iteration}".encode() for e in store.checkpoints(KEY))


def test_rank_is_iteration_then_node(store: RecordStore) -> None:
    assert store.put_checkpoint(KEY, entry(7, "a")) == []
    assert store.put_checkpoint(KEY, entry(7, "b")) == []  # same iteration, higher node
    assert store.put_checkpoint(KEY, entry(7, "a")) is None
    assert store.put_checkpoint(KEY, entry(6, "z")) is None  # a higher node does not beat iteration
    assert ranks(store.checkpoints(KEY)) == [(7, "b"), (7, "a")]


def test_done_is_put_once(store: RecordStore) -> None:
    assert store.done(KEY) is None
    assert store.put_done(KEY, b"first") is True
    assert store.put_done(KEY, b"second") is False
    assert store.done(KEY) == b"first"
    assert store.put_done("empty", b"") is True
    assert store.done("empty") == b""


def test_forget_keeps_done(store: RecordStore) -> None:
    store.put_checkpoint(KEY, entry(3))
    store.put_done(KEY, b"outcome")
    store.forget(KEY)
    store.forget("never-written")
    assert store.checkpoints(KEY) == []
    assert store.done(KEY) == b"outcome"
    assert store.put_checkpoint(KEY, entry(1)) == []  # a fresh slot


def test_keys_are_independent(store: RecordStore) -> None:
    store.put_checkpoint("a", entry(9))
    assert store.put_checkpoint("b", entry(1)) == []
    store.put_done("a", b"x")
    store.forget("a")
    assert store.checkpoints("b") == [entry(1)]
    assert store.done("b") is None
    assert store.checkpoints("a") == []


# --- open_store ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://x", "etcd://nohost", "consul://h:notaport", "lmdb://", "etcd://h:1/extra"])
def test_open_store_rejects(url: str) -> None:
    expected = f"{url!r}: expected lmdb://PATH, etcd://HOST:PORT or consul://HOST:PORT"
    with pytest.raises(ValueError, match=re.escape(expected)):
        open_store(url)


def test_consul_unreachable_agent_is_unavailable() -> None:
    store = open_store("consul://127.0.0.1:1")
    assert isinstance(store, ConsulStore) and store.url == "consul://127.0.0.1:1"
    with pytest.raises(StoreUnavailable, match=r"consul://127\.0\.0\.1:1: checkpoints"):
        store.checkpoints(KEY)
    store.close()


# --- racing writer processes --------------------------------------------------------------


def _writer(url: str, keys: list[str], iterations: list[int], node: str, barrier, results) -> None:
    """Put ``iterations`` of every key as fast as possible; report (key, iteration, evicted
    ranks or None if refused) for every put."""
    store = open_store(url)
    barrier.wait(bound(60))
    report = []
    for i in iterations:
        for key in keys:
            report.append((key, i, ranks(store.put_checkpoint(key, entry(i, node)))))
    store.close()
    results.put((node, report))


def _race(url: str, keys: list[str], writers: dict[str, list[int]]) -> dict[str, list]:
    """Run one spawned ``_writer`` process per ``writers`` item, released together; their
    reports by node."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(writers)), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, keys, iterations, node, barrier, results))
        for node, iterations in writers.items()
    ]
    for p in procs:
        p.start()
    try:
        reports = dict(results.get(timeout=bound(120)) for _ in procs)
        for p in procs:
            p.join(bound(30))
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(bound(10))
    return reports


def _check_accounting(store: RecordStore, key: str, reports: dict[str, list]) -> list[Rank]:
    """Every accepted put is in the slot or was evicted by exactly one later put (no lost
    update); the slot is the ``KEEP`` highest accepted ranks and starts with the highest rank
    ever put. Returns the accepted ranks."""
    put, accepted, evicted = [], [], Counter()
    for node, report in reports.items():
        for k, i, out in report:
            if k == key:
                put.append((i, node))
                if out is not None:
                    accepted.append((i, node))
                    evicted.update(out)
    slot = store.checkpoints(key)
    assert [e.record for e in slot] == [f"{n}:{i}".encode() for i, n in ranks(slot)]
    assert ranks(slot) == sorted(accepted, reverse=True)[:KEEP]
    assert ranks(slot)[0] == max(put)
    assert Counter(accepted) == evicted + Counter(ranks(slot))
    return accepted


async def _slot_history(port: int, name: bytes, until: int) -> list[list[Rank]]:
    """Every value ``name`` held up to revision ``until``, oldest first, from a watch that
    replays the key's history from revision 1."""
    history = []
    async with aetcd.Client("127.0.0.1", port, timeout=bound(5)) as client:
        watch = await client.watch(name, start_revision=1)
        async for event in watch:
            assert event.kind == "PUT"
            history.append(ranks(decode_slot(event.kv.value)))
            if event.kv.mod_revision >= until:
                break
        await watch.cancel()
    return history


@pytest.mark.etcd
def test_etcd_writer_processes_race(etcd) -> None:
    reports = _race(etcd.url, [KEY], {"even": list(range(0, 201, 2)), "odd": list(range(1, 200, 2))})
    store = open_store(etcd.url)
    accepted = _check_accounting(store, KEY, reports)
    assert ranks(store.checkpoints(KEY))[0] == (200, "even")

    async def read() -> list[list[Rank]]:
        async with aetcd.Client("127.0.0.1", etcd.client_port, timeout=bound(5)) as client:
            current = await client.get(f"rqml/slots/{KEY}".encode())
        return await asyncio.wait_for(_slot_history(etcd.client_port, current.key, current.mod_revision), bound(30))

    history = asyncio.run(read())
    # One write per accepted put, each adding a strictly newer record to the front of the
    # previous slot: a lower iteration never replaced a higher one, nothing was lost.
    assert len(history) == len(accepted)
    for before, after in zip([[], *history], history):
        assert after == ([after[0], *before])[:KEEP]
        assert not before or after[0] > before[0]
    # The writers really interleaved (otherwise this test proved nothing about races).
    newest_nodes = [slot[0][1] for slot in history]
    assert sum(a != b for a, b in zip(newest_nodes, newest_nodes[1:])) >= 4
    store.close()


@pytest.mark.etcd
def test_etcd_store_shared_by_threads(etcd) -> None:
    """One store object used by several threads at once, beside a second store in the same
    process (each has its own event loop)."""
    stores = [open_store(etcd.url), open_store(etcd.url)]
    reports: dict[str, list] = {}

    def write(t: int) -> None:
        store = stores[t % 2]
        node = f"t{t}"
        reports[node] = [(KEY, i, ranks(store.put_checkpoint(KEY, entry(i, node)))) for i in range(t, 120, 4)]

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(reports) == ["t0", "t1", "t2", "t3"]
    _check_accounting(stores[0], KEY, reports)
    assert ranks(stores[1].checkpoints(KEY))[0] == (119, "t3")
    for store in stores:
        store.close()


def test_lmdb_writer_processes_share_one_path(tmp_path: Path) -> None:
    url = f"lmdb://{tmp_path / 'lmdb'}"
    keys = [f"task-{k}" for k in range(10)]
    reports = _race(url, keys, {"a": list(range(0, 60, 2)), "b": list(range(1, 60, 2))})
    store = open_store(url)
    for key in keys:
        _check_accounting(store, key, reports)
    store.close()


# --- etcd going away ----------------------------------------------------------------------

CALLS = {
    "put_checkpoint": lambda s: s.put_checkpoint(KEY, entry(99)),
    "checkpoints": lambda s: s.checkpoints(KEY),
    "put_done": lambda s: s.put_done(KEY, b"late"),
    "done": lambda s: s.done(KEY),
    "forget": lambda s: s.forget(KEY),
}


def _assert_unavailable(store: RecordStore, limit: float) -> None:
    """Every operation raises StoreUnavailable naming the URL and itself, within ``limit``
    seconds (a liveness bound against hangs, not a performance figure)."""
    for name, call in CALLS.items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"{store.url}: {name}"):
            call(store)
        assert time.monotonic() - started < bound(limit)


def _await_recovery(store: RecordStore, within: float) -> None:
    deadline = time.monotonic() + bound(within)
    while True:
        try:
            store.checkpoints(KEY)
            return
        except StoreUnavailable:
            assert time.monotonic() < deadline, f"store did not recover within {within} s"
            time.sleep(0.1)


@pytest.mark.etcd
def test_etcd_stopped_then_restarted(etcd) -> None:
    store = open_store(etcd.url)
    store.put_checkpoint(KEY, entry(1))
    store.put_checkpoint(KEY, entry(2))
    store.put_done("finished", b"outcome")

    etcd.stop()
    _assert_unavailable(store, limit=10)
    etcd.start()  # same data dir and ports
    _await_recovery(store, within=30)
    assert store.checkpoints(KEY) == [entry(2), entry(1)]
    assert store.done("finished") == b"outcome"
    assert store.put_checkpoint(KEY, entry(3)) == [entry(1)]

    etcd.kill()  # a crash: nothing flushed on the way out
    _assert_unavailable(store, limit=10)
    etcd.start()
    _await_recovery(store, within=30)
    assert store.checkpoints(KEY) == [entry(3), entry(2)]
    store.close()


@pytest.mark.etcd
def test_etcd_hung_server_times_out(etcd) -> None:
    store = open_store(etcd.url)  # timeout 2 s
    store.put_checkpoint(KEY, entry(1))
    etcd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"{etcd.url}: checkpoints"):
            store.checkpoints(KEY)
        assert time.monotonic() - started < bound(10)
    finally:
        etcd.resume()
    assert store.checkpoints(KEY) == [entry(1)]
    store.close()


OPEN_WHILE_WRITING = """
import sys, threading, time
from rqml_dask.stores.lmdb_store import LMDBStore

first = LMDBStore(sys.argv[1])
inside = threading.Event()

def write():
    with first.env.begin(write=True) as txn:  # as a node's checkpoint writer does
        inside.set()
        time.sleep(0.5)  # Python work inside the transaction: it needs the GIL to finish
        txn.put(b"k", b"v", db=first._slots)

writer = threading.Thread(target=write)
writer.start()
inside.wait()
LMDBStore(sys.argv[1])  # another pipeline's store on the same environment, opened by a task
writer.join()
print("opened")
"""


def test_an_lmdb_store_opens_while_another_thread_of_the_process_writes(tmp_path: Path) -> None:
    """``Environment.open_db`` waits for LMDB's write lock holding the GIL: the process hung
    for good when a task opened a store while the node's checkpoint writer was in a write
    transaction. Run in a process of its own, so a hang fails this test instead of the suite."""
    done = subprocess.run([sys.executable, "-c", OPEN_WHILE_WRITING, str(tmp_path / "node.lmdb")], capture_output=True,
                          text=True, timeout=bound(60))
    assert done.returncode == 0 and done.stdout.strip() == "opened", done.stderr


def test_an_lmdb_environment_closes_with_the_last_store_of_its_path(tmp_path: Path) -> None:
    """A node closes the stores of a finished run (issue 30): the environment of a path,
    shared by its stores in the process, stays open for the others until the last closes."""
    import lmdb

    from rqml_dask.stores import lmdb_store

    path = tmp_path / "node.lmdb"
    first, second = lmdb_store.LMDBStore(path), lmdb_store.LMDBStore(path)
    assert first.env is second.env
    first.put_done("k", b"v")
    first.close()
    first.close()  # a second close releases nothing more
    assert second.done("k") == b"v"
    second.close()
    assert path.resolve() not in lmdb_store._environments
    with pytest.raises(lmdb.Error):
        second.env.stat()
    assert lmdb_store.LMDBStore(path).done("k") == b"v"  # opened again from disk
