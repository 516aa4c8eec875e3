"""The heartbeat figures the scheduler plugin steers by, checked before they steer anything.

A node advertises its figures on Dask's heartbeat (the ``rqml`` custom metric,
:meth:`rqml_dask.node.NodePlugin.heartbeat`). The plugin reads only the ones below; each
must have its type and a plausible range. A node whose figures fail the check is flagged
(an ``invalid-figures`` alert naming the field) and gets no new work while another node can
take it; its figures are not used.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError
from typing_extensions import Annotated

Count = Annotated[StrictInt, Field(ge=0, le=10**9)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


Figure = Annotated[float, Field(strict=False)] | None


class TaskProgress(BaseModel):
    """A refining task's latest iteration and convergence checks (shown, never steered by)."""

    model_config = ConfigDict(frozen=True)

    iteration: Count
    trace: Annotated[list[tuple[Count, Annotated[str, Field(strict=True, max_length=200)], Figure, Figure, Figure, Figure]],
                     Field(max_length=1024)] = []
    checkpoints: Annotated[list[Count], Field(max_length=1024)] = []


class NodeFigures(BaseModel):
    """What the plugin reads from a node's heartbeat; every other figure passes through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    concurrency_limit: Annotated[StrictInt, Field(ge=1, le=10_000)] = 1
    iterations_per_second: Rate = 0.0
    busy_fraction: Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    inbound: Count = 0
    refining: Count = 0
    outbound: Count = 0
    gpu_count: Annotated[StrictInt, Field(ge=0, le=1024)] = 0
    warm_models: list[Annotated[str, Field(strict=True)]] = []
    host_memory_fraction: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 0.0
    device_memory_fraction: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    progress: Annotated[dict[Annotated[str, Field(max_length=500)], TaskProgress], Field(max_length=100_000)] = {}


def check_figures(raw: Any) -> dict[str, Any]:
    """``raw`` as a dict of figures if it passes :class:`NodeFigures`; raise
    :class:`InvalidFigures` naming the first bad field otherwise."""
    try:
        return NodeFigures.model_validate(raw).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "figures"
        raise InvalidFigures(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


class InvalidFigures(ValueError):
    """A heartbeat figure of the wrong type or out of range."""
