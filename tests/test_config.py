"""The ``rqml`` section of Dask's configuration: shipped defaults, overrides, checks at start."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import dask
import pytest

from rqml_dask.config import ConfigError, node_settings, scheduler_settings
from rqml_dask.messages import NodeHeartbeat
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.node.concurrency import AdaptiveConcurrency
from rqml_dask.scheduler.assignment import NodeTable
from rqml_dask.scheduler.ledger import Ledger
from rqml_dask.scheduler.plugin import RQMLSchedulerPlugin
from rqml_dask.scheduler.records import NodeRecord
from rqml_dask.scheduler.reliability import Reliability
from timing import bound


def defaults_of(cls) -> dict:
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    import inspect

    return {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}


def test_the_shipped_defaults_are_the_ones_the_classes_use_alone():
    """The YAML is the one statement of each default: a class built without the config
    (in a unit test, a benchmark) behaves as a configured one does by default."""
    node, scheduler = node_settings(), scheduler_settings()
    assert dataclasses.asdict(node.concurrency).items() <= defaults_of(AdaptiveConcurrency).items()
    assert dataclasses.asdict(node.checkpoint).items() <= defaults_of(Checkpointer).items()
    assert dataclasses.asdict(scheduler.reliability).items() <= defaults_of(Reliability).items()
    assert {"reconcile_grace": scheduler.reconcile_grace, "return_grace": scheduler.return_grace}.items() <= defaults_of(Ledger).items()
    assert {"speed_bounds": scheduler.speed_bounds, "gpu_preference": scheduler.gpu_preference}.items() <= defaults_of(NodeTable).items()
    assert node.lmdb_map_size == 4 * 2**30 and node.reconnect_pause == 0.5 and node.degraded_limit == 3600


def test_a_configured_value_steers_the_scheduler_plugin():
    with dask.config.set({"rqml.scheduler.queued-per-node": 3, "rqml.scheduler.reliability.penalty": 5}):
        plugin = RQMLSchedulerPlugin()
    plugin.table.add("tcp://a:1")
    node = NodeRecord("tcp://a:1", Reliability(**dataclasses.asdict(plugin.settings.reliability)), figures=NodeHeartbeat(concurrency_limit=2))
    assert plugin._capacity(node) == 2 + 3
    assert node.reliability.penalty == 5


def test_durations_and_sizes_read_as_dask_writes_them():
    with dask.config.set({"rqml.node.reconnect-pause": "250ms", "rqml.node.lmdb-map-size": "1 GiB", "rqml.node.degraded-limit": None}):
        settings = node_settings()
    assert settings.reconnect_pause == 0.25 and settings.lmdb_map_size == 2**30 and settings.degraded_limit is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rqml.scheduler.queued-per-node", -1, "rqml.scheduler.queued-per-node: Input should be greater than or equal to 0"),
        ("rqml.scheduler.reliability.backoff-factor", 2, "rqml.scheduler.reliability.backoff-factor: Input should be less than or equal to 1"),
        ("rqml.node.reconnect-pause", "soon", "rqml.node.reconnect-pause"),
        ("rqml.scheduler.queued-per-nod", 2, "rqml.scheduler.queued-per-nod: Unexpected keyword argument"),
        ("distributed.scheduler.no-workers-timeout", "60s", "distributed.scheduler.no-workers-timeout: must be null"),
    ],
)
def test_a_bad_value_is_refused_with_its_key(key, value, message):
    with dask.config.set({key: value}), pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        node_settings() if key.startswith("rqml.node") else scheduler_settings()  # noqa: B018


def test_an_environment_variable_sets_a_key():
    code = "from rqml_dask.config import scheduler_settings; print(scheduler_settings().queued_per_node)"
    env = {**os.environ, "DASK_RQML__SCHEDULER__QUEUED_PER_NODE": "2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=bound(60))
    assert done.stdout.strip() == "2", done.stderr


@pytest.mark.parametrize(
    ("variable", "key", "command"),
    [
        ("DASK_RQML__SCHEDULER__QUEUED_PER_NODE", "rqml.scheduler.queued-per-node",
         ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--preload", "rqml_dask.scheduler"]),
        ("DASK_RQML__NODE__RECONNECT_PAUSE", "rqml.node.reconnect-pause",  # before it looks for a scheduler
         ["distributed.cli.dask_worker", "tcp://127.0.0.1:9", "--host", "127.0.0.1", "--no-nanny", "--preload", "rqml_dask.node"]),
    ],
)
def test_a_bad_value_stops_the_scheduler_or_worker_at_start_naming_its_key(variable, key, command):
    env = {**os.environ, variable: "-2"}
    done = subprocess.run([sys.executable, "-m", *command, "--dashboard-address", "127.0.0.1:0"],
                          env=env, capture_output=True, text=True, timeout=bound(60))
    assert done.returncode != 0
    assert key in done.stderr, done.stderr[-2000:]
