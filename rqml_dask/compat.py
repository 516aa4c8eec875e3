"""Every place rqml-dask relies on a part of Dask that is not public API, and why.

Dask has public doors for most of what the service does (scheduler and worker plugins,
handlers, ``Scheduler.set_restrictions``, ``periodic_callbacks``, custom heartbeat metrics,
HTTP routes). What it has none for is here, one function each, and
``tests/test_compat.py`` checks each assumption against the installed Dask, so an upgrade
that breaks one fails there, loudly, and nowhere else:

* a dashboard page served from the scheduler's start (:func:`add_dashboard_page`): the
  ``applications`` dict the scheduler reads when it builds its dashboard; a link to it in
  the dashboard's navigation bar (:func:`add_navigation_link`): the ``pages`` list of the
  memoized ``template_variables(scheduler)`` every page's template reads; Dask's page look
  (:func:`use_dask_look`): the Jinja ``env`` and ``BOKEH_THEME`` of its own pages;
* strict placement (:func:`restrict_strictly`): ``TaskState.loose_restrictions``, which
  only ``update_graph``'s annotations set, and which must be off for a bound task;
* a task failed by the scheduler (:func:`fail_task`): Dask's transition engine
  (``Scheduler._transition``, ``_transitions``), given what a worker's ``task-erred`` carries;
* a worker that survives the loss of its scheduler
  (:class:`~rqml_dask.node.worker.RQMLWorker`): it overrides ``Worker.handle_scheduler``
  (which closes the worker on a broken stream, under ``@fail_hard``) and calls
  ``Worker._register_with_scheduler`` again (which Dask asserts is only called once), after
  :func:`prepare_registration` (a fresh ``BatchedSend``, the heartbeat digests and spans
  state a registration expects to be empty), with :func:`stop_heartbeats` while it has no
  scheduler and :func:`in_background` for the worker's own background task group;
* a handler wrapped to check its caller (:mod:`rqml_dask.scheduler.doors`,
  :mod:`rqml_dask.node.doors`): Dask passes the comm to a handler whose first parameter is
  ``comm`` and ``serializers`` to one that names it, as ``inspect.signature`` says
  (:func:`takes_comm`, :func:`handler_signature`); the connections a server is handling
  (:func:`open_comms`): ``Server._comms``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from distributed import Scheduler, Worker
from distributed.batched import BatchedSend
from distributed.core import Server, _expects_comm, error_message
from distributed.utils import has_keyword
from distributed.scheduler import TaskState


def add_dashboard_page(path: str, make_doc: Callable[..., Any]) -> None:
    """Serve ``make_doc`` at ``path`` on the dashboards of schedulers made from now on (a
    preload's module body runs early enough; idempotent)."""
    from distributed.dashboard.scheduler import applications

    applications.setdefault(path, make_doc)


def add_navigation_link(scheduler: Any, page: str) -> None:
    """Add ``page`` (a path relative to the dashboard's root) to the navigation bar of every
    page of ``scheduler``'s dashboard (idempotent)."""
    from distributed.dashboard.scheduler import template_variables

    pages = template_variables(scheduler)["pages"]
    if page not in pages:
        pages.append(page)


def use_dask_look(doc: Any, extra: dict) -> None:
    """Give a Bokeh document the template (navigation bar) and theme of Dask's own pages."""
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


def restrict_strictly(ts: TaskState) -> None:
    """A task's worker restrictions bind it: work stealing never moves it elsewhere."""
    ts.loose_restrictions = False


def fail_task(scheduler: Scheduler, key: Any, exception: BaseException, stimulus_id: str) -> None:
    """End the task ``key``, waiting in ``no-worker``, as ``erred`` with ``exception``, as if it
    had raised it: its futures raise it on the client, and the tasks that depend on it err too."""
    error = error_message(exception)
    del error["status"]
    recommendations, client_msgs, worker_msgs = scheduler._transition(key, "erred", stimulus_id, cause=key, **error)
    scheduler._transitions(recommendations, client_msgs, worker_msgs, stimulus_id)
    scheduler.send_all(client_msgs, worker_msgs)


def prepare_registration(worker: Worker) -> None:
    """Make a worker that lost its scheduler ready to register again: metrics gathered for
    the lost scheduler are not the new one's, and registration expects none pending
    (``SpansWorkerExtension.collect_digests`` asserts it); the old batched stream is
    closed, so a new one takes the new connection."""
    worker.digests_total_since_heartbeat.clear()
    if (spans := worker.extensions.get("spans")) is not None:
        spans.heartbeat()
    worker.batched_stream = BatchedSend(interval="2ms", loop=worker.loop)


def stop_heartbeats(worker: Worker) -> None:
    """Stop the worker's heartbeats and keep-alives (registration starts them again)."""
    worker.periodic_callbacks["heartbeat"].stop()
    worker.periodic_callbacks["keep-alive"].stop()


def in_background(worker: Worker, function: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run ``function()`` in the worker's background task group (cancelled when it closes)."""
    worker._ongoing_background_tasks.call_soon(function)


def takes_comm(handler: Callable[..., Any]) -> bool:
    """Whether Dask calls ``handler`` with the comm first."""
    return _expects_comm(handler)


def handler_signature(guarded: Callable[..., Any], like: Callable[..., Any]) -> None:
    """Give ``guarded(comm=None, **message)`` the signature by which Dask calls it with the
    comm, and with ``serializers`` when the handler it wraps (``like``) takes them."""
    parameters = [inspect.Parameter("comm", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    if has_keyword(like, "serializers"):
        parameters.append(inspect.Parameter("serializers", inspect.Parameter.KEYWORD_ONLY, default=None))
    guarded.__signature__ = inspect.Signature([*parameters, inspect.Parameter("message", inspect.Parameter.VAR_KEYWORD)])
    guarded.__name__ = getattr(like, "__name__", guarded.__name__)


def open_comms(server: Server) -> list[Any]:
    """The connections ``server`` is handling now (each peer's calls and sessions)."""
    return list(server._comms)
