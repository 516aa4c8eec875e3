"""A pipeline: a volume cut into RQML tasks, run on a Dask cluster, stitched into Zarr.

Interactive use::

    from distributed import Client
    from rqml_dask import Pipeline

    pipeline = Pipeline.from_yaml("pipelines/quickstart.yaml")
    futures = pipeline.submit(client)          # one Dask future per RQML task
    outcome = futures[0].result()              # a TaskOutcome
    report = pipeline.run(client)              # or: submit, wait, and mark the output complete

The output group's ``rqml`` attribute says ``"status": "incomplete"`` from the moment the
output is created until every task has finished and passed validation; only then does
:meth:`Pipeline.finalize` set it to ``"complete"`` with the run's summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import dask
from distributed import Client, Future, as_completed
from distributed.client import FutureCancelledError
from distributed.comm import get_address_host_port

from rqml_dask import events, ome
from rqml_dask.messages import TERMINAL_STATES, TaskOutcome, TaskTraits, dask_key, new_submission
from rqml_dask.node.checkpointer import Checkpointer
from rqml_dask.node.handover import run_task, run_vote
from rqml_dask.node.results import recorded_outcome
from rqml_dask.camera import OFFSET_FLOOR, Camera, CameraEstimateError, estimate_camera, offset_floor, sample_chunks
from rqml_dask.held_out import estimate_counts_per_unit
from rqml_dask.models import RefinementModel, TaskClass, load_model, load_task_class
from rqml_dask.pipeline.config import PipelineConfig, load_pipeline_config
from rqml_dask.pipeline.plugins import plugin_digest, ship_plugins
from rqml_dask.pipeline.verification import OutcomeCheck, unverified
from rqml_dask.pipeline.voting import NO_INDEPENDENT_VOTER, tally_vote, vote_array, voter_tasks
from rqml_dask.problem import read_input, read_operator
from rqml_dask.run_lock import writing
from rqml_dask.stores import open_store
from rqml_dask.stores.artifacts import ArtifactStore
from rqml_dask.synthetic import SystemsSpec, write_synthetic, write_systems
from rqml_dask.task import ArrayRef, CheckpointSettings, RQMLTask, TaskInput
from rqml_dask.tiling import plan_regions
from rqml_dask.trust.signing import SignatureError
from rqml_dask.volumes import OUTCOMES_ARRAY, InputError, open_array, write_outcome_records


logger = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A run that could not finish: a task failed, or the input was refused."""


SUBMISSIONS = 3
"""How many times a run submits a task whose result does not verify before it gives up on it."""
RECORDS_CHECKED_HERE = 256 * 2**20
"""The largest input (bytes of its image) whose recorded results :meth:`Pipeline.run_recorded`
checks in the client's process (it reads every task's window to digest it): a larger one is
checked by the nodes, where the data is read anyway."""
KEPT_FROM_BEFORE = ("pyramid_of", "drawn")
"""What a run keeps of the output's ``rqml`` attribute from the run before: what the pyramid
(:meth:`Pipeline.finalize`) and the pictures (:func:`rqml_dask.report.drawn_pictures`) were
made from, so that a run whose results are the same ones does not make them again."""


@dataclass(frozen=True)
class _Submission:
    """One submission of a task: its token, the futures of its result and of its voters,
    and which of the task's submissions it is (from 1)."""

    task: RQMLTask
    token: str
    result: Future
    voters: list[Future]
    attempt: int

    @property
    def futures(self) -> list[Future]:
        return [self.result, *self.voters]


@dataclass(frozen=True)
class _Verified:
    """A task's outcome as the run counts it, the submission it came from, and the nodes that
    signed it and its votes (none where the cluster does not sign)."""

    outcome: TaskOutcome
    submission: _Submission
    signers: frozenset[str]


@dataclass
class RunReport:
    """The whole run, as the summary shows it."""

    pipeline: str
    outcomes: list[TaskOutcome]
    elapsed_s: float
    output: str
    input_error: float | None
    output_error: float | None

    @property
    def iterations(self) -> int:
        return sum(o.iterations for o in self.outcomes)

    @property
    def escalations(self) -> int:
        return sum(o.escalations for o in self.outcomes)

    @property
    def rejected(self) -> list[TaskOutcome]:
        """The tasks that ended in any terminal state but ``accepted``."""
        return [o for o in self.outcomes if not o.accepted]

    def summary(self) -> str:
        """What ``rqml run`` prints: the figures, and each task not accepted with why and
        what to do."""
        states: dict[str, int] = {}
        for o in self.outcomes:
            states[o.state] = states.get(o.state, 0) + 1
        lines = [
            f"pipeline     {self.pipeline}",
            f"tasks        {len(self.outcomes)} ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})",
            f"iterations   {self.iterations} (mean {self.iterations / max(len(self.outcomes), 1):.1f} per task)",
            f"escalations  {self.escalations}",
            f"recovered    {sum(o.resumed_from is not None for o in self.outcomes)} resumed from checkpoints, "
            f"{sum(o.reconciled for o in self.outcomes)} finished by nodes without a scheduler, "
            f"{sum(o.reused and not o.reconciled for o in self.outcomes)} reused from an earlier run",
            f"not accepted {len(self.rejected)}",
            f"time         {self.elapsed_s:.1f} s",
            f"output       {self.output}",
        ]
        held = [o.held_out for o in self.outcomes if o.held_out is not None]
        if held:  # what a user without a ground truth can judge a run by
            lines.append(
                f"held-out fit {sum(h.input for h in held) / len(held):.4f} for the input -> "
                f"{sum(h.result for h in held) / len(held):.4f} for the result (Poisson deviance per voxel, lower is "
                f"better), at iteration {sum(h.iteration for h in held) / len(held):.0f} on average"
            )
        chosen = [h.strength for h in held if h.strength is not None]
        if chosen:  # a regularising rung whose strength each task chose from its held-out counts
            counts = {strength: chosen.count(strength) for strength in sorted(set(chosen))}
            lines.append("strength     chosen by the held-out counts: " +
                         ", ".join(f"{strength:g} in {n} task{'s' * (n != 1)}" for strength, n in counts.items()) +
                         " (0: no strength beat the unregularised result)")
        if self.output_error is not None:
            lines.append(
                f"error vs truth (relative RMSE): input {self.input_error:.4g} -> output {self.output_error:.4g}"
            )
        for o in self.rejected:
            why = "; ".join(o.validation_failures) if o.state == "rejected" else o.reason
            lines.append(f"  {o.task_id}: {o.state}{f' ({why})' if why else ''}; to do: {TERMINAL_STATES[o.state]}")
        return "\n".join(lines)


class Pipeline:
    """A validated pipeline configuration and the RQML tasks it cuts the volume into."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.camera_note: str | None = None
        """How :meth:`tasks` reads the image as camera data, for ``rqml run``'s summary; ``None``: not."""
        self.halo_note: str | None = None
        """The halo the tasks read and the one their operator needs (set by :meth:`tasks`)."""
        self.transform_note: str | None = None
        """What the largest window computes on (its FFTs' shape, for deconvolution) and how many
        times its core's voxels that is (set by :meth:`tasks`)."""
        self.held_out_note: str | None = None
        """Which of the ladder's models the held-out rule cannot check, where it is on (set by
        :meth:`tasks`); ``None``: it checks every one, or it is off."""

    @classmethod
    def from_yaml(cls, path: str | Path) -> Pipeline:
        return cls(load_pipeline_config(path))

    @property
    def checkpoint_settings(self) -> CheckpointSettings:
        spec = self.config.checkpoint
        artifacts = (spec.artifacts or Path(f"{self.config.input.store}.checkpoints")).absolute()
        return CheckpointSettings(
            local=spec.local or f"lmdb://{artifacts}/nodes/{{host}}.lmdb",
            artifacts=str(artifacts),
            shared=spec.shared,
            enabled=spec.enabled,
            every_iterations=spec.every_iterations,
            every_seconds=spec.every_seconds,
            retention=spec.retention,
        )

    @property
    def task_class(self) -> TaskClass:
        return load_task_class(self.config.task_class)

    @property
    def output_ref(self) -> ArrayRef:
        return ArrayRef(str(self.config.output.store), self.config.output.array or self.task_class.default_output)

    @property
    def input_refs(self) -> TaskInput:
        spec = self.config.input
        store = str(spec.store)
        truth = spec.truth
        if truth is None and spec.synthesize is not None:
            truth = "truth"
        return TaskInput(
            image=ArrayRef(store, ome.image_array(store, spec.image)),
            operator=ArrayRef(str(spec.operator_store or store), spec.operator or self.task_class.default_operator),
            truth=ArrayRef(store, truth) if truth else None,
            accept_saturated=spec.accept_saturated,
        )

    @property
    def voxel_size(self) -> ome.VoxelSize | None:
        """The input's voxel size: the pipeline file's ``input.voxel_size``, else an OME
        input's own, else ``None`` (unknown)."""
        spec = self.config.input
        if spec.voxel_size is not None:
            return ome.VoxelSize(tuple(spec.voxel_size), spec.unit)
        return ome.voxel_size(str(spec.store), spec.image)

    def _counts_per_unit(self, image: zarr.Array) -> float | None:
        """Photons per unit intensity of ``image`` (see ``input.counts_per_unit``), or
        ``None`` if the held-out stopping rule is off. Reads at most one chunk."""
        if self.config.convergence.held_out_fraction == 0 or not self.task_class.photon_counts:
            return None
        if self.config.input.counts_per_unit is not None:
            return self.config.input.counts_per_unit
        if self.config.input.camera is not None:
            return 1.0  # read as photon counts
        synthetic = zarr.open_group(self.config.input.store, mode="r").attrs.get("rqml_synthetic")
        if isinstance(synthetic, dict) and synthetic.get("photons"):
            return float(synthetic["photons"])
        if np.issubdtype(image.dtype, np.integer):
            return 1.0
        try:
            return estimate_counts_per_unit(image[tuple(slice(0, c) for c in image.chunks)])
        except ValueError as exc:
            raise InputError(f"{self.input_refs.image}: {exc}") from None

    def _camera(self, image: zarr.Array) -> Camera | None:
        """The camera ``image`` is read with (``input.camera``): as given, or estimated from
        at most :data:`~rqml_dask.camera.SAMPLE_CHUNKS` of its chunks; ``None`` without one.
        Sets :attr:`camera_note`. Refuses (:class:`InputError`) a camera for a task class
        that takes no photon counts, data no camera can be estimated from, and, with no
        camera given, an integer image of photon counts whose floor (in the same few chunks)
        is at least :data:`~rqml_dask.camera.OFFSET_FLOOR`: a camera's offset, not photons."""
        spec, ref = self.config.input.camera, self.input_refs.image
        self.camera_note = None
        if spec is None:
            if self.task_class.photon_counts and np.issubdtype(image.dtype, np.integer):
                sample = sample_chunks(image)
                if (floor := offset_floor(sample)) >= OFFSET_FLOOR:
                    raise InputError(
                        f"{ref} looks like camera data: its darkest values are at {floor:g} (0.5th percentile of "
                        f"{len(sample)} chunk(s); minimum {min(int(c.min()) for c in sample)}), an offset, not photon "
                        f"counts: set input.camera: {{offset: ADU, gain: ADU per photon}} or input.camera: auto to "
                        "estimate them (or, for photon counts, input.camera: {offset: 0, gain: 1})")
            return None
        if not self.task_class.photon_counts:
            raise InputError(f"input.camera: {self.config.task_class} tasks do not take photon counts; remove it")
        if not spec.estimate:
            camera = Camera(offset=spec.offset, gain=spec.gain, read_noise=spec.read_noise)
            self.camera_note = f"{camera} (given)"
            return camera
        try:
            estimate = estimate_camera(sample_chunks(image))
        except CameraEstimateError as exc:
            raise InputError(f"{ref}: input.camera: auto: {exc}: set input.camera: {{offset: ADU, gain: ADU per photon}}") from None
        camera = estimate.camera
        if spec.read_noise:  # the estimate's offset holds the read-noise pedestal: give it to the models instead
            camera = Camera(offset=camera.offset + spec.read_noise**2 / camera.gain, gain=camera.gain,
                            read_noise=spec.read_noise)
        self.camera_note = f"{camera} (estimated from {estimate.chunks} chunk(s), {estimate.voxels} voxels; gain +- {estimate.gain_error:.2f})"
        return camera

    def ensure_input(self) -> None:
        """Generate the synthetic input if the pipeline asks for it and it is missing."""
        spec = self.config.input
        if spec.synthesize is not None and not spec.store.exists():
            if isinstance(spec.synthesize, SystemsSpec):
                write_systems(spec.store, spec.synthesize)
            else:
                write_synthetic(spec.store, spec.synthesize)

    def tasks(self) -> list[RQMLTask]:
        """The pipeline's RQML tasks; reads only array metadata, and checks it."""
        self.ensure_input()
        refs = self.input_refs
        image = open_array(refs.image)
        if refs.truth is not None and open_array(refs.truth).shape != image.shape:
            raise InputError(f"truth {refs.truth} has shape {open_array(refs.truth).shape}, image {image.shape}")
        operator = read_operator(self.task_class, refs.operator, None, refs.image)
        voxel = self.config.input.voxel_size
        if voxel is not None and len(voxel) != image.ndim:
            raise InputError(f"input.voxel_size {tuple(voxel)} has {len(voxel)} axes, the image {refs.image} has {image.ndim}")
        tiling = self.config.tiling
        if len(tiling.tile) != image.ndim:
            raise InputError(f"tiling.tile {tiling.tile} has rank {len(tiling.tile)}, image {refs.image} has rank {image.ndim}")
        halo = tiling.halo
        iterations = self.config.convergence.max_iterations
        needed = tuple(self.task_class.halo(operator, image.ndim, iterations))
        if halo == "auto":
            halo = needed
        elif isinstance(halo, int):
            halo = (halo,) * image.ndim
        self.halo_note = (f"{tuple(halo)} voxels per side ("
                          + ("auto: " if tiling.halo == "auto" else f"{needed} ")
                          + f"what this {self.task_class.operator_key} needs for up to {iterations} iterations"
                          + (")" if all(h >= n for h, n in zip(halo, needed)) else "): tiles may differ from an untiled run"))
        regions = plan_regions(image.shape, tiling.tile, halo)
        largest = max(regions, key=lambda r: math.prod(b - a for a, b in r.window))
        transform = self.task_class.transform_shape(operator, tuple(b - a for a, b in largest.window))
        self.transform_note = (f"a tile computes on {transform}: {math.prod(transform) / math.prod(b - a for a, b in largest.core):.2f}x "
                               "its core's voxels")
        models = self.config.models
        checkpoint = self.checkpoint_settings
        refs = replace(refs, counts_per_unit=self._counts_per_unit(image), camera=self._camera(image))
        blind = [name for name in models.ladder if load_model(name).prediction is RefinementModel.prediction]
        self.held_out_note = None if refs.counts_per_unit is None or not blind else (
            f"not for {', '.join(blind)}: without prediction() (the data its estimate predicts) neither the held-out "
            "stopping rule nor the guard against results worse than the input checks it (README: Writing a model family)")
        width = len(str(len(regions) - 1))
        return [
            RQMLTask(
                task_id=f"{self.config.name}/{i:0{width}d}",
                task_class=self.config.task_class,
                region=region,
                input=refs,
                output=self.output_ref,
                model_ladder=tuple(models.ladder),
                model_params={k: dict(v) for k, v in models.params.items()},
                priority=self.config.tasks.priority,
                expected_difficulty=self.config.tasks.expected_difficulty,
                convergence=self.config.convergence,
                validation=self.config.validation,
                checkpoint=checkpoint,
                plugin_digest=plugin_digest(self.config.plugins),
            )
            for i, region in enumerate(regions)
        ]

    def check_output(self, tasks: list[RQMLTask], overwrite: bool = False) -> None:
        """Refuse (:class:`PipelineError`) an output that this run would destroy: a path that
        is not a Zarr group, or a group written by another pipeline configuration (other
        tasks: shape, tiling, models or settings) or holding arrays of another shape or
        chunking, unless ``overwrite``. Reads metadata only; writes nothing."""
        store = Path(self.config.output.store)
        if store.exists() and not store.is_dir():
            raise PipelineError(f"output {store} exists and is not a Zarr group (a file): choose another output.store")
        if not store.exists() or overwrite:
            return
        try:
            group = zarr.open_group(store, mode="r")
        except Exception as exc:
            raise PipelineError(f"output {store} exists and is not a readable Zarr group ({exc}): "
                                "choose another output.store, or pass --overwrite") from None
        recorded = dict(group.attrs).get("rqml", {}).get("configuration")
        if recorded is not None and recorded != _configuration(tasks):
            raise PipelineError(f"output {store} was written by another pipeline configuration: pass --overwrite to "
                                "replace it, or choose another output.store")
        shape, chunks = self._output_layout()
        for name in self._output_arrays():
            existing = group.get(name)
            if existing is not None and not (isinstance(existing, zarr.Array) and existing.shape == shape
                                             and existing.chunks == chunks and existing.dtype == self.task_class.dtype):
                found = f"shape {existing.shape}, chunks {existing.chunks}" if isinstance(existing, zarr.Array) else "a group"
                raise PipelineError(f"output {store}::{name} holds {found}, this pipeline writes shape {shape}, chunks "
                                    f"{chunks}: pass --overwrite to replace it, or choose another output.store")

    def create_output(self, tasks: list[RQMLTask]) -> None:
        """Create the output array chunked by task core, or keep the one a previous run of
        this pipeline left (its finished cores are reused); mark it incomplete. Check it
        first (:meth:`prepare`)."""
        shape, chunks = self._output_layout()
        axes = self.task_class.image_axes(len(shape))
        group = zarr.open_group(self.config.output.store, mode="a")
        for name in self._output_arrays():
            existing = group.get(name)
            if not (isinstance(existing, zarr.Array) and existing.shape == shape and existing.chunks == chunks
                    and existing.dtype == self.task_class.dtype and existing.metadata.dimension_names == axes):
                group.create_array(name, shape=shape, chunks=chunks, dtype=self.task_class.dtype, dimension_names=axes,
                                   overwrite=True)
        if OUTCOMES_ARRAY in group:  # an earlier run's: not this one's
            del group[OUTCOMES_ARRAY]
        refs = self.input_refs
        before = group.attrs.get("rqml")
        kept = {key: before[key] for key in KEPT_FROM_BEFORE if isinstance(before, dict) and key in before}
        group.attrs["rqml"] = {
            "status": "incomplete",
            "pipeline": self.config.name,
            "task_class": self.config.task_class,
            "configuration": _configuration(tasks),
            "tasks": len(tasks),
            "input": {"image": asdict(refs.image), "truth": asdict(refs.truth) if refs.truth else None},
            "array": self.output_ref.path,
            "started": datetime.now(timezone.utc).isoformat(),
            **kept,
        }
        ome.remove_image(str(self.config.output.store))  # not an image again until accepted (after: `group` holds the old attributes)

    def _output_layout(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The output arrays' shape and chunks (one chunk per task core)."""
        image = open_array(self.input_refs.image)
        return tuple(image.shape), tuple(min(t, n) for t, n in zip(self.config.tiling.tile, image.shape))

    def _output_arrays(self) -> list[str]:
        array = self.output_ref.path
        return [array] + [vote_array(array, m) for m in self.config.validation.vote_models]

    def prepare(self, overwrite: bool = False) -> list[RQMLTask]:
        """The pipeline's tasks, once their input's metadata and their output are checked
        (:meth:`tasks`, :meth:`check_output`): what :meth:`submit` and :meth:`run` need, done
        before any cluster starts if the caller wants (``rqml run`` does). Reads no more than
        metadata, the operator and one chunk: the input's values are checked by the nodes, each
        in the window it reads (:func:`~rqml_dask.volumes.read_window`)."""
        tasks = self.tasks()
        self.check_output(tasks, overwrite)
        return tasks

    def run_recorded(self, tasks: list[RQMLTask]) -> RunReport | None:
        """The run answered from this host's records, with no cluster: where every task's
        result is recorded and valid (:meth:`_recorded_outcomes`), the output is finalized
        with those outcomes (all ``reused``) as :meth:`run` would, and the report returned;
        else ``None`` (results copied into the output on the way stay there, and a run on a
        cluster reuses them). ``tasks`` is what :meth:`prepare` returned."""
        local = self._records_here(tasks)
        if local is None:
            return None
        with writing(Path(self.config.output.store)):
            started = time.perf_counter()
            self.create_output(tasks)
            outcomes = self._recorded_outcomes(tasks, local)
            if outcomes is None:
                return None
            return self.finalize(sorted(outcomes, key=lambda o: o.task_id), time.perf_counter() - started, tasks)

    def _records_here(self, tasks: list[RQMLTask]) -> str | None:
        """The URL of this host's LMDB of done markers, where :meth:`run_recorded` checks
        them in this process; ``None`` where the nodes must check them (checkpoints off;
        votes: a voter's verdict is a computation; an input over :data:`RECORDS_CHECKED_HERE`)
        or there is none."""
        settings = self.checkpoint_settings
        if (not settings.enabled or any(task.validation.vote_models for task in tasks)
                or open_array(self.input_refs.image).nbytes > RECORDS_CHECKED_HERE):
            return None
        local = settings.local.replace("{host}", socket.gethostname())
        return local if Path(local.removeprefix("lmdb://")).exists() else None

    def _recorded_outcomes(self, tasks: list[RQMLTask], local: str) -> list[TaskOutcome] | None:
        """Every task's outcome as an earlier run recorded it in the LMDB at ``local``,
        checked here as a node of the embedded cluster checks it before reusing it
        (:func:`~rqml_dask.node.results.recorded_outcome`: the done marker made from the
        task's input as it reads now, its result in the output or copied there), in task
        order; ``None`` as soon as one task has none (it needs computing). Reads each task's
        window; writes only results copied into the output (create it first). Unsigned
        records: a ``pqtls://`` cluster's nodes check their signatures."""
        store = open_store(local)
        settings = self.checkpoint_settings
        shared = open_store(settings.shared) if settings.shared else None
        checkpointer = Checkpointer(store, shared, ArtifactStore(settings.artifacts), node=socket.gethostname())
        try:
            outcomes = []
            for task in tasks:
                outcome = recorded_outcome(read_input(task).task, checkpointer)
                if outcome is None:
                    return None
                outcomes.append(outcome)
            return outcomes
        finally:
            checkpointer.stop()
            store.close()

    def submit(self, client: Client, overwrite: bool = False, tasks: list[RQMLTask] | None = None) -> list[Future]:
        """Create the output and submit one Dask task per RQML task (and its voters, if it
        votes); ``tasks`` is what :meth:`prepare` returned, else it is called here. The
        futures of the tasks' outcomes as their nodes deliver them: :meth:`run` also
        verifies each one (on a cluster that signs) and tallies the votes."""
        tasks = self.prepare(overwrite) if tasks is None else tasks
        self.create_output(tasks)
        ship_plugins(client, self.config.plugins)
        return [self._submit_task(client, task).result for task in tasks]

    def _submit_task(self, client: Client, task: RQMLTask, attempt: int = 1) -> _Submission:
        """One submission of ``task`` and of its voters, under a fresh unguessable token
        (:func:`~rqml_dask.messages.dask_key`): nodes that refine or finished the task join
        it by its task key; nothing is reused through Dask keys."""
        token = new_submission()
        result = self._submit_one(client, run_task, task, token, task, token)
        voters = [self._submit_one(client, run_vote, voter, token, voter, token, result, task.key) for voter in voter_tasks(task)]
        return _Submission(task, token, result, voters, attempt)

    @staticmethod
    def _submit_one(client: Client, function, task: RQMLTask, token: str, *args) -> Future:
        traits = TaskTraits(task.key, task.task_class, task.model_ladder[0], task.priority, task.expected_difficulty,
                            core=task.region.core)
        with dask.annotate(rqml=asdict(traits)):  # read by the RQML scheduler plugin, if installed
            return client.submit(function, *args, key=dask_key(task.key, token), priority=task.priority)

    def run(
        self, client: Client, progress: bool = True, reconnect_timeout: float = 300.0, overwrite: bool = False,
        tasks: list[RQMLTask] | None = None,
    ) -> RunReport:
        """Submit every task, wait for all of them, and finalize the output. ``tasks`` is
        what :meth:`prepare` returned, else it is called here (an existing output another
        configuration wrote is refused unless ``overwrite``).

        Every outcome is checked before it counts (:class:`~rqml_dask.pipeline.verification.OutcomeCheck`):
        on a ``pqtls://`` cluster it must be signed, for this submission, by a node of the
        cluster's CA that is neither revoked nor quarantined (the quarantine is asked again
        before the run is finalized), and so must each of its voters' verdicts, which are
        tallied here. A task whose result does not verify is submitted again (under a new
        token; at most :data:`SUBMISSIONS` times in all) with an ``outcome-unverified`` alert,
        and is not accepted if none verifies.

        If the client loses the scheduler, the tasks not yet returned are submitted again
        once a scheduler answers at the same address (Dask cancels a client's futures when
        its scheduler connection breaks): nodes that kept refining them join the new
        submissions, and results they finished meanwhile are returned from their stores.
        The loss and the return are logged as warnings (``rqml run`` prints them). The run
        polls the address itself and goes on through a client of its own as soon as it
        answers (``client``'s own reconnection backs off exponentially: after an outage of a
        few seconds it may take as long again); ``reconnect_timeout`` bounds the wait.

        One live run per output store (:mod:`rqml_dask.run_lock`): a run of the same output
        by another process or thread is refused with :class:`~rqml_dask.run_lock.OutputBusy`
        before anything is read or written."""
        with writing(Path(self.config.output.store)):
            return self._run(client, progress, reconnect_timeout, overwrite, tasks)

    def _run(self, client: Client, progress: bool, reconnect_timeout: float, overwrite: bool,
             tasks: list[RQMLTask] | None) -> RunReport:
        started = time.perf_counter()
        tasks = self.prepare(overwrite) if tasks is None else tasks
        self.create_output(tasks)
        ship_plugins(client, self.config.plugins)
        check = OutcomeCheck.for_client(client)
        pending = {task.key: self._submit_task(client, task) for task in tasks}
        verified: dict[str, _Verified] = {}
        bar = _progress_bar(len(tasks), self.config.name, progress)
        live = _LiveIterations(client, bar, self.config.name)
        own_client: Client | None = None  # ours, after a scheduler loss
        try:
            while pending:
                lost = self._collect(client, check, pending, verified, bar, live)
                if lost:
                    address = client.scheduler.address
                    logger.warning("lost the scheduler %s with %d task(s) not returned: waiting up to %g s for one to "
                                   "answer there; the nodes keep refining meanwhile", address, len(lost), reconnect_timeout)
                    if own_client is not None:
                        own_client.close()
                    client = own_client = live.client = _client_when_back(client, reconnect_timeout)
                    ship_plugins(client, self.config.plugins)  # a scheduler started anew has none
                    for task in lost:
                        pending[task.key] = self._submit_task(client, task, pending[task.key].attempt)
                    logger.warning("the scheduler %s answers again: %d task(s) submitted again", address, len(lost))
                    continue
                quarantine = check.refresh_quarantine(client)  # what was quarantined since a result verified
                for key, done in list(verified.items()):
                    if (signer := next((n for n in done.signers if n in quarantine), None)) is not None:
                        del verified[key]
                        bar.update(-1)
                        self._refused(client, done.submission, f"signed by {signer}, a node in quarantine ({quarantine[signer]})",
                                      pending, verified)
        except BaseException:
            if client.status == "running":
                client.cancel([future for submission in pending.values() for future in submission.futures])
            raise
        finally:
            live.stop()
            bar.close()
            if own_client is not None:
                own_client.close()
        outcomes = sorted((done.outcome for done in verified.values()), key=lambda o: o.task_id)
        return self.finalize(outcomes, time.perf_counter() - started, tasks, client)

    def _collect(self, client: Client, check: OutcomeCheck, pending: dict[str, _Submission], verified: dict[str, _Verified],
                 bar, live: _LiveIterations) -> list[RQMLTask]:
        """Wait for every submission in ``pending`` (and those it submits again), moving
        each task whose result and votes verified into ``verified``; the tasks whose futures
        were cancelled by a lost scheduler connection, to be submitted again."""
        lost: dict[str, RQMLTask] = {}
        by_key = {future.key: submission for submission in pending.values() for future in submission.futures}
        arrived: dict[str, Any] = {}  # future key -> its result: each fetched from the cluster once
        # the futures' own loop: as_completed otherwise waits on the default client's
        arrivals = as_completed([f for submission in pending.values() for f in submission.futures], loop=client.loop)
        for future in arrivals:
            submission = by_key.pop(future.key)
            task = submission.task
            if pending.get(task.key) is not submission or task.key in lost:
                continue  # submitted again meanwhile, or already lost
            try:
                arrived[future.key] = future.result()
            except FutureCancelledError as exc:
                if exc.reason != "scheduler-connection-lost":
                    raise PipelineError(f"task {task.task_id} was cancelled: {exc.reason}") from exc
                lost[task.key] = task
                continue
            except Exception as exc:
                raise PipelineError(f"task {task.task_id} failed: {exc}") from exc
            if not all(f.key in arrived for f in submission.futures):
                continue
            try:
                verified[task.key] = self._verify(check, submission, [arrived.pop(f.key) for f in submission.futures])
            except SignatureError as exc:
                if (again := self._refused(client, submission, str(exc), pending, verified)) is not None:
                    by_key.update({f.key: again for f in again.futures})
                    arrivals.update(again.futures)
                continue
            del pending[task.key]
            bar.update(1)
            outcome = verified[task.key].outcome
            live.escalations += outcome.escalations
            if any(NO_INDEPENDENT_VOTER in failure for failure in outcome.validation_failures):
                self._alert(client, "no-independent-voter", task_id=task.task_id, key=task.key,
                            reason=f"{task.task_id} is not accepted: its voters ran on the node of its result "
                                   "(add a node: a node cannot vouch for itself)")
        return list(lost.values())

    @staticmethod
    def _verify(check: OutcomeCheck, submission: _Submission, results: list[Any]) -> _Verified:
        """The task's outcome, its votes tallied, once its result and every verdict verified
        (:class:`SignatureError` saying which did not); ``results`` are those of
        ``submission.futures``, in their order (its result, then its voters')."""
        task, (outcome, *verdicts) = submission.task, results
        if outcome.task_id != task.task_id:
            raise SignatureError(f"the result delivered for {task.task_id} is the outcome of task {outcome.task_id}")
        signer = check.signer(outcome, task.key, submission.token)
        voters = []
        for voter_task, verdict in zip(voter_tasks(task), verdicts):
            try:
                voters.append((verdict, check.signer(verdict, voter_task.key, submission.token)))
            except SignatureError as exc:
                raise SignatureError(f"the vote of {voter_task.task_id}: {exc}") from None
        if voters:
            outcome = tally_vote(task, outcome, signer, voters)
        return _Verified(outcome, submission, frozenset([signer, *(node for _, node in voters)]) if check.signs else frozenset())

    @staticmethod
    def _alert(client: Client, kind: str, **payload: Any) -> None:
        """An ``rqml-alerts`` event from this client (for the pages and ``rqml status``); the
        run goes on without it where the scheduler does not take it."""
        with contextlib.suppress(Exception):
            events.publish(client, events.ALERTS, kind, **payload)

    def _refused(self, client: Client, submission: _Submission, reason: str, pending: dict[str, _Submission],
                 verified: dict[str, _Verified]) -> _Submission | None:
        """A result of ``submission`` that did not verify (``reason``): an
        ``outcome-unverified`` alert, and the task submitted again (its new submission,
        put in ``pending``) or, after :data:`SUBMISSIONS` submissions, not accepted (an
        :func:`~rqml_dask.pipeline.verification.unverified` outcome in ``verified``)."""
        task = submission.task
        again = submission.attempt < SUBMISSIONS
        logger.warning("the result of %s was not accepted: %s; %s", task.task_id, reason,
                       "computing it again" if again else f"no verified result after {SUBMISSIONS} submissions")
        self._alert(client, "outcome-unverified", task_id=task.task_id, key=task.key, reason=reason, submitted_again=again)
        with contextlib.suppress(Exception):  # let go of the refused data (and of recomputing it, were its node gone)
            client.cancel(submission.futures)
        if not again:
            pending.pop(task.key, None)
            verified[task.key] = _Verified(unverified(task.task_id, reason), submission, frozenset())
            return None
        pending[task.key] = resubmitted = self._submit_task(client, task, submission.attempt + 1)
        return resubmitted

    def finalize(self, outcomes: list[TaskOutcome], elapsed_s: float, tasks: list[RQMLTask],
                 client: Client | None = None) -> RunReport:
        """Build the report; mark the output ``complete`` only if every task was accepted,
        else ``rejected`` (with each task's terminal state and core, for ``rqml report``).
        A complete image result is made an OME-Zarr image (:func:`rqml_dask.ome.write_image`),
        its pyramid computed on ``client``'s cluster (``None``: in this process)."""
        errors = [o.error for o in outcomes if o.error is not None]
        truth_ss = sum(e.truth_ss for e in errors)
        report = RunReport(
            pipeline=self.config.name,
            outcomes=outcomes,
            elapsed_s=elapsed_s,
            output=str(self.output_ref),
            input_error=math.sqrt(sum(e.input_sse for e in errors) / truth_ss) if errors else None,
            output_error=math.sqrt(sum(e.output_sse for e in errors) / truth_ss) if errors else None,
        )
        cores = {task.task_id: task.region.core for task in tasks}
        group = zarr.open_group(self.config.output.store, mode="r+")
        attrs: dict[str, Any] = dict(group.attrs["rqml"])
        attrs.update(
            status="complete" if not report.rejected else "rejected",
            finished=datetime.now(timezone.utc).isoformat(),
            iterations=report.iterations,
            escalations=report.escalations,
            rejected={o.task_id: o.state for o in report.rejected},
            input_error=report.input_error,
            output_error=report.output_error,
            outcomes=write_outcome_records(self.config.output.store, [_outcome_record(o, cores.get(o.task_id)) for o in outcomes]),
        )
        attrs["results"] = results_digest(outcomes)
        axes = self.task_class.image_axes(group[self.output_ref.path].ndim)
        if not report.rejected and axes is not None:
            attrs["pyramid"], attrs["pyramid_of"] = self._pyramid(group, attrs, axes, client)
        zarr.open_group(self.config.output.store, mode="r+").attrs["rqml"] = attrs  # opened anew: it has the OME metadata
        return report

    def _pyramid(self, group: zarr.Group, attrs: dict[str, Any], axes: tuple[str, ...],
                 client: Client | None) -> tuple[list[str], dict[str, Any]]:
        """Make the output an OME image (:func:`rqml_dask.ome.write_image`, on ``client``'s
        cluster) and return its levels' paths and what they were made from
        (``pyramid_of``: a key of the results, axes, voxel size and levels, and the OME
        metadata). Where the run before made them of the same (``attrs``' ``pyramid_of``,
        kept by :meth:`create_output`) and its levels are there, its metadata is put back
        and nothing is computed. Before the levels are written anew, the old record is taken
        off the output, so a run that stops half way leaves none."""
        store = str(self.config.output.store)
        voxel = self.voxel_size
        key = hashlib.sha256(json.dumps([attrs["results"], self.output_ref.path, list(axes), self.config.output.pyramid,
                                         None if voxel is None else [list(voxel.scale), voxel.unit]]).encode()).hexdigest()[:32]
        before = attrs.pop("pyramid_of", None)
        if before is not None and before.get("key") == key and all(path in group for path in before["levels"]):
            group.attrs.update(before["ome"])
            return before["levels"], before
        stored = dict(group.attrs["rqml"])
        if stored.pop("pyramid_of", None) is not None:
            group.attrs["rqml"] = stored
        levels = ome.write_image(store, self.output_ref.path, axes, voxel, self.config.output.pyramid, scheduler=client)
        image = zarr.open_group(store, mode="r").attrs
        return levels, {"key": key, "levels": levels, "ome": {name: image[name] for name in ome.IMAGE_ATTRIBUTES if name in image}}


def results_digest(outcomes: list[TaskOutcome]) -> str:
    """A digest of the results a run's output holds: each task's core (its digest, ``None``
    where it has no result), by task: equal for two runs whose output arrays are equal."""
    return hashlib.sha256("\n".join(sorted(f"{o.task_id} {o.result_digest}" for o in outcomes)).encode()).hexdigest()[:32]


def _configuration(tasks: list[RQMLTask]) -> str:
    """A digest of the tasks' keys: equal for runs of pipelines that compute the same result."""
    return hashlib.sha256("\n".join(sorted(t.key for t in tasks)).encode()).hexdigest()[:16]


def _outcome_record(outcome: TaskOutcome, core: tuple[tuple[int, int], ...] | None) -> dict[str, Any]:
    """What the output's ``rqml`` attribute keeps of a task (JSON: a non-finite figure is ``null``)."""
    return {
        "task_id": outcome.task_id,
        "state": outcome.state,
        "status": outcome.status,
        "iterations": outcome.iterations,
        "model": outcome.model,
        "escalations": outcome.escalations,
        "node": outcome.node,
        "core": [list(axis) for axis in core] if core is not None else None,
        "models": [_finite(vars(run)) for run in outcome.models],
        "validation_failures": outcome.validation_failures,
        "held_out": asdict(outcome.held_out) if outcome.held_out is not None else None,
        "trace": [_finite(vars(point)) for point in outcome.trace],
    }


def _finite(fields: dict[str, Any]) -> dict[str, Any]:
    """A new dict of ``fields`` (a flat dataclass's ``vars``: faster than ``asdict``, which
    deep-copies, 1 ms an outcome), a non-finite float ``None``."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}


def _client_when_back(client: Client, timeout: float) -> Client:
    """A new client of the scheduler at ``client``'s address, as soon as one answers there."""
    address = client.scheduler.address
    host, port = get_address_host_port(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return Client(address, security=client.security, timeout=30, set_as_default=False)
        except OSError:
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"lost the scheduler {address} and none answered there within {timeout:g} s; run the "
                    "pipeline again: finished results are kept by the nodes and reused"
                ) from None
            time.sleep(0.2)


def _progress_bar(total: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="task", disable=not enabled, dynamic_ncols=True)


class _LiveIterations:
    """Shows on ``bar`` the iterations the tasks of the run ``run`` (the pipeline's name)
    have reached, as the RQML scheduler plugin has them from the nodes' heartbeats, every
    ``interval`` seconds: a bar of finished tasks alone sits at 0 % until the first task
    ends. Silent where the scheduler has no RQML plugin or does not answer."""

    def __init__(self, client: Client, bar, run: str, interval: float = 2.0) -> None:
        self.client, self.bar, self.run, self.interval = client, bar, run, interval
        self.escalations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="rqml-progress", daemon=True)
        if not bar.disable:
            self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                status = self.client.sync(self.client.scheduler.rqml_status, limit=0, run=self.run, callback_timeout=self.interval)
                iterations = status["runs"][self.run]["iterations"]
            except Exception:
                continue
            self.bar.set_postfix(iterations=iterations, escalations=self.escalations)

    def stop(self) -> None:
        self._stop.set()
