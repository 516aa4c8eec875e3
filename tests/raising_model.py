"""A test model that raises in its third iteration (a bug in a user's model)."""

from __future__ import annotations

from sleepy_model import SleepyModel


class RaisingModel(SleepyModel):
    family = "raising"

    def step(self) -> None:
        if self.steps == 2:
            raise RuntimeError("a bug in the model")
        super().step()
