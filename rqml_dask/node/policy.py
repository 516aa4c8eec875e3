"""The supervision policy a node enforces, and the decisions it carries out.

The scheduler decides; the node acts. A node keeps the policy it last received both in
memory and in its local directory (``policy.json``), so a restarted worker, or one cut off
from its scheduler, goes on applying it alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import Annotated

_STRICT = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class NodePolicy:
    """How a node orders, runs and judges its RQML tasks.

    * ``class_order``: task classes in the order the inbound queue serves them (classes not
      listed come after, by name);
    * ``min_concurrency``/``max_concurrency``: bounds of the refinement queue's adaptive size;
    * ``on_validation_failure``: ``escalate`` refines a rejected result further with the next
      model of its ladder (and validates again), ``reject`` returns it as it is;
    * ``max_task_seconds``: a task refining longer is terminated with that reason;
    * ``diversity``: per task class, models of other families to try, in order, when a task
      has stalled on every model of its ladder; a task that stalls on those too ends
      ``stalled`` with the reason;
    * ``gpu_classes``: task classes the scheduler places on GPU nodes only;
    * ``max_inbound``: a node holding more unstarted tasks pushes the last ones in its order
      back to the scheduler, to be placed elsewhere.
    """

    __pydantic_config__ = _STRICT

    version: int = 0
    class_order: tuple[str, ...] = ("deconvolution",)
    min_concurrency: Annotated[int, Field(ge=1)] = 1
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    on_validation_failure: Literal["escalate", "reject"] = "escalate"
    max_task_seconds: Annotated[float, Field(gt=0)] | None = None
    diversity: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"deconvolution": ("landweber",)})
    gpu_classes: tuple[str, ...] = ()
    max_inbound: Annotated[int, Field(ge=1)] = 4

    def class_rank(self, task_class: str) -> int:
        try:
            return self.class_order.index(task_class)
        except ValueError:
            return len(self.class_order)

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old policy or the new one, never half of one."""
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(POLICY.dump_json(self))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Self | None:
        """The policy saved at ``path``; ``None`` if there is none or it is unreadable."""
        try:
            return POLICY.validate_json(path.read_bytes())
        except (OSError, ValidationError, json.JSONDecodeError):
            return None


POLICY = TypeAdapter(NodePolicy)


@dataclass(frozen=True)
class Decision:
    """A supervision decision for one task: ``escalate`` to the next model now,
    ``terminate`` it (it ends with status ``terminated`` and ``reason``), ``revalidate`` it
    (apply its validation rules to the current estimate now; a failure escalates under the
    policy's ``escalate`` rule), or ``reroute`` it: checkpoint it and hand it back to the
    scheduler, which binds it to another node where it resumes from that checkpoint."""

    __pydantic_config__ = _STRICT

    task_id: str
    action: Literal["escalate", "terminate", "revalidate", "reroute"]
    reason: str = ""


DECISION = TypeAdapter(Decision)
