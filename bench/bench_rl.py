"""Per-iteration time of our RichardsonLucy against scikit-image's, on one synthetic volume.

The volume is random beads on a dim background, blurred by a Gaussian PSF, with Poisson
noise, in float32. Both run the same number of iterations; scikit-image is
single-threaded, so our model runs once with one FFT worker and once with
``os.cpu_count()``. Ours is boundary-normalised RL on an object domain one PSF larger than
the image (it invents no zeros past the border, where scikit-image does), so the two differ
near the border by design; their difference is printed for the interior, away from it.

Usage: python bench/bench_rl.py [--size 128] [--psf 15] [--iterations 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.signal
from skimage.restoration import richardson_lucy

from rqml_dask.arrays import ArrayBackend, numpy_backend
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy

def synthetic_volume(size: int, psf_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image, psf), float32: Poisson-noisy Gaussian-blurred beads, and the unit-sum PSF."""
    rng = np.random.default_rng(seed)
    grid = np.indices((psf_size,) * 3, dtype=np.float64) - (psf_size - 1) / 2
    psf = np.exp(-np.sum(grid**2, axis=0) / (2 * (psf_size / 6) ** 2))
    psf /= psf.sum()
    truth = np.full((size,) * 3, 5.0)
    beads = tuple(rng.integers(0, size, size**3 // 2000) for _ in range(3))
    truth[beads] += rng.uniform(200.0, 2000.0, beads[0].size)
    blurred = np.maximum(scipy.signal.fftconvolve(truth, psf, mode="same"), 0.0)
    return rng.poisson(blurred).astype(np.float32), psf.astype(np.float32)


def time_ours(
    image: np.ndarray, psf: np.ndarray, backend: ArrayBackend, iterations: int, repeats: int
) -> tuple[float, float, np.ndarray]:
    """(best setup seconds, best seconds per iteration, estimate) of our model."""
    setups, per_iteration = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model = RichardsonLucy({"image": image, "psf": psf}, backend)
        ready = time.perf_counter()
        for _ in range(iterations):
            model.step()
        setups.append(ready - start)
        per_iteration.append((time.perf_counter() - ready) / iterations)
    return min(setups), min(per_iteration), model.estimate


def time_skimage(
    image: np.ndarray, psf: np.ndarray, iterations: int, repeats: int
) -> tuple[float, np.ndarray]:
    """(best seconds per iteration, estimate) of ``skimage.restoration.richardson_lucy``."""
    # An even-sized PSF is zero-padded in front: scikit-image then back-projects with the
    # exact adjoint, as our model does (the forward model is unchanged).
    odd_psf = np.pad(psf, [(1 - n % 2, 0) for n in psf.shape])
    per_iteration = []
    for _ in range(repeats):
        start = time.perf_counter()
        estimate = richardson_lucy(image, odd_psf, num_iter=iterations, clip=False)
        per_iteration.append((time.perf_counter() - start) / iterations)
    return min(per_iteration), estimate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="edge of the cubic volume")
    parser.add_argument("--psf", type=int, default=15, help="edge of the cubic PSF")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; best kept")
    args = parser.parse_args(argv)

    image, psf = synthetic_volume(args.size, args.psf)
    cpus = os.cpu_count() or 1
    print(
        f"volume {args.size}^3 float32, PSF {args.psf}^3, {args.iterations} iterations, "
        f"best of {args.repeats}, os.cpu_count() = {cpus}"
    )
    skimage_s, expected = time_skimage(image, psf, args.iterations, args.repeats)
    rows = [("skimage.restoration.richardson_lucy", None, skimage_s)]
    results = []
    for workers in sorted({1, cpus}):
        setup_s, ours_s, estimate = time_ours(
            image, psf, numpy_backend(fft_workers=workers), args.iterations, args.repeats
        )
        rows.append((f"RichardsonLucy fft_workers={workers}", setup_s, ours_s))
        results.append(estimate)

    print(f"{'implementation':<38}{'setup s':>10}{'s/iteration':>14}{'skimage/ours':>14}")
    for name, setup_s, seconds in rows:
        setup = "-" if setup_s is None else f"{setup_s:.4f}"
        print(f"{name:<38}{setup:>10}{seconds:>14.4f}{skimage_s / seconds:>14.2f}")

    interior = tuple(slice(2 * p, n - 2 * p) for n, p in zip(expected.shape, psf.shape))
    worst = max(float(np.linalg.norm(result[interior] - expected[interior]) / np.linalg.norm(expected[interior]))
                for result in results)
    print(f"interior (two PSF widths from the border): ||ours - skimage|| / ||skimage|| = {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
