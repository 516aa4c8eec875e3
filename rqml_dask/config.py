"""The ``rqml`` section of Dask's configuration: its defaults, and the checked settings.

The defaults ship in ``rqml.yaml`` beside this module and join Dask's configuration when it
is imported (``dask.config.update_defaults``, as distributed and dask-cuda do), so they are
overridden the Dask way: a YAML file under ``DASK_CONFIG`` or ``~/.config/dask``, an
environment variable (``DASK_RQML__SCHEDULER__QUEUED_PER_NODE=2``) or ``dask.config.set``.
:func:`node_settings` and :func:`scheduler_settings` read and check a side's section when
it starts: a value of the wrong type or range, or a key that does not exist, raises
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import Annotated

_DEFAULTS = yaml.safe_load((Path(__file__).with_name("rqml.yaml")).read_text())
dask.config.update_defaults(_DEFAULTS)

_STRICT = ConfigDict(extra="forbid", frozen=True)


def _parsed(parse: Any, what: str) -> BeforeValidator:
    """Dask's reading of a string (``"2s"``, ``"4GiB"``), its errors as validation errors."""

    def read(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return parse(value)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"cannot read {value!r} as {what}") from None

    return BeforeValidator(read)


Seconds = Annotated[float, _parsed(lambda v: parse_timedelta(v, default="seconds"), "a duration"),
                    Field(ge=0, description="seconds, or a duration such as '2s'")]
Size = Annotated[int, _parsed(parse_bytes, "a size"), Field(gt=0, description="bytes, or a size such as '4GiB'")]
Fraction = Annotated[float, Field(gt=0, le=1)]


class ConfigError(ValueError):
    """A value of the ``rqml`` configuration section is missing, misspelt or out of range."""


@dataclass(frozen=True)
class ConcurrencySettings:
    """``rqml.node.concurrency``: :class:`~rqml_dask.node.concurrency.AdaptiveConcurrency`'s knobs."""

    __pydantic_config__ = _STRICT

    gain: Annotated[float, Field(gt=0)]
    memory_high: Fraction
    hold_windows: Annotated[int, Field(ge=0)]


@dataclass(frozen=True)
class CheckpointWriterSettings:
    """``rqml.node.checkpoint``: the node's checkpoint writer."""

    __pydantic_config__ = _STRICT

    max_duty: Fraction
    max_backoff: Seconds


@dataclass(frozen=True)
class NodeSettings:
    """``rqml.node``: what a node (its plugin, its worker, its stores) reads when it starts."""

    __pydantic_config__ = _STRICT

    degraded_limit: Seconds | None
    reconnect_pause: Annotated[Seconds, Field(gt=0)]
    warm_seconds: Seconds
    concurrency: ConcurrencySettings
    checkpoint: CheckpointWriterSettings
    lmdb_map_size: Size


@dataclass(frozen=True)
class ReliabilitySettings:
    """``rqml.scheduler.reliability``: :class:`~rqml_dask.scheduler.reliability.Reliability`'s knobs."""

    __pydantic_config__ = _STRICT

    half_life: Annotated[Seconds, Field(gt=0)]
    penalty: Annotated[float, Field(ge=0)]
    backoff_base: Seconds
    backoff_cap: Seconds
    backoff_factor: Fraction


@dataclass(frozen=True)
class SchedulerSettings:
    """``rqml.scheduler``: what the scheduler plugin reads when it starts."""

    __pydantic_config__ = _STRICT

    finished_kept: Annotated[int, Field(ge=1)]
    heartbeat_interval: Annotated[Seconds, Field(gt=0)]
    queued_per_node: Annotated[int, Field(ge=0)]
    tail_speed_ratio: Annotated[float, Field(ge=0, le=1)]
    speed_bounds: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    gpu_preference: Annotated[float, Field(ge=1)]
    reconcile_grace: Seconds
    return_grace: Seconds
    capable_node_grace: Seconds
    lost_votes: Annotated[int, Field(ge=1)] | None
    reliability: ReliabilitySettings


@dataclass(frozen=True)
class SessionSettings:
    """``rqml.trust.session``: short-lived certificates on ``pqtls://`` clusters
    (:mod:`rqml_dask.trust.session`)."""

    __pydantic_config__ = _STRICT

    authority: str | None
    lifetime: Annotated[Seconds, Field(ge=10)]
    renew_when_left: Annotated[float, Field(gt=0, lt=1)]
    check_interval: Annotated[Seconds, Field(gt=0)]


@dataclass(frozen=True)
class ResultSettings:
    """``rqml.trust.results``: what the scheduler plugin checks of the signed results nodes
    present on ``pqtls://`` clusters (:mod:`rqml_dask.scheduler.result_check`)."""

    __pydantic_config__ = _STRICT

    max_skew: Annotated[Seconds, Field(gt=0)]
    remembered: Annotated[int, Field(ge=1)]


@dataclass(frozen=True)
class ExposureSettings:
    """``rqml.trust.allow-insecure`` and ``rqml.trust.expose-http``: which doors of a process
    other hosts may reach (:mod:`rqml_dask.exposure`)."""

    __pydantic_config__ = _STRICT

    allow_insecure: bool
    expose_http: bool


_Settings = TypeVar("_Settings")


def node_settings() -> NodeSettings:
    """``rqml.node`` as configured now, checked."""
    return _read("rqml.node", NodeSettings)


def scheduler_settings() -> SchedulerSettings:
    """``rqml.scheduler`` as configured now, checked; and Dask's
    ``distributed.scheduler.no-workers-timeout``, which must be unset: the plugin parks the
    tasks it has not bound yet in ``no-worker``, and that timeout would fail them."""
    timeout = dask.config.get("distributed.scheduler.no-workers-timeout", None)
    if timeout is not None:
        raise ConfigError(
            f"Dask config distributed.scheduler.no-workers-timeout: must be null with the RQML scheduler plugin, "
            f"which holds tasks in no-worker until a node has room (got {timeout!r})"
        )
    return _read("rqml.scheduler", SchedulerSettings)


def session_settings() -> SessionSettings:
    """``rqml.trust.session`` as configured now, checked; keys left out take their defaults
    (``rqml.trust`` is often set whole, as the credentials of one process)."""
    return _read("rqml.trust.session", SessionSettings, _DEFAULTS["rqml"]["trust"]["session"])


def result_settings() -> ResultSettings:
    """``rqml.trust.results`` as configured now, checked (defaults as for :func:`session_settings`)."""
    return _read("rqml.trust.results", ResultSettings, _DEFAULTS["rqml"]["trust"]["results"])


def exposure_settings() -> ExposureSettings:
    """``rqml.trust.allow-insecure`` and ``rqml.trust.expose-http`` as configured now, checked
    (a key left out takes its default, as for :func:`session_settings`)."""
    keys = ("allow-insecure", "expose-http")
    value = {key: dask.config.get(f"rqml.trust.{key}", default=_DEFAULTS["rqml"]["trust"][key]) for key in keys}
    return _validated("rqml.trust", ExposureSettings, value)


def _read(key: str, cls: type[_Settings], defaults: dict[str, Any] | None = None) -> _Settings:
    value = dask.config.get(key, default=None) if defaults is not None else dask.config.get(key)
    if defaults is not None:
        value = {**defaults, **(value or {})}
    return _validated(key, cls, value)


def _validated(key: str, cls: type[_Settings], value: Any) -> _Settings:
    """``value`` as a ``cls``; else :class:`ConfigError`, one line: the first bad key, what is
    wrong, the value, where it was set (an environment variable or a YAML file, when one of
    those set it) and what the key allows."""
    adapter = TypeAdapter(cls)
    try:
        return adapter.validate_python(_underscored(value))
    except ValidationError as exc:
        error = exc.errors()[0]
        parts = [str(part).replace("_", "-") for part in error["loc"] if not isinstance(part, int)]
        where = ".".join([key, *(str(part).replace("_", "-") for part in error["loc"])])
        schema = adapter.json_schema()
        if error["type"] == "unexpected_keyword_argument":
            allowed = f"the keys of {'.'.join([key, *parts[:-1]])}: {', '.join(_keys(schema, parts[:-1]))}"
        else:
            allowed = _allowed(_at(schema, parts), schema.get("$defs", {}))
        origin = _origin(where)
        raise ConfigError(f"Dask config {where}: {error['msg']} (got {error['input']!r}{', from ' + origin if origin else ''}; "
                          f"allowed: {allowed})") from None


def _at(schema: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """The part of a JSON schema that ``parts`` (dashed keys) lead to."""
    defs = schema.get("$defs", {})
    for part in parts:
        schema = _resolved(schema, defs).get("properties", {}).get(part.replace("-", "_"), {})
    return _resolved(schema, defs)


def _resolved(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    return defs[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema


def _keys(schema: dict[str, Any], parts: list[str]) -> list[str]:
    return [name.replace("_", "-") for name in _at(schema, parts).get("properties", {})]


_KINDS = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string", "null": "null"}
_BOUNDS = ((("exclusiveMinimum", "gt"), ">"), (("minimum", "ge"), ">="), (("exclusiveMaximum", "lt"), "<"), (("maximum", "le"), "<="))
"""pydantic's names of a field's bounds (``gt``... where a validator runs first), the stricter of each side first."""


def _allowed(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    """What a JSON schema (pydantic's, of a settings field) allows, in words: ``an integer >= 0``."""
    schema = _resolved(schema, defs)
    if "anyOf" in schema:
        return " or ".join(_allowed(option, defs) for option in schema["anyOf"])
    if "prefixItems" in schema:
        return f"a list of {len(schema['prefixItems'])}: " + ", ".join(_allowed(item, defs) for item in schema["prefixItems"])
    if schema.get("type") == "array":
        return f"a list of {_allowed(schema.get('items', {}), defs)}"
    bounds: list[str] = []
    for side in (_BOUNDS[:2], _BOUNDS[2:]):  # the stricter bound of each side
        bounds += next(([f"{sign} {schema[name]:g}"] for names, sign in side for name in names if name in schema), [])
    if "description" in schema:  # a string Dask reads (a duration, a size): the bounds are of its value
        return " ".join([schema["description"], *([f"({' and '.join(bounds)})"] if bounds else [])])
    return " ".join([_KINDS.get(schema.get("type", ""), "a value"), " and ".join(bounds)]).strip()


def _origin(dotted: str) -> str | None:
    """Where ``dotted`` (``rqml.node.lmdb-map-size``) is set, if an environment variable
    (``$DASK_RQML__NODE__LMDB_MAP_SIZE``) or a YAML file in Dask's config paths sets it."""
    variable = "DASK_" + "__".join(part.upper().replace("-", "_") for part in dotted.split("."))
    if variable in os.environ:
        return f"${variable}"
    for path in dask.config.paths:
        for file in sorted(Path(path).glob("*.y*ml")) if Path(path).is_dir() else ():
            try:
                found: Any = yaml.safe_load(file.read_text())
            except (OSError, yaml.YAMLError):
                continue
            for part in dotted.split("."):
                found = _underscored(found).get(part.replace("-", "_")) if isinstance(found, dict) else None
            if found is not None:
                return str(file)
    return None


def _underscored(value: Any) -> Any:
    """Dask's dashed keys as Python names (Dask treats ``-`` and ``_`` in keys alike)."""
    if isinstance(value, dict):
        return {str(k).replace("-", "_"): _underscored(v) for k, v in value.items()}
    return value


def admin_names() -> frozenset[str]:
    """``rqml.trust.admin-names``, checked: the client certificates (by name) that the
    scheduler lets run code and manage the cluster through Dask's own handlers
    (:mod:`rqml_dask.scheduler.doors`)."""
    value = dask.config.get("rqml.trust.admin-names", default=_DEFAULTS["rqml"]["trust"]["admin-names"])
    return frozenset(_validated("rqml.trust.admin-names", tuple[str, ...], value or ()))


def check_all() -> None:
    """Every setting of the ``rqml`` section as configured now, checked (:class:`ConfigError`
    for the first bad one): what ``rqml run`` asks before it starts an embedded cluster, whose
    scheduler and nodes would each refuse it later, with a traceback per process."""
    node_settings()
    scheduler_settings()
    session_settings()
    result_settings()
    exposure_settings()
    admin_names()
