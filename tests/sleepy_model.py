"""Test models whose iterations take a set time, scaled per worker process.

:class:`SleepyModel` (deconvolution) shrinks the estimate a little per step;
:class:`SleepyConjugateGradient` (linear_solve) is the real float32 CG, paced. Each step sleeps ``delay * RQML_TEST_SLOWDOWN`` seconds (the environment variable of the
worker process; 1 if unset) and shrinks the estimate a little, so tests and benchmarks get
nodes of different, known speeds without loading the CPU. On a worker started with
``RQML_TEST_FAULTY=1`` the estimate turns NaN: its results fail validation.
"""

from __future__ import annotations

import os
import time

from rqml_dask.models import RefinementModel
from rqml_plugins.linear_solve.conjugate_gradient import ConjugateGradient


def _pace(delay: float) -> float:
    return delay * float(os.environ.get("RQML_TEST_SLOWDOWN", "1"))


class SleepyModel(RefinementModel):
    task_class = "deconvolution"
    family = "sleepy"
    immutable_state = True

    def __init__(self, problem, backend, *, delay: float = 0.01) -> None:
        super().__init__(problem, backend)
        self.delay = _pace(delay)
        self.start()

    def start(self, estimate=None) -> None:
        self._estimate = self.xp.astype(self.problem["image"] if estimate is None else estimate, self.xp.float32, copy=True)
        self.steps = 0

    def step(self) -> None:
        time.sleep(self.delay)
        self._estimate = self._estimate * (float("nan") if os.environ.get("RQML_TEST_FAULTY") else 0.999)
        self.steps += 1

    @property
    def estimate(self):
        return self._estimate

    def misfit(self) -> float:
        return 1.0 / (1.0 + self.steps)


class SleepyConjugateGradient(ConjugateGradient):
    """Conjugate gradient, each iteration at least ``delay`` seconds (scaled as above)."""

    def __init__(self, problem, backend, *, delay: float = 0.01) -> None:
        super().__init__(problem, backend)
        self.delay = _pace(delay)

    def step(self) -> None:
        time.sleep(self.delay)
        super().step()
