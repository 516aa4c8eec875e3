"""One test per assumption ``rqml_dask/compat.py`` makes about Dask's private parts: a Dask
upgrade that breaks one fails here, by name."""

from __future__ import annotations

import inspect

from distributed import Worker
from distributed.batched import BatchedSend
from distributed.scheduler import TaskState
from distributed.spans import SpansWorkerExtension


def source(function) -> str:
    return inspect.getsource(inspect.unwrap(function))


def test_the_dashboard_reads_its_pages_from_a_module_dict_when_a_scheduler_starts():
    from distributed.dashboard import scheduler as dashboard

    assert isinstance(dashboard.applications, dict) and "/status" in dashboard.applications
    assert "applications" in inspect.getsource(dashboard.connect)


def test_every_page_reads_its_navigation_from_one_memoized_pages_list_per_scheduler():
    from distributed.dashboard import scheduler as dashboard

    class Scheduler:  # template_variables reads nothing of it but its identity and ``jupyter``
        jupyter = False

    scheduler = Scheduler()
    variables = dashboard.template_variables(scheduler)
    assert isinstance(variables["pages"], list) and "status" in variables["pages"]
    assert dashboard.template_variables(scheduler)["pages"] is variables["pages"]  # the same list, every call
    assert "template_variables(scheduler)" in inspect.getsource(dashboard.connect)


def test_dask_pages_take_their_look_from_a_jinja_env_and_a_bokeh_theme():
    from bokeh.themes import Theme
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    assert isinstance(BOKEH_THEME, Theme) and env.get_template("simple.html") is not None


def test_a_task_state_has_loose_restrictions():
    assert "loose_restrictions" in TaskState.__slots__


def test_a_worker_closes_when_its_scheduler_stream_breaks_and_registers_only_once():
    assert "close(" in source(Worker.handle_scheduler)  # what RQMLWorker.handle_scheduler replaces
    register = source(Worker._register_with_scheduler)
    assert inspect.iscoroutinefunction(Worker._register_with_scheduler)
    assert "assert not self.data" in register and "assert not self.state.tasks" in register  # RQMLWorker empties both first
    assert "self.batched_stream.start(comm)" in register and "handle_scheduler" in register


def test_a_worker_closes_at_a_heartbeat_answered_missing_and_closes_its_connections_after_its_plugins():
    heartbeat = source(Worker.heartbeat)
    assert inspect.iscoroutinefunction(Worker.heartbeat)
    assert 'response["status"] == "missing"' in heartbeat and 'reason="worker-heartbeat-missing"' in heartbeat  # RQMLWorker.close
    assert "logger.exception" in heartbeat  # the ERROR a heartbeat cut short by close logged
    close = source(Worker.close)
    assert close.index("plugin_remove") < close.index("pc.stop()") < close.index("await self.rpc.close()")


def test_registration_reads_the_heartbeat_digests_and_spans_a_new_scheduler_expects_empty():
    from distributed.core import Server

    assert "self.digests_total_since_heartbeat = defaultdict(int)" in source(Server.__init__)
    assert "assert not self.digests_total_since_heartbeat" in source(SpansWorkerExtension.collect_digests)
    assert "self.digests_total_since_heartbeat = {}" in source(SpansWorkerExtension.heartbeat)  # what empties it


def test_a_batched_send_takes_an_interval_and_a_loop():
    assert {"interval", "loop"} <= set(inspect.signature(BatchedSend).parameters)


def test_a_worker_has_heartbeat_and_keep_alive_callbacks_and_a_background_task_group():
    init = source(Worker.__init__)
    assert '"heartbeat"' in init and '"keep-alive"' in init
    from distributed.core import AsyncTaskGroup, Server

    assert "self._ongoing_background_tasks = AsyncTaskGroup()" in source(Server.__init__)
    assert callable(AsyncTaskGroup.call_soon)


def test_the_scheduler_fails_a_task_waiting_for_a_worker_through_its_transition_engine():
    from distributed import Scheduler
    from distributed.core import error_message

    assert ("no-worker", "erred") in Scheduler._TRANSITIONS_TABLE
    fields = set(inspect.signature(Scheduler._transition_no_worker_erred).parameters)
    assert {"cause", "exception", "traceback", "exception_text", "traceback_text"} <= fields
    assert set(error_message(ValueError("x"))) == {"status", "exception", "traceback", "exception_text", "traceback_text"}
    assert list(inspect.signature(Scheduler._transitions).parameters)[1:] == ["recommendations", "client_msgs", "worker_msgs",
                                                                               "stimulus_id"]
    assert callable(Scheduler.send_all)


def test_dask_passes_a_handler_the_comm_and_serializers_as_its_signature_says():
    from distributed.core import Server

    from rqml_dask.compat import handler_signature, open_comms, takes_comm

    def plain(keys):
        return keys

    def with_comm(comm, keys, serializers=None):
        return keys

    assert not takes_comm(plain) and takes_comm(with_comm)

    async def guarded(comm=None, **message):
        return message

    handler_signature(guarded, with_comm)
    assert takes_comm(guarded) and "serializers" in inspect.signature(guarded).parameters
    handler_signature(guarded, plain)
    assert takes_comm(guarded) and "serializers" not in inspect.signature(guarded).parameters
    server = Server({})
    assert open_comms(server) == [] and isinstance(server._comms, dict)  # comm -> the op it runs, while it is open
