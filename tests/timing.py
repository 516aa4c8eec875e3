"""Every bound a test waits under, and the one way a test waits (:func:`until` on an event loop).

A test never sleeps to let something happen: it waits, with :func:`wait_for`, on the state
it needs, read from the same source the code under test reads (a worker's HTTP endpoint,
the scheduler's state, an event on the bus, a file). Each wait has a bound, generous on a
quiet machine, that exists only so a broken run fails instead of hanging; reaching it is
a failure, never the way a test goes on.

``RQML_TEST_TIME_SCALE`` multiplies every bound (``2`` doubles them all) for a machine
much slower or busier than a two-core CI runner with other work beside it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TypeVar

import distributed

T = TypeVar("T")

SCALE = float(os.environ.get("RQML_TEST_TIME_SCALE", "1"))
if not SCALE > 0:
    raise ValueError(f"RQML_TEST_TIME_SCALE must be a positive number, got {os.environ['RQML_TEST_TIME_SCALE']!r}")


def bound(seconds: float) -> float:
    """``seconds`` scaled by ``RQML_TEST_TIME_SCALE``: pass it wherever a test gives a timeout."""
    return seconds * SCALE


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.1, what: str | None = None) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that; fail after ``bound(timeout)`` seconds."""
    limit = bound(timeout)
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or getattr(predicate, '__name__', 'condition')} not reached within {limit:.0f} s")
        time.sleep(interval)


async def until(predicate: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.02) -> None:
    """:func:`wait_for` on an event loop: poll ``predicate`` every ``interval`` seconds
    without blocking the loop (the code under test runs on it); fail after ``bound(timeout)``."""
    limit = bound(timeout)
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {limit:.0f} s")
        await asyncio.sleep(interval)


def gather(client: distributed.Client, futures: list[distributed.Future], timeout: float = 120.0) -> list:
    """``client.gather(futures)``, failing after ``bound(timeout)`` seconds instead of hanging."""
    distributed.wait(futures, timeout=bound(timeout))
    return client.gather(futures)
