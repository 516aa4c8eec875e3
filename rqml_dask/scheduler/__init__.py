"""The RQML scheduler plugin: ``dask scheduler --preload rqml_dask.scheduler``."""

from rqml_dask.scheduler.plugin import HOLD, PLUGIN_NAME, RQMLSchedulerPlugin


def dask_setup(scheduler) -> None:
    """Preload hook: install the plugin on this scheduler (once)."""
    if PLUGIN_NAME not in scheduler.plugins:
        scheduler.add_plugin(RQMLSchedulerPlugin())


__all__ = ["HOLD", "PLUGIN_NAME", "RQMLSchedulerPlugin", "dask_setup"]
