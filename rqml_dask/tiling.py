"""Cutting a volume into task regions with halos (what halo a task needs is its class's say).

Each task owns a ``tile``-shaped core (the last ones along an axis may be smaller) and reads
a window that extends the core by ``halo`` on every side, clipped to the volume: a task at
the volume's border sees the same border as an untiled run, and nothing is invented past
it. Tasks write only their cores, so the stitched volume has no overlaps to blend; seams
are avoided by models that assume nothing past their window (the deconvolution models
estimate the object beyond it from the observed data alone) and a halo wide enough that the
window's edge does not reach the core within the iterations a task runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from rqml_dask.task import Region


def plan_regions(shape: Sequence[int], tile: Sequence[int], halo: Sequence[int]) -> list[Region]:
    """Regions covering ``shape`` exactly once with their cores, in C order of tile index."""
    if not (len(shape) == len(tile) == len(halo)):
        raise ValueError(f"volume shape {tuple(shape)}, tile {tuple(tile)} and halo {tuple(halo)} differ in rank")
    if any(t <= 0 for t in tile) or any(h < 0 for h in halo):
        raise ValueError(f"tile {tuple(tile)} must be positive and halo {tuple(halo)} non-negative")
    per_axis = [
        [((start, min(start + t, n)), (max(start - h, 0), min(start + t + h, n))) for start in range(0, n, t)]
        for n, t, h in zip(shape, tile, halo)
    ]
    return [
        Region(core=tuple(axis[0] for axis in combo), window=tuple(axis[1] for axis in combo))
        for combo in itertools.product(*per_axis)
    ]
