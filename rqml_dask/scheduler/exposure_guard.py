"""The scheduler's doors, checked as it starts (:mod:`rqml_dask.exposure`).

:class:`ExposureGuard` is a scheduler plugin the preload installs beside the RQML plugin. Its
``start`` runs as the scheduler starts, after it listens and before it serves a client: a
listener beyond loopback without ``pqtls://`` fails that start (Dask closes the scheduler,
and ``await Scheduler(...)`` raises with :class:`~rqml_dask.exposure.ExposureError` as the
cause) unless ``rqml.trust.allow-insecure``, which it then logs loudly; it moves the
dashboard to loopback unless ``rqml.trust.expose-http``, and logs where it really listens.
(``dask scheduler`` is refused earlier, before it listens: see :mod:`rqml_dask.scheduler`.)
"""

from __future__ import annotations

import logging

from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin

from rqml_dask.config import exposure_settings
from rqml_dask.exposure import check_listeners, confine_http, insecure_warning

logger = logging.getLogger(__name__)

GUARD_NAME = "rqml-exposure-guard"


class ExposureGuard(SchedulerPlugin):
    """Checks the scheduler's listeners and confines its dashboard when it starts (see the
    module docstring). ``insecure`` holds the listeners allowed beyond loopback without
    ``pqtls://`` (``rqml.trust.allow-insecure``), empty otherwise."""

    name = GUARD_NAME

    def __init__(self) -> None:
        self.insecure: list[str] = []

    async def start(self, scheduler: Scheduler) -> None:
        settings = exposure_settings()
        self.insecure = check_listeners([listener.listen_address for listener in scheduler.listeners], settings)
        if self.insecure:
            banner = "!" * 100
            for line in (banner, insecure_warning(self.insecure), banner):
                logger.warning("rqml: %s", line)
        if scheduler.http_server is not None:
            door = confine_http(scheduler.http_server, settings)
            logger.log(door.level, door.describe("the dashboard"))
