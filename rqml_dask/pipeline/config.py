"""The pipeline YAML schema, and loading a file with errors that name the file and the key.

A pipeline file is validated completely before anything runs: unknown keys, wrong types,
out-of-range values, names that would make paths outside their place (``name``,
``output.array``, the input's arrays: :mod:`rqml_dask.names`), unknown model names and model
parameters a model does not take are refused with ``FILE: key.path: what was expected``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rqml_dask.arrays import numpy_backend
from rqml_dask.models import ModelCheckError, UnknownModelError, check_model, load_model, load_task_class
from rqml_dask.names import ArrayPath, Name
from rqml_dask.pipeline.plugins import PluginError, import_plugins
from rqml_dask.strength import strength_grid
from rqml_dask.synthetic import SynthSpec, SystemsSpec
from rqml_dask.task import ConvergenceSettings, ValidationSettings


class PipelineConfigError(ValueError):
    """A pipeline file that cannot be used; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraSpec(_Strict):
    """How a camera's raw values (ADU) are photons: ``ADU = gain * photons + offset``,
    ``offset`` in ADU (the dark level, >= 0) and ``gain`` in ADU per photon (> 0), with the
    camera's ``read_noise`` (ADU, standard deviation; 0 by default) if known; or
    ``auto`` (long form ``{estimate: true}``): both estimated from a few chunks of the
    image (:func:`rqml_dask.camera.estimate_camera`), ``{estimate: true, read_noise: ADU}``
    to give the read noise with them (it is not separable from the offset in the data)."""

    offset: float | None = Field(default=None, ge=0)
    gain: float | None = Field(default=None, gt=0)
    read_noise: float = Field(default=0.0, ge=0)
    estimate: bool = False

    @model_validator(mode="before")
    @classmethod
    def _auto(cls, data: Any) -> Any:
        if data == "auto":
            return {"estimate": True}
        if isinstance(data, str):
            raise ValueError(f"expected auto or {{offset: ADU, gain: ADU per photon}}, got {data!r}")
        return data

    @model_validator(mode="after")
    def _complete(self) -> CameraSpec:
        given = (self.offset is not None, self.gain is not None)
        if self.estimate and any(given):
            raise ValueError("give offset and gain, or auto to estimate them, not both")
        if not self.estimate and not all(given):
            raise ValueError("give both offset (ADU) and gain (ADU per photon), or auto to estimate them")
        return self


class InputSpec(_Strict):
    """Where the data is: ``image``, the array refined against, and ``operator``, read with
    it (the PSF of a deconvolution, the coefficients of a linear solve; unset, the task
    class's own name for it). ``synthesize`` generates the store first if it does not exist.
    ``accept_saturated``: deconvolve an integer image's saturated values (at the type's
    maximum) as they are, instead of refusing the image. ``counts_per_unit``: photons per
    unit of the image's intensity (for a camera, 1 / gain after the offset is subtracted);
    unset, it is the synthetic store's ``photons``, 1 for an integer image, else estimated
    from the image's own noise (:func:`rqml_dask.held_out.estimate_counts_per_unit`).
    ``camera``: the image is camera data (:class:`CameraSpec`), read as photon counts
    (``counts_per_unit`` 1; the result is in photons too). An integer image whose darkest
    values are well above 0 is refused without it (:data:`rqml_dask.camera.OFFSET_FLOOR`).

    ``image`` may name an OME-Zarr image group (``"."``: the store's root), whose
    full-resolution level is read; ``operator_store`` is where the operator is when it is not
    in ``store`` (an OME-Zarr from a microscope holds no PSF). ``voxel_size`` (per axis, in
    ``unit``) is written into the result's OME metadata; unset, it is the OME input's own."""

    store: Path
    image: ArrayPath = "observed"
    operator: ArrayPath | None = None
    operator_store: Path | None = None
    truth: ArrayPath | None = None
    voxel_size: tuple[Annotated[float, Field(gt=0)], ...] | None = None
    unit: str = "micrometer"
    synthesize: Annotated[SynthSpec | SystemsSpec, Field(discriminator="kind")] | None = None
    accept_saturated: bool = False
    counts_per_unit: float | None = Field(default=None, gt=0)
    camera: CameraSpec | None = None

    @model_validator(mode="after")
    def _camera_or_counts(self) -> InputSpec:
        if self.camera is not None and self.counts_per_unit is not None:
            raise ValueError("give camera or counts_per_unit, not both: camera data are read as photon counts "
                             "(1 per unit)")
        return self


class OutputSpec(_Strict):
    """Where the results go; ``array`` unset is the task class's own name for them. An
    accepted image result becomes an OME-Zarr image with ``pyramid`` levels below full
    resolution (each halves y and x; ``auto``: until both are at most 256)."""

    store: Path
    array: Name | None = None
    pyramid: Literal["auto"] | Annotated[int, Field(ge=0, le=16)] = "auto"


class TilingSpec(_Strict):
    """Core size of each task, and the halo read around it (``auto``: what the task class
    needs, one PSF width for a deconvolution, none for a linear solve)."""

    tile: tuple[int, ...] = Field(min_length=1)
    halo: Literal["auto"] | int | tuple[int, ...] = "auto"

    @field_validator("tile")
    @classmethod
    def _positive(cls, tile: tuple[int, ...]) -> tuple[int, ...]:
        if any(n <= 0 for n in tile):
            raise ValueError("every tile size must be positive")
        return tile


class ModelsSpec(_Strict):
    """The escalation ladder (smallest model first) and each model's parameters."""

    ladder: list[str] = Field(min_length=1)
    params: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _params_on_ladder(self) -> ModelsSpec:
        for name in self.params:
            if name not in self.ladder:
                raise ValueError(f"params given for {name!r}, which is not on the ladder {self.ladder}")
        return self


class CheckpointSpec(_Strict):
    """Checkpointing of every task (see :class:`rqml_dask.task.CheckpointSettings`).

    ``artifacts`` defaults to ``INPUT.checkpoints`` beside the input store (the computations
    on that input: a run that only writes its output elsewhere finds and reuses them),
    ``local`` to an LMDB per host inside it; ``shared`` is ``etcd://HOST:PORT`` or
    ``consul://HOST:PORT``.
    """

    enabled: bool = True
    every_iterations: int | None = Field(default=None, gt=0)
    every_seconds: float | None = Field(default=5.0, gt=0)
    local: str | None = Field(default=None, pattern=r"^lmdb://.+")
    shared: str | None = Field(default=None, pattern=r"^(etcd|consul)://[^:/]+:\d+$")
    artifacts: Path | None = None
    retention: Literal["delete", "keep"] = "delete"


class AdaptSpec(_Strict):
    """Dask's adaptive scaling (``cluster.adapt(minimum=, maximum=)``) of a batch or
    Kubernetes cluster: between ``minimum`` and ``maximum`` nodes by the work waiting. A node
    is never retired while it holds a refining task (:mod:`rqml_dask.deploy.retiring`)."""

    minimum: int = Field(default=0, ge=0)
    maximum: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AdaptSpec":
        if self.minimum > self.maximum:
            raise ValueError(f"adapt.minimum ({self.minimum}) is more than adapt.maximum ({self.maximum})")
        return self


class JobQueueSpec(_Strict):
    """Nodes as batch jobs (dask-jobqueue's ``SLURMCluster`` / ``PBSCluster``), one node per
    job, with the scheduler in the ``rqml run`` process (the login node). Names: ``node-0``,
    ``node-1``, ...; a job that ends while the cluster still wants its node is submitted
    again under the same name, and resumes that node's checkpoints."""

    jobs: int = Field(default=2, gt=0)
    """Nodes to start (without ``adapt``)."""
    adapt: AdaptSpec | None = None
    cores: int = Field(default=1, gt=0)
    """CPU cores per job; the node runs that many threads."""
    memory: str = "4GiB"
    """Memory per job (what the job asks for and the node's memory limit)."""
    walltime: str = "01:00:00"
    queue: str | None = None
    """The partition (Slurm) or queue (PBS)."""
    account: str | None = None
    job_extra_directives: list[str] = []
    """More ``#SBATCH`` / ``#PBS`` lines, e.g. ``["--gres=gpu:1"]``."""
    job_script_prologue: list[str] = []
    """Shell lines each job runs before its node starts (``module load ...``, activating an environment)."""
    python: str | None = None
    """The Python that runs the node on the compute hosts (default: this one's)."""
    interface: str | None = None
    """The network interface the scheduler and nodes bind (``ib0``, ``eth0``; ``lo`` on one host)."""
    local_directory: str | None = None
    """Each job's local directory (node-local disk, e.g. ``$TMPDIR``): the node's LMDB and spill."""
    log_directory: str | None = None
    """Where the jobs' output files go (default: the batch system's)."""
    gpu: bool = False
    """Start ``dask cuda worker`` (one node per GPU of the job) instead of ``dask worker``."""
    protocol: Literal["tcp", "ucx"] = "tcp"
    """Dask's transport between scheduler and nodes: ``ucx`` (dask-cuda's UCX: NVLink,
    InfiniBand) needs ``distributed-ucxx`` on every host and cannot be ``--secure``
    (``pqtls://`` is TCP); either beyond one host needs ``rqml.trust.allow-insecure``."""
    credentials_directory: str | None = None
    """Where ``--secure`` issues each job's certificate (a directory the compute hosts read;
    default ``~/.config/rqml/jobs``, deleted per run)."""


class KubernetesSpec(_Strict):
    """Nodes as pods of a ``DaskCluster`` of the Dask Kubernetes operator
    (:mod:`rqml_dask.deploy.kubernetes`)."""

    image: str = "ghcr.io/rqml-dask/rqml-dask:0.1.0"
    n_workers: int = Field(default=2, gt=0)
    adapt: AdaptSpec | None = None
    namespace: str | None = None
    cpu: str = "1"
    memory: str = "4Gi"
    gpu: bool = False
    """GPU nodes: ``dask cuda worker`` on pods that ask for one ``nvidia.com/gpu`` each."""
    trust_secret: str | None = None
    """``pqtls://`` with credentials from two Secrets, ``NAME-scheduler`` and ``NAME-node``
    (each ``ca.pem``, ``cert.pem``, ``key.pem``, optionally ``crl.pem``); the node runs as
    ``NAME-node``, its certificate's name, so a secure worker group is one node
    (``n_workers: 1``, no ``adapt``)."""


ClusterKind = Literal["local", "slurm", "pbs", "kubernetes", "address"]


class ClusterSpec(_Strict):
    """Where ``rqml run`` runs the pipeline (``kind``; ``rqml run --cluster KIND`` overrides
    it, ``--scheduler ADDRESS`` is ``kind: address``):

    - ``local`` (default): the embedded cluster, set by the fields at this level;
    - ``slurm`` / ``pbs``: nodes as batch jobs, set by the ``slurm`` / ``pbs`` section;
    - ``kubernetes``: a Dask operator cluster, set by the ``kubernetes`` section;
    - ``address``: the running scheduler at ``address``.
    """

    kind: ClusterKind = "local"
    n_workers: int | None = Field(default=None, gt=0)
    threads_per_worker: int = Field(default=1, gt=0)
    memory_limit: str = "auto"
    dashboard_address: str = "127.0.0.1:8787"
    slurm: JobQueueSpec = JobQueueSpec()
    pbs: JobQueueSpec = JobQueueSpec()
    kubernetes: KubernetesSpec = KubernetesSpec()
    address: str | None = None

    @model_validator(mode="after")
    def _address_given(self) -> "ClusterSpec":
        if self.kind == "address" and not self.address:
            raise ValueError("kind 'address' needs the scheduler's address (address: tcp://HOST:PORT)")
        return self


class TaskDefaults(_Strict):
    priority: int = 0
    expected_difficulty: float = Field(default=1.0, ge=0)


class PipelineConfig(_Strict):
    """A pipeline file. ``plugins`` are model files (``.py``) or package directories,
    relative to the file, shipped to every worker of the cluster (:mod:`rqml_dask.pipeline.plugins`);
    their models are named ``module:Class`` on the ladder."""

    name: Name
    task_class: str = "deconvolution"
    plugins: list[Path] = []
    input: InputSpec
    output: OutputSpec
    tiling: TilingSpec
    models: ModelsSpec
    convergence: ConvergenceSettings = ConvergenceSettings()
    validation: ValidationSettings = ValidationSettings()
    tasks: TaskDefaults = TaskDefaults()
    checkpoint: CheckpointSpec = CheckpointSpec()
    cluster: ClusterSpec = ClusterSpec()


def check_models(config: PipelineConfig, where: str | Path) -> None:
    """Refuse (:class:`PipelineConfigError`) a task class or model the pipeline cannot run:
    unknown, for another task class, given parameters it does not take, or failing its probe
    (:func:`rqml_dask.models.check_model`). The plugin files must be importable first."""
    try:
        load_task_class(config.task_class)
    except UnknownModelError as exc:
        raise PipelineConfigError(f"{where}: task_class: {exc}") from None
    names = [("models.ladder", name) for name in config.models.ladder]
    names += [("validation.vote_models", name) for name in config.validation.vote_models]
    for key, name in names:
        params = config.models.params.get(name, {})
        try:
            model = load_model(name)
            inspect.signature(model.__init__).bind(None, None, None, **params)
        except UnknownModelError as exc:
            raise PipelineConfigError(f"{where}: {key}: {exc}") from None
        except TypeError as exc:
            raise PipelineConfigError(f"{where}: models.params: params for model {name!r}: {exc}") from None
        try:
            grid = strength_grid(model, params)
        except ValueError as exc:
            raise PipelineConfigError(f"{where}: models.params: params for model {name!r}: {exc}") from None
        if grid is not None:
            _check_search(config, key, name, model.strength, where)
        for strength in grid or (None,):
            tried = params if strength is None else {**params, model.strength: strength}
            try:
                check_model(name, config.task_class, tried, numpy_backend())
            except ModelCheckError as exc:
                raise PipelineConfigError(f"{where}: {key}: {exc}") from None


def _check_search(config: PipelineConfig, key: str, name: str, strength: str, where: str | Path) -> None:
    """Refuse a strength the data should choose (:mod:`rqml_dask.strength`) where they cannot."""
    if key != "models.ladder" or config.models.ladder.index(name) == 0:
        raise PipelineConfigError(
            f"{where}: {key}: model {name!r}: a strength chosen by the data ({strength}: auto or a list) "
            "needs a rung before it on the ladder: that rung's result is the unregularised one each strength must beat")
    if not config.convergence.held_out_fraction or not load_task_class(config.task_class).photon_counts:
        raise PipelineConfigError(
            f"{where}: models.params: model {name!r}: a strength chosen by the data needs held-out counts "
            "(photon-count data and convergence.held_out_fraction > 0)")


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file; relative paths in it are taken from the working
    directory, except ``plugins``, taken from the file's own directory."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineConfigError(f"{path}: cannot read pipeline file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise PipelineConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise PipelineConfigError(f"{path}: expected a mapping of pipeline settings, found {type(data).__name__}")
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise PipelineConfigError(format_validation_error(path, exc)) from None
    config = config.model_copy(
        update={
            "input": config.input.model_copy(update={"store": config.input.store.absolute()}),
            "output": config.output.model_copy(update={"store": config.output.store.absolute()}),
            "plugins": [(path.parent / plugin).absolute() for plugin in config.plugins],
        }
    )
    try:
        import_plugins(config.plugins)
    except PluginError as exc:
        raise PipelineConfigError(f"{path}: plugins: {exc}") from None
    check_models(config, path)
    return config


def format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} invalid setting(s):"]
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(top level)"
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {error['msg']}{shown}")
    return "\n".join(lines)
