"""The RQML scheduler plugin: ``dask scheduler --preload rqml_dask.scheduler``.

Importing this module (as the preload does, before the scheduler builds its dashboard) checks
the ``rqml.scheduler`` configuration (a bad value raises, and the scheduler does not start:
Dask only logs a failing ``dask_setup``) and adds the ``/rqml`` dashboard page
(:mod:`rqml_dask.scheduler.dashboard`).
"""

from rqml_dask.compat import add_navigation_link
from rqml_dask.config import scheduler_settings, session_settings
from rqml_dask.scheduler import dashboard
from rqml_dask.scheduler.plugin import PENDING, PLUGIN_NAME, RQMLSchedulerPlugin

scheduler_settings()  # a bad `rqml.scheduler` value stops the scheduler here, naming its key
session_settings()  # and so does a bad `rqml.trust.session` value
dashboard.register()


def dask_setup(scheduler) -> None:
    """Preload hook: install the plugin on this scheduler (once) and link ``/rqml`` from the
    dashboard's navigation bar."""
    if PLUGIN_NAME not in scheduler.plugins:
        scheduler.add_plugin(RQMLSchedulerPlugin())
    add_navigation_link(scheduler, dashboard.PATH.lstrip("/"))


__all__ = ["PENDING", "PLUGIN_NAME", "RQMLSchedulerPlugin", "dask_setup"]
