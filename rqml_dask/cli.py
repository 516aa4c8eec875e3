"""The ``rqml`` command line: ``rqml run PIPELINE.yaml`` and ``rqml data synth STORE``."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import click

from rqml_dask.events import TOPICS

FORESEEABLE = (
    ("rqml_dask.config", "ConfigError"),
    ("rqml_dask.volumes", "InputError"),
    ("rqml_dask.names", "UnsafeName"),
    ("rqml_dask.pipeline.config", "PipelineConfigError"),
    ("rqml_dask.pipeline.pipeline", "PipelineError"),
    ("rqml_dask.pipeline.plugins", "PluginError"),
    ("rqml_dask.models", "UnknownModelError"),
    ("rqml_dask.trust.ca", "CAError"),
    ("rqml_dask.trust.transport", "TrustConfigError"),
    ("rqml_dask.run_lock", "OutputBusy"),
    ("rqml_dask.deploy", "ClusterStartError"),
)
"""The project's own errors (module, class), with :class:`SchedulerUnreachable`, that say
what is wrong and how to fix it: a command that raises one (or an error it caused, e.g.
Dask's ``Cluster failed to start``) ends with its message as one line on stderr and exit
status 1; ``--debug`` shows the traceback instead. Only modules already imported are looked
at: ``rqml --help`` and a refused pipeline file never import Dask."""

_LOG_LEVEL = "DASK_LOGGING__DISTRIBUTED"
"""Dask's logging level for its ``distributed`` loggers, in this process and the cluster
processes it starts (they inherit the environment)."""


class SchedulerUnreachable(ConnectionError):
    """No scheduler answered at an address within the connect timeout, or its pqtls://
    handshake failed."""


def _one_line(exc: BaseException) -> str | None:
    """The message of the first foreseeable error (:data:`FORESEEABLE`) in ``exc``'s chain of
    causes, its lines joined; ``None`` if there is none."""
    kinds = (SchedulerUnreachable, *(getattr(sys.modules[module], name) for module, name in FORESEEABLE
                                     if module in sys.modules and hasattr(sys.modules[module], name)))
    while exc is not None:
        if isinstance(exc, kinds):
            return " ".join(str(exc).split())
        exc = exc.__cause__
    return None


def _debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--debug``: the root group lets errors through, with their traceback."""
    if value:
        ctx.find_root().meta["rqml.debug"] = True


def _verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``-v``: Dask's INFO logs, here and in the cluster processes started from here."""
    if value:
        os.environ[_LOG_LEVEL] = "info"


def _shared_options() -> list[click.Option]:
    """``--debug`` and ``-v``, which every command takes (before or after its name)."""
    return [
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_debug,
                     help="On an error, show its traceback, not one line."),
        click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_verbose,
                     help="Show Dask's INFO logs (of every process of an embedded cluster too)."),
    ]


class _Commands(click.Group):
    """A command group whose every command takes :func:`_shared_options`; the root group
    turns a foreseeable error (:data:`FORESEEABLE`) into one line on stderr and exit status 1."""

    group_class = type  # subgroups are _Commands too

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_shared_options())

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not isinstance(cmd, click.Group):
            cmd.params.extend(_shared_options())
        super().add_command(cmd, name)

    def main(self, *args, **kwargs):
        """The command, its logging setting (:data:`_LOG_LEVEL`) put back as it was at the
        end: in-process callers (tests, notebooks) keep theirs."""
        before = os.environ.get(_LOG_LEVEL)
        try:
            return super().main(*args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(_LOG_LEVEL, None)
            else:
                os.environ[_LOG_LEVEL] = before

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if ctx.parent is not None or ctx.meta.get("rqml.debug") or (line := _one_line(exc)) is None:
                raise
            raise click.ClickException(line) from None


_TOPIC_PREFIX = "rqml-"
"""What the RQML topics' names in Dask's event log start with (:data:`~rqml_dask.events.TOPICS`)."""


class _Topic(click.Choice):
    """An RQML event topic, by the name the help shows (``alerts``) or its full name
    (``rqml-alerts``); converted to the full name, the one Dask's event log knows."""

    def __init__(self) -> None:
        super().__init__([topic.removeprefix(_TOPIC_PREFIX) for topic in TOPICS])

    def convert(self, value, param, ctx) -> str:
        """The full name; an unknown topic is one line naming the known ones (exit status 1)."""
        try:
            return _TOPIC_PREFIX + super().convert(str(value).removeprefix(_TOPIC_PREFIX), param, ctx)
        except click.BadParameter as exc:
            raise click.ClickException(f"--topic: {exc.message}") from None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _scheduler_options(required: bool, help: str):
    """``--scheduler ADDRESS`` (``help`` says what for) and ``--connect-timeout``, for
    :func:`_client`."""

    def decorate(command):
        command = click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=3.0,
                               show_default=True, metavar="SECONDS",
                               help="How long to wait for the scheduler to answer at first.")(command)
        return click.option("--scheduler", metavar="ADDRESS", required=required, help=help)(command)

    return decorate


def _client(scheduler: str, connect_timeout: float):
    """A Dask client of the scheduler at ``scheduler``, once a first connection there has
    answered (and, over pqtls://, completed its handshake) within ``connect_timeout``
    seconds; :class:`SchedulerUnreachable` otherwise, naming the address and the fix. The
    client's own later reconnections keep Dask's timeouts."""
    import asyncio

    from distributed import Client
    from distributed.comm import connect
    from distributed.comm.core import FatalCommClosedError

    async def probe() -> None:
        comm = await connect(scheduler, timeout=connect_timeout)
        await comm.close()

    try:
        asyncio.run(probe())
    except FatalCommClosedError as exc:  # the pqtls:// handshake failed: a certificate, ours or the scheduler's
        raise SchedulerUnreachable(_handshake_failed(scheduler, str(exc))) from exc
    except (OSError, asyncio.TimeoutError) as exc:
        raise SchedulerUnreachable(f"no scheduler answered at {scheduler} within {connect_timeout:g} s: "
                                   f"is it running, and is the address right? (--connect-timeout to wait longer)") from exc
    return Client(scheduler)


def _handshake_failed(scheduler: str, error: str) -> str:
    """What the pqtls:// handshake ``error`` with ``scheduler`` means: whose certificate was
    refused, which file, why, and the ``rqml ca`` command that gives a good one."""
    from rqml_dask.trust.ca import name_of, role_of
    from rqml_dask.trust.session import leaf_certificate
    from rqml_dask.trust.transport import Credentials

    credentials = Credentials.from_config()
    if "verify failed" in error:  # we refused the scheduler's
        return (f"{scheduler} presented a certificate that this host's CA certificate {credentials.ca} (rqml.trust.ca) "
                f"does not accept (another CA's, expired or revoked): set rqml.trust.ca to the cluster's ca.pem, or give "
                f"the scheduler a new certificate (`rqml ca issue CA_DIR NAME --role scheduler`)")
    certificate = leaf_certificate(credentials)
    why = {"revoked": "it was revoked", "expired": "it has expired", "unknown ca": "it is not of the cluster's CA"}
    reason = next((said for words, said in why.items() if words in error), error)
    return (f"{scheduler} refused this host's certificate {credentials.cert} (rqml.trust.cert, {name_of(certificate)}): "
            f"{reason}; issue a new one from the cluster's CA (`rqml ca issue CA_DIR {name_of(certificate)} --role "
            f"{role_of(certificate)}`) and set rqml.trust.cert and rqml.trust.key to it")


@click.group(cls=_Commands)
@click.version_option(package_name="rqml-dask")
def main() -> None:
    """rqml-dask: iterative-refinement pipelines on Dask."""
    os.environ.setdefault(_LOG_LEVEL, "warning")  # quiet unless -v (or set by the user)


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@_scheduler_options(required=False, help="Use this Dask scheduler instead of an embedded cluster.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar while tasks run.")
@click.option("--overwrite", is_flag=True, help="Replace an output another pipeline configuration wrote.")
@click.option("--cluster", "cluster_kind", type=click.Choice(["local", "slurm", "pbs", "kubernetes"]),
              help="Where to run (overrides the pipeline's cluster.kind): the embedded cluster, Slurm or PBS jobs, "
                   "or Kubernetes pods, set by the pipeline's cluster section of that name.")
@click.option("--secure", is_flag=True,
              help="Run the embedded cluster over pqtls:// (post-quantum TLS), with throw-away certificates.")
def run(pipeline_file: Path, scheduler: str | None, connect_timeout: float, cluster_kind: str | None, progress: bool,
        overwrite: bool, secure: bool) -> None:
    """Run every task of PIPELINE_FILE and write its output Zarr."""
    from rqml_dask.pipeline.config import load_pipeline_config

    if scheduler and cluster_kind:
        raise click.ClickException("give --scheduler (a running cluster) or --cluster (one to start), not both")
    config = load_pipeline_config(pipeline_file)  # a bad file is refused before Dask is even imported
    if cluster_kind:
        config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"kind": cluster_kind})})
    if config.cluster.kind == "address" and not scheduler:
        scheduler = config.cluster.address
    kind = "address" if scheduler else config.cluster.kind
    if kind == "local":  # its workers fork from it: it imports their modules while this process reads the input
        from rqml_dask.deploy.local import fork_server

        fork_server()
    if secure and kind not in ("local", "slurm", "pbs"):
        raise click.ClickException("--secure starts a cluster over pqtls:// (local, slurm or pbs); for a cluster of your "
                                   "own, give --scheduler pqtls://... and this host's rqml.trust credentials; Kubernetes "
                                   "pods take theirs from a Secret (cluster.kubernetes.trust_secret)")
    from distributed import Client

    from rqml_dask.config import check_all
    from rqml_dask.deploy import started_cluster
    from rqml_dask.pipeline.pipeline import Pipeline
    from rqml_dask.run_lock import writing

    if kind != "address":
        check_all()  # the started cluster's settings: refused here, not by each of its processes
    with contextlib.ExitStack() as stack:
        if scheduler:  # reached before the input is read (or generated)
            client = stack.enter_context(_client(scheduler, connect_timeout))
        pipeline = Pipeline(config)
        stack.enter_context(writing(Path(pipeline.config.output.store)))  # one live run per output
        tasks = pipeline.prepare(overwrite)  # refuse bad input or output before any cluster starts
        if pipeline.camera_note is not None:
            click.echo(f"camera       {pipeline.camera_note}", err=True)
        click.echo(f"halo         {pipeline.halo_note}", err=True)
        click.echo(f"transform    {pipeline.transform_note}", err=True)
        if pipeline.held_out_note is not None:
            click.secho(f"held-out     {pipeline.held_out_note}", err=True, fg="yellow")
        report = None
        if kind == "local" and not secure:  # a rerun whose every result is recorded here: no cluster
            report = _finished(lambda: pipeline.run_recorded(tasks), pipeline)
        if report is not None:
            click.echo("cluster      none started: every task's result is recorded on this host and valid", err=True)
        else:
            if not scheduler:
                cluster = stack.enter_context(started_cluster(pipeline.config.cluster, secure))
                client = stack.enter_context(Client(cluster))
                click.echo(f"cluster      {kind} at {client.scheduler.address}: {_nodes_of(cluster, kind)}", err=True)
            if secure:
                peer = client.scheduler_comm.comm.extra_info()
                click.echo(f"secure       {client.scheduler.address}: certificate {peer['peer_name']}, key exchange {peer['group']}", err=True)
            click.echo(f"dashboard    {client.dashboard_link}", err=True)
            rqml_pages = client.dashboard_link.replace("/status", "/rqml")
            click.echo(f"rqml pages   {rqml_pages} (tiles, convergence, nodes, events: {rqml_pages}-tiles, ...)", err=True)
            report = _finished(lambda: pipeline.run(client, progress=progress, tasks=tasks), pipeline)
        click.echo(report.summary())
        _pictures(Path(pipeline.config.output.store))  # while a cluster is there: it reads the planes
    if report.rejected:
        click.echo(f"{len(report.rejected)} of {len(report.outcomes)} task(s) not accepted "
                   f"(listed above): output marked 'rejected'", err=True)
        sys.exit(1)


def _finished(run, pipeline):
    """``run()``'s report; a run refused for its input or failed is one line naming the output."""
    from rqml_dask.pipeline.pipeline import PipelineError
    from rqml_dask.volumes import InputError

    try:
        return run()
    except (PipelineError, InputError) as exc:
        raise click.ClickException(f"{exc} (output left marked incomplete: {pipeline.output_ref})") from None


def _nodes_of(cluster, kind: str) -> str:
    """The nodes a started cluster asked for, as ``rqml run`` prints them."""
    if kind == "kubernetes":
        return "pods of the Dask operator; tasks wait for them"
    names = ", ".join(map(str, cluster.worker_spec))
    if kind == "local":
        return f"nodes {names}"
    return f"nodes {names} (batch jobs); tasks wait for them" if names else "none yet: jobs are submitted as the work asks (adapt)"


def _pictures(store: Path) -> None:
    """Write the run's slices and report beside its output (the slices drawn once, for both),
    and say where they are; where those beside it show the same results, they stay."""
    from rqml_dask.report import drawn_pictures, record_pictures, write_report, write_slices

    if (drawn := drawn_pictures(store)) is not None:
        for what, path in zip(("slices", "report"), drawn):
            click.echo(f"{what:<13}{path} (as drawn before: the results are the same)")
        return
    record_pictures(store, None)
    slices = _drawn("slices", lambda: write_slices(store))
    report = _drawn("report", lambda: write_report(store, slices=slices.read_bytes() if slices else None))
    if slices is not None and report is not None:
        record_pictures(store, (slices, report))


def _drawn(what: str, write) -> Path | None:
    """``write()``'s path, printed; if it raises, ``None`` and one line on stderr saying why: a
    picture never changes a run's exit status (its output is written and marked by then)."""
    try:
        path = write()
    except Exception as exc:  # any: the reason is printed, the run's outcome stands
        click.echo(f"warning: no {what} drawn: {type(exc).__name__}: {' '.join(str(exc).split())}", err=True)
        return None
    click.echo(f"{what:<13}{path}")
    return path


@main.command()
@click.argument("result", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="The PNG to write (default: beside RESULT).")
def show(result: Path, output: Path | None) -> None:
    """Draw the middle z, y and x slices of a finished run's observed image, result and
    truth (if any), on one colour scale, into a PNG, and print its path. For a batch of
    systems (linear_solve): the first few systems, a panel each."""
    from rqml_dask.report import write_slices

    click.echo(write_slices(result, output))


@main.command()
@click.argument("result", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="The HTML file to write (default: beside RESULT).")
def report(result: Path, output: Path | None) -> None:
    """Write one self-contained HTML report of a finished run (summary, tile map,
    convergence curves, slices; it opens without a network), and print its path."""
    from rqml_dask.report import write_report

    click.echo(write_report(result, output))


@main.command()
@_scheduler_options(required=True, help="The Dask scheduler running the RQML plugin.")
@click.option("--all", "every_run", is_flag=True, help="Count the tasks of every run the scheduler knows, not the latest run's.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(scheduler: str, connect_timeout: float, every_run: bool, as_json: bool) -> None:
    """Nodes, by name (weights, reliability, queues, warm models, the policy each enforces;
    done and fail count since the scheduler started) and the latest run's tasks (state,
    node, model), or every run's with --all."""
    import json

    from rqml_dask.exposure import exposed, insecure_warning

    with _client(scheduler, connect_timeout) as client:
        state = client.sync(client.scheduler.rqml_status)  # Dask answers None for a handler it does not have
        if state is None:
            raise click.ClickException(f"{scheduler} does not run the RQML scheduler plugin (dask scheduler --preload rqml_dask.scheduler)")
        runs = list(state["runs"])  # the latest submitted last
        if runs and not every_run:
            state = client.sync(client.scheduler.rqml_status, run=runs[-1])
        info = client.scheduler_info()
        insecure = exposed({client.scheduler.address, info["address"]})  # rqml.trust.allow-insecure
    names = {address: str(worker.get("name", address)) for address, worker in info["workers"].items()}
    if as_json:
        click.echo(json.dumps(state, indent=2, default=str))
        return
    if insecure:
        click.secho(insecure_warning(insecure), fg="red", bold=True)
    click.echo(f"{'node':<28}{'room':>5}{'speed':>7}{'reliab':>8}{'bound':>6}{'done':>6}{'fail':>5}{'it/s':>8}  queues i/r/o  link{'':<13}warm models")
    for address, n in sorted(state["nodes"].items(), key=lambda item: names.get(item[0], item[0])):
        q = n["queues"]
        flag = " (backoff)" if n["in_backoff"] else ""
        link = n.get("link") or {}
        lost = f"lost {link.get('scheduler_losses', 0)}x {link.get('degraded_seconds_total', 0.0):.0f}s" if link.get("scheduler_losses") else "ok"
        click.echo(
            f"{names.get(address, address):<28}{n['room']:>5.0f}{n['speed']:>7.2f}{n['reliability']:>8.2f}{n['bound']:>6}{n['completed']:>6}"
            f"{n['failed']:>5}{n['iterations_per_second']:>8.1f}  {q['inbound']}/{q['refining']}/{q['outbound']:<9} {lost:<16} {', '.join(n['warm_models'])}{flag}"
        )
        click.echo(f"  {policy_line(n.get('policy_version'), state['policy']['version'])}")
        if peer := n.get("identity"):
            expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(peer["expires"])) if peer.get("expires") else "?"
            click.echo(f"  certificate {peer['name']} ({peer['role']}), key exchange {peer['group']}, "
                       f"{'renewed, ' if peer.get('renewed') else ''}valid until {expires}")
    for name, reason in sorted(state.get("quarantined", {}).items()):
        click.echo(f"quarantined  {name}: {reason}")
    policy = state["policy"]
    click.echo(f"policy version {policy['version']} (the scheduler's, {'signed by ' + policy['signed_by'] if policy.get('signed_by') else 'unsigned'})")
    counts = state["counts"]  # of the run(s) shown; `tasks` details the open ones first, a bounded number
    which = f" of every run ({len(runs)})" if every_run else f" of run {runs[-1]} (the latest of {len(runs)}; --all for every run)" if runs else ""
    click.echo(f"tasks{which}: {', '.join(f'{n} {s}' for s, n in sorted(counts.items())) or 'none'}")
    listed = 0
    for key, t in sorted(state["tasks"].items()):  # the key, for `rqml_decide`
        if t["state"] in ("pending", "bound"):
            listed += 1
            click.echo(f"  {key:<40} {t['state']:<6} {names.get(t['node'], t['node']) or '-':<28} {t['model']}  iteration {t.get('iteration', 0)}"
                       f"  attempts {t['attempts']}")
    if (unlisted := counts.get("pending", 0) + counts.get("bound", 0) - listed) > 0:
        click.echo(f"  ... and {unlisted} more open tasks, not listed")


def policy_line(enforced: int | None, current: int) -> str:
    """What ``rqml status`` says of the policy a node enforces (``enforced``, from its
    heartbeat) against the scheduler's (``current``)."""
    if enforced == current:
        return f"enforces policy version {enforced}"
    return f"enforces policy version {enforced} (not the scheduler's {current}: not applied yet)"


@main.command("events")
@_scheduler_options(required=True, help="The Dask scheduler running the RQML plugin.")
@click.option("--topic", "topics", type=_Topic(), multiple=True, help="A topic to follow (repeatable; default: every RQML topic).")
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: until interrupted).")
def events_command(scheduler: str, connect_timeout: float, topics: tuple[str, ...], seconds: float | None) -> None:
    """Print RQML events live, one JSON line each, of every topic or those given: task_inbound,
    task_results, metrics, heartbeats, alerts, supervision_events (Dask's topic names are
    these with rqml- before them). Stops on Ctrl-C or SIGTERM (exit status 0).
    A lost scheduler is said on stderr; once one answers at the address again (within
    Dask's client reconnection timeout) the events are followed again, else it exits 1."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    deadline = None if seconds is None else time.monotonic() + seconds
    with _client(scheduler, connect_timeout) as client:

        def follow() -> None:  # a scheduler started anew knows no subscriptions
            for topic in topics or TOPICS:
                client.subscribe_topic(topic, _event_printer(topic))

        follow()
        was = "running"
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)
                now = client.status
                if now != "running" and was == "running":
                    click.echo(f"lost the scheduler {scheduler}: waiting for it to answer again", err=True)
                if now in ("closed", "closing", "failed"):
                    raise click.ClickException(f"lost the scheduler {scheduler} and none answered there again")
                if now == "running" and was != "running":
                    follow()
                    click.echo(f"the scheduler {scheduler} answers again: following its events", err=True)
                was = now
        except KeyboardInterrupt:
            pass


def _event_printer(topic: str):
    import json

    def show(event: tuple) -> None:
        payload = event[1] if isinstance(event[1], dict) else {"event": event[1]}
        click.echo(json.dumps({"topic": topic, **payload}, default=str), nl=True)

    return show


@main.group()
def data() -> None:
    """Input data helpers."""


@data.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--array", default="observed", show_default=True, help="The array to write in STORE.")
@click.option("--chunks", type=_ints, metavar="Z,Y,X", help="Chunk shape, z,y,x (default: 32,256,256, capped by the image).")
@click.option("--voxel-size", type=_floats, metavar="Z,Y,X", help="z,y,x voxel size in --unit (default: the file's ImageJ metadata).")
@click.option("--unit", default="micrometer", show_default=True, help="The unit of --voxel-size (an OME-NGFF unit name).")
@click.option("--overwrite", is_flag=True, help="Replace ARRAY if STORE holds it.")
def import_(source: Path, store: Path, array: str, chunks, voxel_size, unit: str, overwrite: bool) -> None:
    """Copy the TIFF stack SOURCE into STORE::ARRAY (Zarr), a slab of planes at a time; with
    a voxel size (given, or in the file), STORE becomes an OME-Zarr image of it."""
    from rqml_dask.ome import VoxelSize
    from rqml_dask.tiff_import import import_tiff

    try:
        image = import_tiff(source, store, array, chunks, VoxelSize(voxel_size, unit) if voxel_size else None, overwrite)
    except ValueError as exc:  # a bad --voxel-size or --unit
        raise click.ClickException(str(exc)) from None
    voxel = f", voxel {image.voxel.scale} {image.voxel.unit or ''}" if image.voxel else ", voxel size unknown (no OME metadata)"
    click.echo(f"wrote {image.store}::{image.array} {image.shape} {image.dtype}, chunks {image.chunks}{voxel}")


@data.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(["beads", "cells", "systems"]), default="cells", show_default=True,
              help="A volume to deconvolve, or a batch of linear systems (linear_solve).")
@click.option("--shape", type=_ints, metavar="Z,Y,X", default="64,128,128", show_default=True, help="Volume shape, z,y,x.")
@click.option("--psf", type=click.Choice(["gaussian", "widefield"]), default="gaussian", show_default=True,
              help="Gaussian, or a scalar widefield model with spherical aberration (out-of-focus rings).")
@click.option("--psf-sigma", type=_floats, metavar="Z,Y,X", default="2.0,1.2,1.2", show_default=True, help="Gaussian PSF sigma per axis (voxels).")
@click.option("--photons", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Counts per unit intensity (Poisson noise); 20 is a dim sample.")
@click.option("--grid", type=_ints, metavar="[Z,]Y,X", default="64,64", show_default=True, help="systems: the grid of each system.")
@click.option("--count", type=click.IntRange(min=1), default=8, show_default=True, help="systems: how many.")
@click.option("--contrast", type=click.FloatRange(min=1), default=100.0, show_default=True,
              help="systems: max/min diffusivity in each system (larger: worse conditioned).")
@click.option("--anisotropy", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="systems: diffusivity factor along the last axis.")
@click.option("--camera-offset", type=click.FloatRange(min=0), default=None,
              help="Camera data: observed is uint16 ADU = gain * photons + this offset + read noise (truth in photons).")
@click.option("--camera-gain", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Camera data: ADU per photon (1 unless given).")
@click.option("--read-noise", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Camera data: Gaussian read noise, ADU (standard deviation).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace STORE if it exists.")
def synth(store: Path, kind: str, shape, psf: str, psf_sigma, photons: float, grid, count: int, contrast: float,
          anisotropy: float, camera_offset: float | None, camera_gain: float | None, read_noise: float, seed: int,
          overwrite: bool) -> None:
    """Write synthetic data to STORE: a ground truth, PSF and blurred noisy observation, or
    (``--kind systems``) right-hand sides, coefficients and direct solutions."""
    from rqml_dask.synthetic import SynthSpec, SystemsSpec, write_synthetic, write_systems

    if store.exists() and not overwrite:
        raise click.ClickException(f"{store} exists: pass --overwrite to replace it")
    try:
        if kind == "systems":
            spec = SystemsSpec(kind=kind, grid=grid, count=count, contrast=contrast, anisotropy=anisotropy, seed=seed)
            path, wrote = write_systems(store, spec), f"rhs, coefficients and truth of {count} systems on {grid}"
        else:
            spec = SynthSpec(kind=kind, shape=shape, psf=psf, psf_sigma=psf_sigma, photons=photons, seed=seed,
                             camera_offset=camera_offset, camera_gain=camera_gain, read_noise=read_noise)
            path, wrote = write_synthetic(store, spec), f"truth, observed and psf {shape}"
            if spec.camera:
                wrote += (f" (observed: uint16 camera data, offset {camera_offset or 0:g} ADU, gain {camera_gain or 1:g} "
                          f"ADU/photon, read noise {read_noise:g} ADU; truth in photons)")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {wrote} to {path}")


@main.command()
@_scheduler_options(required=False, help="List what the workers of this cluster can run (default: this host).")
@click.option("--pipeline", "pipeline_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Ship this pipeline's plugins to the cluster first.")
def models(scheduler: str | None, connect_timeout: float, pipeline_file: Path | None) -> None:
    """List the model families this host, or every worker of a cluster, can run, with their
    task class and family: the registered ones, and those shipped as plugins."""
    from rqml_dask.pipeline.config import load_pipeline_config
    from rqml_dask.pipeline.plugins import available_models, ship_plugins

    plugins = load_pipeline_config(pipeline_file).plugins if pipeline_file is not None else []
    if scheduler is None:
        found = {"this host": available_models()}
    else:
        with _client(scheduler, connect_timeout) as client:
            ship_plugins(client, plugins)
            # a task on each worker, not Client.run: only an admin certificate runs code outside tasks
            workers = client.scheduler_info()["workers"]
            asked = {f"{info.get('name', worker)} ({worker})": client.submit(available_models, workers=[worker],
                                                                            allow_other_workers=False, pure=False)
                     for worker, info in workers.items()}  # each node by its --name, and where it is
            found = dict(zip(asked, client.gather(list(asked.values()))))
    for where, names in sorted(found.items()):
        click.echo(where)
        click.echo(f"  {'model':40s} {'task class':15s} family")
        for name, about in names.items():
            click.echo(f"  {name:40s} {about['task_class']:15s} {about['family']}")


@main.command()
@click.argument("action", type=click.Choice(["list", "release"]))
@click.argument("name", required=False)
@_scheduler_options(required=True, help="The Dask scheduler running the RQML plugin.")
def quarantine(action: str, name: str | None, scheduler: str, connect_timeout: float) -> None:
    """List the nodes in quarantine, with why, or release NAME (it may register again)."""
    if action == "release" and not name:
        raise click.ClickException("rqml quarantine release needs the NAME of a node")
    with _client(scheduler, connect_timeout) as client:
        try:
            left = client.sync(client.scheduler.rqml_quarantine, release=name if action == "release" else None)
        except KeyError as exc:
            raise click.ClickException(str(exc.args[0])) from None
    if action == "release":
        click.echo(f"released {name}")
    for node, reason in sorted(left.items()):
        click.echo(f"{node}: {reason}")
    if not left and action == "list":
        click.echo("no node in quarantine")


@main.group()
def ca() -> None:
    """The cluster's Central Authority: ML-DSA-65 node, scheduler and client certificates."""


_passphrase = click.option("--passphrase", envvar="RQML_CA_PASSPHRASE", default=None,
                           help="The CA key's passphrase (or $RQML_CA_PASSPHRASE); none: the key is stored unencrypted, mode 0600.")


@ca.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="rqml-ca", show_default=True, help="The root certificate's common name.")
@_passphrase
def ca_init(directory: Path, name: str, passphrase: str | None) -> None:
    """Create a CA in DIRECTORY: ca.pem, ca-key.pem (0600) and an empty crl.pem."""
    from rqml_dask.trust import ca as authority

    click.echo(f"wrote {authority.init(directory, name, passphrase)}")


@ca.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option("--role", type=click.Choice(["node", "scheduler", "client"]), required=True)
@click.option("--host", "hosts", multiple=True, help="An IP address or DNS name the holder runs at (repeatable; default 127.0.0.1 and localhost).")
@click.option("--hours", type=float, default=24.0 * 365, show_default=True, help="How long the certificate is valid.")
@_passphrase
def ca_issue(directory: Path, name: str, role: str, hosts: tuple[str, ...], hours: float, passphrase: str | None) -> None:
    """Issue NAME an ML-DSA-65 key and a certificate of ROLE: DIRECTORY/issued/NAME.pem and NAME-key.pem."""
    from rqml_dask.trust import ca as authority

    credential = authority.issue(directory, name, role, hosts or ("127.0.0.1", "localhost"), hours, passphrase)  # type: ignore[arg-type]
    click.echo(f"wrote {credential.cert} and {credential.key}")


@ca.command("revoke")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@_passphrase
def ca_revoke(directory: Path, name: str, passphrase: str | None) -> None:
    """Revoke NAME's certificate: crl.pem is signed again, and pqtls:// peers refuse it from their next connection."""
    from rqml_dask.trust import ca as authority

    serial = authority.revoke(directory, name, passphrase)
    click.echo(f"revoked {name} (serial {serial:x}) in {directory / 'crl.pem'}")


if __name__ == "__main__":
    main()
