"""Weighted random choice of a node for an RQML task, in O(nodes) NumPy work per task.

A node's weight for a task is ``room * speed * reliability * routing``:

* ``room``: free inbound slots (the node's advertised concurrency limit plus one queued
  task, minus the tasks bound to it and not finished); a node without room gets nothing;
* ``speed``: its advertised iterations per second relative to the cluster's mean (clipped
  to ``rqml.scheduler.speed-bounds``, [0.25, 4]; 1 until it has reported);
* ``reliability``: :class:`~rqml_dask.scheduler.reliability.Reliability` score;
* ``routing``: the task's class policy (``gpu``-only classes never go to CPU nodes, and a
  task that wants a GPU prefers GPU nodes ``rqml.scheduler.gpu-preference`` (10) to 1); and *warm first*: when nodes that can start
  the task now (a free refinement slot, ``free``) have its first model warm, the choice is
  made among them only. A warm node whose only room is a queue slot does not win over a cold
  node that would start the task at once.

Choosing at random in proportion to weight starves no node and spreads ties instead of
piling them on one hot node.
"""

from __future__ import annotations

import numpy as np

from rqml_dask.messages import TaskTraits

class NodeTable:
    """Per-node figures as arrays, index-aligned with ``addresses``. Besides the weights'
    factors, ``rate`` holds each node's advertised iterations/s (0: none yet),
    ``backoff_until`` when its reliability backoff ends (``time.monotonic``) and ``refused``
    whether its latest heartbeat figures were refused: what says which nodes rest, for the
    whole cluster at once."""

    ARRAYS = {"room": (float, 1.0), "free": (float, 1.0), "speed": (float, 1.0), "rate": (float, 0.0),
              "reliability": (float, 1.0), "backoff_until": (float, 0.0), "gpu": (bool, False), "refused": (bool, False)}
    """Each per-node array: its dtype and a new node's value."""

    def __init__(self, speed_bounds: tuple[float, float] = (0.25, 4.0), gpu_preference: float = 10.0) -> None:
        self.speed_bounds = speed_bounds
        self.gpu_preference = gpu_preference
        self.addresses: list[str] = []
        self.index: dict[str, int] = {}
        self.room = self.free = self.speed = self.rate = self.reliability = self.backoff_until = np.zeros(0)
        self.gpu = self.refused = np.zeros(0, dtype=bool)
        self.warm: dict[str, np.ndarray] = {}

    def add(self, address: str) -> None:
        if address in self.index:
            return
        self.index[address] = len(self.addresses)
        self.addresses.append(address)
        for name, (dtype, initial) in self.ARRAYS.items():
            setattr(self, name, np.append(getattr(self, name), np.array([initial], dtype)))
        self.warm = {model: np.append(mask, False) for model, mask in self.warm.items()}

    def remove(self, address: str) -> None:
        i = self.index.pop(address, None)
        if i is None:
            return
        self.addresses.pop(i)
        self.index = {a: j for j, a in enumerate(self.addresses)}
        for name in self.ARRAYS:
            setattr(self, name, np.delete(getattr(self, name), i))
        self.warm = {model: np.delete(mask, i) for model, mask in self.warm.items()}

    def set_warm(self, address: str, models: tuple[str, ...] | list[str]) -> None:
        i = self.index[address]
        for model, mask in self.warm.items():
            mask[i] = model in models
        for model in models:
            if model not in self.warm:
                self.warm[model] = np.zeros(len(self.addresses), dtype=bool)
                self.warm[model][i] = True

    def set_speeds(self, iterations_per_second: dict[str, float]) -> None:
        """Take the advertised iterations/s of the nodes given (the others keep theirs;
        unknown addresses are ignored) and make every node's relative speed from them: its
        rate over the mean of the nodes that report one, clipped to ``speed_bounds``. Nodes
        that report 0 get 1; with no node reporting, speeds stay as they are."""
        for address, rate in iterations_per_second.items():
            if (i := self.index.get(address)) is not None:
                self.rate[i] = rate
        busy = self.rate > 0
        if busy.any():
            self.speed = np.where(busy, np.clip(self.rate / self.rate[busy].mean(), *self.speed_bounds), 1.0)

    def weights(self, task: TaskTraits, gpu_only: bool = False, avoid: frozenset[str] = frozenset(),
                exclude: frozenset[str] = frozenset()) -> np.ndarray:
        """Each node's weight for ``task``. Nodes in ``exclude`` get none while the cluster
        has any other node; of the rest, nodes in ``avoid`` get none unless no other node has
        room; then warm first (see the module docstring)."""
        weights = self.room.clip(min=0) * self.speed * self.reliability
        if gpu_only:
            weights = np.where(self.gpu, weights, 0.0)
        elif task.wants_gpu and self.gpu.any():
            weights = np.where(self.gpu, weights * self.gpu_preference, weights)
        if exclude and any(a not in exclude for a in self.addresses):  # weights is this call's own array
            weights[[self.index[a] for a in exclude if a in self.index]] = 0.0
        if avoid:
            others = weights.copy()
            others[[self.index[a] for a in avoid if a in self.index]] = 0.0
            if others.sum() > 0:
                weights = others
        warm = self.warm.get(task.model)
        if warm is not None:
            warm_weights = np.where(warm & (self.free > 0), weights, 0.0)
            if warm_weights.sum() > 0:
                return warm_weights
        return weights

    def choose(
        self,
        task: TaskTraits,
        rng: np.random.Generator,
        gpu_only: bool = False,
        avoid: frozenset[str] = frozenset(),
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        """A node drawn in proportion to its weight for ``task``; ``None`` if none has room.
        Nodes in ``exclude`` never get it while the cluster has any other node (the task
        waits); nodes in ``avoid`` are passed over unless no node left has room (an avoided
        node takes it rather than an excluded one: a vote handed back by the only node not
        holding its result goes back there)."""
        weights = self.weights(task, gpu_only, avoid, exclude)
        total = weights.sum()
        if total <= 0:
            return None
        cumulative = np.cumsum(weights)
        return self.addresses[int(np.searchsorted(cumulative, rng.random() * total, side="right"))]
