"""TaskCheckpoint: the resumable state of one RQML task at one iteration.

The record is the seed's ``TaskCheckpoint {task_id, iteration, model_config,
intermediate_artifacts[], supervision_state, hash}``. Artifacts (the estimate and whatever
the model needs to resume exactly) are arrays stored elsewhere (Zarr); the record holds a
reference to each plus the SHA-256 of its content. ``hash`` is the SHA-256 of everything
else in canonical msgpack, so a reader detects a torn, stale or tampered record with
:meth:`TaskCheckpoint.verify`, and a tampered artifact by comparing its digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Self

import msgpack
import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError

_STRICT = ConfigDict(extra="forbid", frozen=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: undecodable, wrong hash, or damaged artifact."""


@dataclass(frozen=True)
class ModelConfig:
    """Which model the task was running, where it stood on its ladder, and its parameters."""

    __pydantic_config__ = _STRICT

    model: str
    ladder_position: int
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactRef:
    """One intermediate artifact: where it is, its shape/dtype, and the SHA-256 of its bytes."""

    __pydantic_config__ = _STRICT

    name: str
    location: str
    shape: tuple[int, ...]
    dtype: str
    digest: str

    @staticmethod
    def digest_of(array: np.ndarray) -> str:
        """SHA-256 of an array's C-order bytes (the digest every ``ArtifactRef`` records), read
        plane by plane where the array is not contiguous (no copy of the whole)."""
        digest = hashlib.sha256()
        for part in (array,) if array.ndim < 2 or array.flags.c_contiguous else array:
            digest.update(np.ascontiguousarray(part).data)
        return digest.hexdigest()

    def check(self, array: np.ndarray) -> None:
        """Raise :class:`CheckpointError` unless ``array`` is exactly the recorded artifact."""
        if tuple(array.shape) != self.shape or str(array.dtype) != self.dtype:
            raise CheckpointError(
                f"artifact {self.name!r} at {self.location}: expected {self.dtype}{list(self.shape)}, "
                f"found {array.dtype}{list(array.shape)}"
            )
        if self.digest_of(array) != self.digest:
            raise CheckpointError(f"artifact {self.name!r} at {self.location}: content digest mismatch")


@dataclass(frozen=True)
class TaskCheckpoint:
    """A task's state at ``iteration``; build with :meth:`create` so ``hash`` is right."""

    __pydantic_config__ = _STRICT

    task_id: str
    iteration: int
    model_config: ModelConfig
    intermediate_artifacts: tuple[ArtifactRef, ...]
    supervision_state: dict[str, Any]
    hash: str
    signature: dict[str, Any] | None = None
    """Who wrote it, over ``pqtls://`` (:mod:`rqml_dask.trust.signing`); not in ``hash``."""

    @classmethod
    def create(
        cls,
        task_id: str,
        iteration: int,
        model_config: ModelConfig,
        intermediate_artifacts: tuple[ArtifactRef, ...],
        supervision_state: dict[str, Any],
    ) -> Self:
        unsigned = cls(task_id, iteration, model_config, tuple(intermediate_artifacts), supervision_state, "")
        return replace(unsigned, hash=unsigned.compute_hash())

    def compute_hash(self) -> str:
        body = _CHECKPOINT.dump_python(replace(self, hash="", signature=None), mode="json")
        del body["hash"], body["signature"]
        return hashlib.sha256(msgpack.packb(_canonical(body))).hexdigest()

    def verify(self) -> Self:
        """Return self if ``hash`` matches the record, else raise :class:`CheckpointError`."""
        if self.hash != self.compute_hash():
            raise CheckpointError(f"checkpoint of task {self.task_id!r} at iteration {self.iteration}: hash mismatch")
        return self

    def artifact(self, name: str) -> ArtifactRef:
        for ref in self.intermediate_artifacts:
            if ref.name == name:
                return ref
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return _CHECKPOINT.dump_python(self, mode="json")

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_dict())

    def to_json(self) -> str:
        return _CHECKPOINT.dump_json(self).decode()

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Decode and verify; raise :class:`CheckpointError` saying what is wrong."""
        try:
            checkpoint = _CHECKPOINT.validate_python(data)
        except ValidationError as exc:
            raise CheckpointError(f"malformed checkpoint record: {exc}") from None
        return checkpoint.verify()

    @classmethod
    def from_msgpack(cls, payload: bytes) -> Self:
        try:
            data = msgpack.unpackb(payload, strict_map_key=False)
        except Exception as exc:
            raise CheckpointError(f"undecodable checkpoint record ({len(payload)} bytes): {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        try:
            return _CHECKPOINT.validate_json(text).verify()
        except ValidationError as exc:
            raise CheckpointError(f"malformed checkpoint record: {exc}") from None


def _canonical(value: Any) -> Any:
    """Sort mapping keys recursively so equal records pack to equal bytes."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


_CHECKPOINT = TypeAdapter(TaskCheckpoint)
