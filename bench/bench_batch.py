"""Batched vs one-at-a-time stepping of same-shape Richardson-Lucy tasks on one device.

K tasks of one tile shape and one PSF (as a pipeline's tiles are) step together through
``RichardsonLucy.step_batch`` (two batched convolutions per iteration) or one by one through
``step()``. Same inputs, same iterations, same process; results are checked to be equal.
Runs on NumPy (FFT threads as given) and, where a GPU is visible, on CuPy.

Usage: python bench/bench_batch.py [--tile 64] [--tasks 8] [--iterations 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rqml_dask.arrays import ArrayBackend, cupy_backend, gpu_count, numpy_backend
from rqml_dask.synthetic import gaussian_psf
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy


def models(backend: ArrayBackend, tile: int, tasks: int) -> list[RichardsonLucy]:
    rng = np.random.default_rng(0)
    psf = backend.asarray(gaussian_psf((2.0, 1.2, 1.2)))
    return [
        RichardsonLucy({"image": backend.asarray(rng.random((tile,) * 3).astype(np.float32)), "psf": psf}, backend)
        for _ in range(tasks)
    ]


def timed(backend: ArrayBackend, batch: list[RichardsonLucy], iterations: int, batched: bool) -> float:
    backend.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        if batched:
            RichardsonLucy.step_batch(batch)
        else:
            for model in batch:
                model.step()
    backend.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    backends = [("numpy, 1 FFT thread", numpy_backend(1)), ("numpy, 2 FFT threads", numpy_backend(2))]
    if gpu_count():
        backends.append(("cupy", cupy_backend()))
    print(f"{args.tasks} tasks of {args.tile}^3 float32, {args.iterations} iterations, best of {args.repeats}")
    print(f"{'backend':<22}{'one at a time s':>17}{'batched s':>11}{'ratio':>8}")
    for name, backend in backends:
        alone, together = models(backend, args.tile, args.tasks), models(backend, args.tile, args.tasks)
        timed(backend, alone, 2, False), timed(backend, together, 2, True)  # warm-up (FFT plans)
        one = min(timed(backend, alone, args.iterations, False) for _ in range(args.repeats))
        both = min(timed(backend, together, args.iterations, True) for _ in range(args.repeats))
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(backend.to_numpy(a.estimate), backend.to_numpy(b.estimate))
        print(f"{name:<22}{one:>17.3f}{both:>11.3f}{one / both:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
