"""The RQML scheduler plugin: ``dask scheduler --preload rqml_dask.scheduler``.

Importing this module (as the preload does, before the scheduler builds its dashboard or
listens) checks the ``rqml.scheduler`` configuration (a bad value raises, and the scheduler
does not start: Dask only logs a failing ``dask_setup``), refuses a ``dask scheduler``
command that would listen beyond loopback without ``pqtls://`` (:mod:`rqml_dask.exposure`:
the process exits with the reason before it listens), and adds the ``/rqml`` dashboard page
(:mod:`rqml_dask.scheduler.dashboard`, registered by :mod:`rqml_dask.scheduler.page_routes`).
"""

from rqml_dask.compat import add_navigation_link
from rqml_dask.config import exposure_settings, scheduler_settings, session_settings
from rqml_dask.exposure import ExposureError, check_listeners, dask_scheduler_command_addresses
from rqml_dask.scheduler import page_routes
from rqml_dask.scheduler.exposure_guard import GUARD_NAME, ExposureGuard
from rqml_dask.scheduler.plugin import PENDING, PLUGIN_NAME, RQMLSchedulerPlugin

scheduler_settings()  # a bad `rqml.scheduler` value stops the scheduler here, naming its key
session_settings()  # and so does a bad `rqml.trust.session` value
exposure = exposure_settings()  # or a bad `rqml.trust.allow-insecure` or `expose-http` value
if (planned := dask_scheduler_command_addresses()) is not None:
    try:
        check_listeners(planned, exposure)
    except ExposureError as exc:
        raise SystemExit(str(exc)) from None
page_routes.register()


def dask_setup(scheduler) -> None:
    """Preload hook: install the exposure guard and the plugin on this scheduler (once) and
    link ``/rqml`` from the dashboard's navigation bar. The guard
    (:mod:`rqml_dask.scheduler.exposure_guard`) fails the scheduler's start if it listens
    beyond loopback without ``pqtls://`` (Dask only logs a failing ``dask_setup``)."""
    if GUARD_NAME not in scheduler.plugins:
        scheduler.add_plugin(ExposureGuard())
    if PLUGIN_NAME not in scheduler.plugins:
        scheduler.add_plugin(RQMLSchedulerPlugin())
    add_navigation_link(scheduler, page_routes.PATH.lstrip("/"))

