"""Names that become paths, checked before anything is created, written or deleted under them.

* A *name* (a pipeline's ``name``, its ``output.array``) is one path segment: letters,
  digits, ``_``, ``.`` and ``-``, and not ``.`` or ``..``.
* An *array path* (``input.image``, ``operator``, ``truth``: an array or group inside a Zarr
  store) is names joined by ``/``; ``.`` alone is the store's root.
* A *task id* (``PIPELINE/0007``, ``PIPELINE/0007/vote-MODEL``) is segments joined by ``/``,
  each a name that may also hold ``:`` and ``@`` (a ``module:Class`` model name).
* :func:`inside` resolves a path (``..`` and symbolic links followed) and refuses one that is
  not under its root.

Each check raises :class:`UnsafeName` (a :class:`ValueError`) saying what is wrong; the
``Annotated`` types below are the same checks for pydantic models and dataclasses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TASK_SEGMENT = re.compile(r"[A-Za-z0-9_.:@-]+")


class UnsafeName(ValueError):
    """A name that would make a path outside its place, or an unexpected one."""


def _segments(value: str, pattern: re.Pattern[str], allowed: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise UnsafeName(f"{what} must be a non-empty string (got {value!r})")
    for segment in value.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeName(f"{what} {value!r} has {'an empty part' if not segment else repr(segment)}: "
                             f"it would name a path outside its place")
        if not pattern.fullmatch(segment):
            raise UnsafeName(f"{what} {value!r}: {segment!r} holds a character other than {allowed}")
    return value


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it is a name (one segment, see the module docstring); else :class:`UnsafeName`."""
    if isinstance(value, str) and "/" in value:
        raise UnsafeName(f"{what} {value!r} holds '/': it must be one name, not a path")
    return _segments(value, _NAME, "letters, digits, '_', '.' and '-'", what)


def check_array_path(value: str, what: str = "array") -> str:
    """``value`` if it is an array path (names joined by ``/``, or ``.``); else :class:`UnsafeName`."""
    return value if value == "." else _segments(value, _NAME, "letters, digits, '_', '.', '-' and '/'", what)


def check_task_id(value: str) -> str:
    """``value`` if it is a task id (see the module docstring); else :class:`UnsafeName`."""
    return _segments(value, _TASK_SEGMENT, "letters, digits, '_', '.', '-', ':', '@' and '/'", "task id")


def inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved, if it lies under ``root`` (resolved too); else :class:`UnsafeName`
    naming ``what`` the path is for."""
    base, resolved = Path(root).resolve(), Path(path).resolve()
    if not resolved.is_relative_to(base):
        raise UnsafeName(f"{what}: {path} resolves to {resolved}, outside its root {base}")
    return resolved


def _pydantic(check: Callable[[str], str]) -> AfterValidator:
    """``check`` as a pydantic validator; its message is the validation error's."""

    def validate(value: str) -> str:
        try:
            return check(value)
        except UnsafeName as exc:
            raise PydanticCustomError("unsafe_name", str(exc)) from None

    return AfterValidator(validate)


Name = Annotated[str, _pydantic(check_name)]
ArrayPath = Annotated[str, _pydantic(check_array_path)]
TaskId = Annotated[str, _pydantic(check_task_id)]
