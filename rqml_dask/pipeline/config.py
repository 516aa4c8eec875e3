"""The pipeline YAML schema, and loading a file with errors that name the file and the key.

A pipeline file is validated completely before anything runs: unknown keys, wrong types,
out-of-range values, unknown model names and model parameters a model does not take are
refused with ``FILE: key.path: what was expected``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rqml_dask.models import UnknownModelError, load_model
from rqml_dask.synthetic import SynthSpec
from rqml_dask.task import ConvergenceSettings, ValidationSettings


class PipelineConfigError(ValueError):
    """A pipeline file that cannot be used; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """Where the data is. ``synthesize`` generates the store first if it does not exist.
    ``accept_saturated``: deconvolve an integer image's saturated values (at the type's
    maximum) as they are, instead of refusing the image. ``counts_per_unit``: photons per
    unit of the image's intensity (for a camera, 1 / gain after the offset is subtracted);
    unset, it is the synthetic store's ``photons``, 1 for an integer image, else estimated
    from the image's own noise (:func:`rqml_dask.held_out.estimate_counts_per_unit`)."""

    store: Path
    image: str = "observed"
    psf: str = "psf"
    truth: str | None = None
    synthesize: SynthSpec | None = None
    accept_saturated: bool = False
    counts_per_unit: float | None = Field(default=None, gt=0)


class OutputSpec(_Strict):
    store: Path
    array: str = "deconvolved"


class TilingSpec(_Strict):
    """Core size of each task, and the halo read around it (``auto``: one PSF width)."""

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
    def _known_models(self) -> ModelsSpec:
        for name in self.ladder:
            try:
                model = load_model(name)
            except UnknownModelError as exc:
                raise ValueError(str(exc)) from None
            try:
                inspect.signature(model.__init__).bind(None, None, None, **self.params.get(name, {}))
            except TypeError as exc:
                raise ValueError(f"params for model {name!r}: {exc}") from None
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


class ClusterSpec(_Strict):
    """The embedded cluster ``rqml run`` starts when no ``--scheduler`` is given."""

    n_workers: int | None = Field(default=None, gt=0)
    threads_per_worker: int = Field(default=1, gt=0)
    memory_limit: str = "auto"
    dashboard_address: str = "127.0.0.1:8787"


class TaskDefaults(_Strict):
    priority: int = 0
    expected_difficulty: float = Field(default=1.0, ge=0)


class PipelineConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task_class: Literal["deconvolution"] = "deconvolution"
    input: InputSpec
    output: OutputSpec
    tiling: TilingSpec
    models: ModelsSpec
    convergence: ConvergenceSettings = ConvergenceSettings()
    validation: ValidationSettings = ValidationSettings()
    tasks: TaskDefaults = TaskDefaults()
    checkpoint: CheckpointSpec = CheckpointSpec()
    cluster: ClusterSpec = ClusterSpec()


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file; relative paths in it are taken from the working directory."""
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
    return config.model_copy(
        update={
            "input": config.input.model_copy(update={"store": config.input.store.absolute()}),
            "output": config.output.model_copy(update={"store": config.output.store.absolute()}),
        }
    )


def format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} invalid setting(s):"]
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(top level)"
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {error['msg']}{shown}")
    return "\n".join(lines)
