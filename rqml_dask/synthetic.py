"""Synthetic microscopy data, so nothing has to be downloaded.

:func:`write_synthetic` writes a Zarr group with ``truth`` (beads or cell-like shapes),
``psf`` (an anisotropic Gaussian, or a scalar widefield model, normalised to sum 1) and ``observed`` (the truth blurred
by the PSF with Poisson noise at ``photons`` counts per unit intensity). The group is
written to a temporary sibling and renamed into place, so a store that exists is complete.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.signal
import zarr
from pydantic import ConfigDict


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``psf``: ``gaussian`` of ``psf_sigma`` voxels per axis (z, y, x
    for 3-D), or ``widefield`` (:func:`widefield_psf`, 3-D only)."""

    __pydantic_config__ = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["beads", "cells"] = "cells"
    shape: tuple[int, ...] = (64, 128, 128)
    psf: Literal["gaussian", "widefield"] = "gaussian"
    psf_sigma: tuple[float, ...] = (2.0, 1.2, 1.2)
    photons: float = 300.0
    background: float = 0.01
    seed: int = 0


def gaussian_psf(sigma: tuple[float, ...]) -> np.ndarray:
    """A Gaussian PSF of odd size 2*ceil(3 sigma)+1 per axis, summing to 1."""
    axes = [np.arange(-math.ceil(3 * s), math.ceil(3 * s) + 1, dtype=np.float64) for s in sigma]
    grids = np.meshgrid(*axes, indexing="ij")
    psf = np.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigma)))
    return (psf / psf.sum()).astype(np.float32)


def widefield_psf(shape: tuple[int, int, int] = (17, 25, 25), pixel_um: float = 0.1, z_step_um: float = 0.2,
                  wavelength_um: float = 0.52, na: float = 1.1, medium_index: float = 1.33,
                  spherical_waves: float = 0.5) -> np.ndarray:
    """A scalar widefield PSF: ``|FT(pupil)|^2`` per plane, the pupil a disc of radius NA /
    wavelength with defocus ``exp(2 pi i kz z)`` and primary spherical aberration
    (``spherical_waves`` times the Zernike ``6 r^4 - 6 r^2 + 1``), so out-of-focus planes
    carry rings and the axial profile is asymmetric. Sums to 1."""
    nz, ny, nx = shape
    size = 4 * max(ny, nx)
    k = np.fft.fftfreq(size, d=pixel_um)
    kx, ky = np.meshgrid(k, k, indexing="ij")
    radial2 = kx**2 + ky**2
    cutoff = na / wavelength_um
    rho2 = radial2 / cutoff**2
    pupil = np.where(rho2 <= 1, np.exp(2j * np.pi * spherical_waves * (6 * rho2**2 - 6 * rho2 + 1)), 0)
    kz = np.sqrt(np.maximum((medium_index / wavelength_um) ** 2 - radial2, 0))
    c = size // 2
    planes = []
    for z in (np.arange(nz) - nz // 2) * z_step_um:
        field = np.fft.fftshift(np.fft.ifft2(pupil * np.exp(2j * np.pi * kz * z)))
        planes.append(np.abs(field[c - ny // 2 : c + ny // 2 + 1, c - nx // 2 : c + nx // 2 + 1]) ** 2)
    psf = np.stack(planes)
    return (psf / psf.sum()).astype(np.float32)


def make_truth(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Ground truth in [0, 1]: sparse beads, or cells (bright shell, dimmer body, nucleus)."""
    truth = np.zeros(shape, np.float32)
    volume = math.prod(shape)
    if kind == "beads":
        count = max(volume // 800, 1)
        index = tuple(rng.integers(0, n, count) for n in shape)
        np.add.at(truth, index, rng.uniform(0.3, 1.0, count).astype(np.float32))
        return np.clip(truth, 0, 1)
    grids = None
    for _ in range(max(volume // 12000, 1)):
        radius = rng.uniform(4, 10, len(shape)) * np.array([s / max(shape) for s in shape]) ** 0.3
        centre = np.array([rng.uniform(0, n) for n in shape])
        lo = np.maximum((centre - radius - 1).astype(int), 0)
        hi = np.minimum((centre + radius + 2).astype(int), shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        r = np.sqrt(sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, centre, radius)))
        cell = np.where(r < 1.0, 0.25, 0.0) + np.where((r > 0.8) & (r < 1.0), 0.6, 0.0)
        cell += np.where(r < 0.35, 0.4, 0.0)
        truth[box] = np.maximum(truth[box], cell.astype(np.float32) * rng.uniform(0.6, 1.0))
    return truth


def write_synthetic(store: str | Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write truth, psf and observed to the Zarr group at ``store``; return its path."""
    if spec.psf == "gaussian" and len(spec.psf_sigma) != len(spec.shape):
        raise ValueError(f"psf_sigma {spec.psf_sigma} and shape {spec.shape} differ in rank")
    store = Path(store)
    if spec.psf == "widefield" and len(spec.shape) != 3:
        raise ValueError(f"the widefield PSF is 3-D; shape {spec.shape} is not")
    rng = np.random.default_rng(spec.seed)
    truth = make_truth(spec.kind, spec.shape, rng)
    psf = gaussian_psf(spec.psf_sigma) if spec.psf == "gaussian" else widefield_psf()
    blurred = np.clip(scipy.signal.fftconvolve(truth + spec.background, psf, mode="same"), 0, None)
    observed = (rng.poisson(blurred * spec.photons) / spec.photons).astype(np.float32)
    staging = store.with_name(store.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    group = zarr.open_group(staging, mode="w")
    chunks = tuple(min(n, 64) for n in spec.shape)
    for name, data in (("truth", truth + spec.background), ("observed", observed)):
        group.create_array(name, data=data.astype(np.float32), chunks=chunks)
    group.create_array("psf", data=psf)
    group.attrs["rqml_synthetic"] = {**asdict(spec), "shape": list(spec.shape), "psf_sigma": list(spec.psf_sigma)}
    shutil.rmtree(store, ignore_errors=True)
    staging.rename(store)
    return store
