"""Synthetic data for both task classes, so nothing has to be downloaded.

:func:`write_systems` writes a batch of anisotropic diffusion systems for ``linear_solve``:
``rhs`` (count, *grid), ``coefficients`` (count, rank, *grid: the diffusivity along each
axis in each cell) and ``truth``, each system solved to a relative residual of 1e-13 on the matrix
:func:`diffusion_matrix` assembles.

:func:`write_synthetic` writes a Zarr group with ``truth`` (beads or cell-like shapes),
``psf`` (an anisotropic Gaussian, or a scalar widefield model, normalised to sum 1) and ``observed`` (the truth blurred
by the PSF with Poisson noise at ``photons`` counts per unit intensity). With a camera
(``camera_offset`` and/or ``camera_gain``), ``observed`` is what a camera reads of the same
counts instead: uint16 ADU, ``round(gain * counts + offset + read noise)``, and ``truth`` is
in photons (times ``photons``), the units a pipeline's result of camera data is in. The group is
written to a temporary sibling and renamed into place, so a store that exists is complete.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import zarr
from pydantic import ConfigDict, Field


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``psf``: ``gaussian`` of ``psf_sigma`` voxels per axis (z, y, x
    for 3-D), or ``widefield`` (:func:`widefield_psf`, 3-D only). ``camera_offset`` (ADU,
    default 0 with a gain) and ``camera_gain`` (ADU per photon, default 1 with an offset):
    camera data, with Gaussian read noise of ``read_noise`` ADU (standard deviation)."""

    __pydantic_config__ = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["beads", "cells"] = "cells"
    shape: tuple[int, ...] = (64, 128, 128)
    psf: Literal["gaussian", "widefield"] = "gaussian"
    psf_sigma: tuple[float, ...] = (2.0, 1.2, 1.2)
    photons: float = 300.0
    background: float = 0.01
    seed: int = 0
    camera_offset: Annotated[float, Field(ge=0)] | None = None
    camera_gain: Annotated[float, Field(gt=0)] | None = None
    read_noise: Annotated[float, Field(ge=0)] = 2.0

    @property
    def camera(self) -> bool:
        """Whether ``observed`` is camera data (ADU), not photons per unit intensity."""
        return self.camera_offset is not None or self.camera_gain is not None


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


def camera_counts(counts: np.ndarray, spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """Photon ``counts`` as ``spec``'s camera reads them: uint16 ADU, ``round(gain * counts +
    offset + N(0, read_noise^2))``, clipped to what uint16 holds."""
    gain = 1.0 if spec.camera_gain is None else spec.camera_gain
    offset = 0.0 if spec.camera_offset is None else spec.camera_offset
    adu = gain * counts + offset + rng.normal(0.0, spec.read_noise, counts.shape)
    return np.clip(np.rint(adu), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def write_synthetic(store: str | Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write truth, psf and observed to the Zarr group at ``store``; return its path."""
    if (spec.camera_offset or 0) < 0 or (spec.camera_gain is not None and spec.camera_gain <= 0) or spec.read_noise < 0:
        raise ValueError(f"camera offset {spec.camera_offset} must be >= 0, gain {spec.camera_gain} > 0 and read noise "
                         f"{spec.read_noise} >= 0")
    if spec.psf == "gaussian" and len(spec.psf_sigma) != len(spec.shape):
        raise ValueError(f"psf_sigma {spec.psf_sigma} and shape {spec.shape} differ in rank")
    store = Path(store)
    if spec.psf == "widefield" and len(spec.shape) != 3:
        raise ValueError(f"the widefield PSF is 3-D; shape {spec.shape} is not")
    rng = np.random.default_rng(spec.seed)
    truth = make_truth(spec.kind, spec.shape, rng)
    psf = gaussian_psf(spec.psf_sigma) if spec.psf == "gaussian" else widefield_psf()
    import scipy.signal  # here, not at import: reading a pipeline file loads no SciPy

    blurred = np.clip(scipy.signal.fftconvolve(truth + spec.background, psf, mode="same"), 0, None)
    counts = rng.poisson(blurred * spec.photons)
    truth = truth + spec.background
    if spec.camera:
        observed, truth = camera_counts(counts, spec, rng), truth * spec.photons
    else:
        observed = (counts / spec.photons).astype(np.float32)
    staging = store.with_name(store.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    group = zarr.open_group(staging, mode="w")
    chunks = tuple(min(n, 64) for n in spec.shape)
    group.create_array("truth", data=truth.astype(np.float32), chunks=chunks)
    group.create_array("observed", data=observed, chunks=chunks)
    group.create_array("psf", data=psf)
    group.attrs["rqml_synthetic"] = {**asdict(spec), "shape": list(spec.shape), "psf_sigma": list(spec.psf_sigma)}
    shutil.rmtree(store, ignore_errors=True)
    staging.rename(store)
    return store


@dataclass(frozen=True)
class SystemsSpec:
    """A batch of ``count`` systems ``-div(K grad u) = f`` on a ``grid`` (2-D or 3-D) with
    zero Dirichlet boundaries. Each system's diffusivity is a smooth random field spanning
    ``contrast`` (max/min), times ``anisotropy`` along the last axis; ``f`` is a smooth
    random source. A larger grid, contrast or anisotropy is a worse-conditioned system."""

    __pydantic_config__ = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["systems"]
    grid: tuple[int, ...] = (64, 64)
    count: int = 8
    contrast: float = 100.0
    anisotropy: float = 1.0
    seed: int = 0


def face_coefficients(coefficients: np.ndarray) -> list[np.ndarray]:
    """Per axis, the diffusivity on each cell face (``n + 1`` along that axis): the harmonic
    mean of the two cells it separates, the cell's own on the boundary."""
    faces = []
    for axis in range(coefficients.shape[0]):
        k = np.moveaxis(coefficients[axis], axis, 0)
        inner = 2 * k[1:] * k[:-1] / (k[1:] + k[:-1])
        faces.append(np.moveaxis(np.concatenate([k[:1], inner, k[-1:]]), 0, axis))
    return faces


def diffusion_matrix(coefficients: np.ndarray) -> scipy.sparse.csr_matrix:
    """The symmetric positive-definite matrix of ``-div(K grad u)`` (cell-centred finite
    volumes, unit spacing, zero outside the grid) for ``coefficients`` (rank, *grid):
    ``sum_a D_a^T diag(k_a) D_a`` with ``D_a`` the differences across the faces of axis ``a``,
    assembled from its diagonals: a cell's face diffusivities summed on the main one, minus
    the face between two neighbours along axis ``a`` at offsets +-(the cells of one step along ``a``)."""
    import scipy.sparse

    grid = coefficients.shape[1:]
    size = math.prod(grid)
    diagonal = np.zeros(grid)
    bands, offsets = [], []
    for axis, k in enumerate(face_coefficients(coefficients)):
        n = grid[axis]
        diagonal += np.take(k, range(n), axis) + np.take(k, range(1, n + 1), axis)
        coupling = np.zeros(grid)  # cell i to cell i + 1 along the axis; none from the last cell
        coupling[(slice(None),) * axis + (slice(0, n - 1),)] = -np.take(k, range(1, n), axis)
        stride = math.prod(grid[axis + 1:])
        bands += [coupling.ravel()[: size - stride]] * 2
        offsets += [stride, -stride]
    return scipy.sparse.diags([diagonal.ravel(), *bands], [0, *offsets], shape=(size, size), format="csr")


REFERENCE_RTOL = 1e-13
"""The relative residual (as conjugate gradients measures it) of the synthetic systems' reference
solutions: far below any tolerance a float64 solver is asked for (``linear_solve``'s 1e-10)."""


def reference_solution(coefficients: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """The solution of one system (``coefficients`` (rank, *grid), ``rhs`` (*grid)) by conjugate
    gradients in float64 to :data:`REFERENCE_RTOL`, preconditioned by the constant-coefficient
    operator scaled by the matrix's diagonal (:func:`_scaled_laplacian_inverse`): a few dozen
    iterations where a sparse direct factor of a 3-D grid fills in (32x64x64: 115 M entries,
    91 s, 2.5 GiB). ``ValueError`` if it does not converge."""
    import scipy.sparse.linalg

    matrix = diffusion_matrix(coefficients)
    b = rhs.ravel()
    preconditioner = scipy.sparse.linalg.LinearOperator(matrix.shape, _scaled_laplacian_inverse(matrix, coefficients))
    x, info = scipy.sparse.linalg.cg(matrix, b, rtol=REFERENCE_RTOL, atol=0.0, M=preconditioner, maxiter=10 * b.size)
    if info != 0:
        raise ValueError(f"the reference solution did not reach a relative residual of {REFERENCE_RTOL:g} "
                         f"in {10 * b.size} conjugate-gradient iterations")
    return x.reshape(rhs.shape)


def _scaled_laplacian_inverse(matrix: scipy.sparse.csr_matrix, coefficients: np.ndarray):
    """``r -> S^-1 L^-1 S^-1 r``: ``L`` the matrix of constant diffusivities (each axis its own
    mean scale, so anisotropy is kept), inverted exactly by a type-I discrete sine transform
    (zero Dirichlet boundaries one cell out: its eigenvectors), and ``S = sqrt(diag(A) / diag(L))``,
    so ``S L S`` matches ``A`` on the diagonal and follows a smooth diffusivity."""
    import scipy.fft

    grid = coefficients.shape[1:]
    scale = [float(np.exp(np.mean(np.log(k)))) for k in coefficients]
    eigenvalues = sum(
        (c * (2 - 2 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)))).reshape([n if a == axis else 1 for a in range(len(grid))])
        for axis, (c, n) in enumerate(zip(scale, grid)))
    inverse_root = 1 / np.sqrt(matrix.diagonal().reshape(grid) / (2 * sum(scale)))

    def apply(r: np.ndarray) -> np.ndarray:
        y = scipy.fft.dstn(inverse_root * r.reshape(grid), type=1, norm="ortho")
        return (inverse_root * scipy.fft.idstn(y / eigenvalues, type=1, norm="ortho")).ravel()

    return apply


def write_systems(store: str | Path, spec: SystemsSpec) -> Path:
    """Write rhs, coefficients and truth (:func:`reference_solution`) to the Zarr group at ``store``."""
    if len(spec.grid) not in (2, 3) or min(spec.grid) < 2 or spec.count < 1:
        raise ValueError(f"grid {spec.grid} must be 2-D or 3-D (at least 2 per axis) and count {spec.count} positive")
    import scipy.ndimage

    store = Path(store)
    rng = np.random.default_rng(spec.seed)
    rank = len(spec.grid)
    rhs = np.empty((spec.count, *spec.grid))
    coefficients = np.empty((spec.count, rank, *spec.grid))
    truth = np.empty_like(rhs)
    smooth = max(min(spec.grid) / 8, 1.0)
    for i in range(spec.count):
        field = scipy.ndimage.gaussian_filter(rng.standard_normal(spec.grid), smooth)
        field = (field - field.min()) / max(np.ptp(field), 1e-12)
        k = spec.contrast ** field
        coefficients[i] = k
        coefficients[i, -1] *= spec.anisotropy
        rhs[i] = scipy.ndimage.gaussian_filter(rng.standard_normal(spec.grid), smooth / 2) * 100
        truth[i] = reference_solution(coefficients[i], rhs[i])
    staging = store.with_name(store.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    group = zarr.open_group(staging, mode="w")
    for name, data in (("rhs", rhs), ("truth", truth)):
        group.create_array(name, data=data, chunks=(1, *spec.grid))
    group.create_array("coefficients", data=coefficients, chunks=(1, rank, *spec.grid))
    group.attrs["rqml_synthetic"] = {**asdict(spec), "grid": list(spec.grid)}
    shutil.rmtree(store, ignore_errors=True)
    staging.rename(store)
    return store
