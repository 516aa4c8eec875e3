"""Richardson-Lucy per iteration, like with like against RedLionfish's CPU code (issue 32).

RedLionfish (0.10, ``RLDeconv3DScipy.doRLDeconvolution_DL2_4``: SciPy FFTs, float32) treats
the volume as a torus: the PSF is centred and wrapped, the transforms run at the volume's
own shape, nothing is padded. ``richardson_lucy`` with ``boundary: circular`` computes the
same model (:class:`~rqml_plugins.deconvolution._convolution.Convolver`). For cubes of 64,
128 and 256 voxels a side, a 15^3 Gaussian and a 21x25x25 widefield PSF, in one process
and one FFT thread, interleaved, best of ``--repeats``:

* ``ours``: one ``RichardsonLucy.step()`` (circular);
* ``redlionfish``: one iteration of its loop (timed between its per-iteration callbacks);
* ``floor``: two real forward and two inverse transforms at the volume's shape, what an
  iteration cannot do without.

Each line: seconds per iteration, CPU-ns per voxel-iteration, ``ours/redlionfish`` and
``ours/floor``. Issue 32 asks for at most 1.0 and 1.15.

RedLionfish is not a dependency: it runs from a folder of its own, e.g.::

    pip download redlionfish==0.10 --no-deps -d /tmp/rlf
    pip install --no-deps --target /tmp/rlf/site /tmp/rlf/RedLionfish-0.10-py3-none-any.whl
    MALLOC_TOP_PAD_=268435456 MALLOC_ARENA_MAX=1 python bench/bench_redlionfish.py --redlionfish /tmp/rlf/site

(its CPU path needs only NumPy and SciPy; the ``MALLOC_*`` settings are the workers', for both.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft

from rqml_dask.arrays import numpy_backend
from rqml_dask.synthetic import gaussian_psf, widefield_psf
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy

PSFS = {"15^3 gaussian": lambda: gaussian_psf((7 / 3, 7 / 3, 7 / 3)), "21x25x25 widefield": lambda: widefield_psf((21, 25, 25))}


def volume(size: int, psf: np.ndarray) -> np.ndarray:
    """Sparse beads on a floor, blurred circularly by ``psf``, in float32: positive data."""
    rng = np.random.default_rng(size)
    truth = np.full((size,) * 3, 1.0)
    truth[tuple(rng.integers(0, size, (3, size * 4)))] += 100.0
    centred = np.zeros(truth.shape)
    centred[tuple(slice(0, p) for p in psf.shape)] = psf / psf.sum()
    centred = np.roll(centred, [-(p // 2) for p in psf.shape], axis=(0, 1, 2))
    return np.maximum(scipy.fft.irfftn(scipy.fft.rfftn(truth) * scipy.fft.rfftn(centred), truth.shape), 1e-3).astype(np.float32)


def ours(data: np.ndarray, psf: np.ndarray, iterations: int) -> float:
    model = RichardsonLucy({"image": data, "psf": psf}, numpy_backend(1), boundary="circular")
    model.step()  # the first step allocates what the rest reuse
    start = time.perf_counter()
    for _ in range(iterations):
        model.step()
    return (time.perf_counter() - start) / iterations


def redlionfish(data: np.ndarray, psf: np.ndarray, iterations: int) -> float:
    from RedLionfishDeconv.RLDeconv3DScipy import doRLDeconvolution_DL2_4

    ticks: list[float] = []
    doRLDeconvolution_DL2_4(data, psf, niter=iterations + 1, callbkTickFunc=lambda: ticks.append(time.perf_counter()))
    return (ticks[-1] - ticks[0]) / iterations  # from the end of its first iteration: its set-up is not counted


def floor(data: np.ndarray, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        for _ in range(2):
            scipy.fft.irfftn(scipy.fft.rfftn(data, workers=1), data.shape, workers=1)
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redlionfish", type=Path, required=True, help="the folder RedLionfish is installed in")
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.redlionfish))
    for name, make in PSFS.items():
        psf = make().astype(np.float32)
        for size in (int(s) for s in args.sizes.split(",")):
            data = volume(size, psf)
            iterations = max(2, 2 * 256**3 // size**3)
            best = {"ours": np.inf, "redlionfish": np.inf, "floor": np.inf}
            for _ in range(args.repeats):
                best["ours"] = min(best["ours"], ours(data, psf, iterations))
                best["redlionfish"] = min(best["redlionfish"], redlionfish(data, psf, iterations))
                best["floor"] = min(best["floor"], floor(data, iterations))
            ns = {key: value / data.size * 1e9 for key, value in best.items()}
            print(f"{size}^3, {name:<19} ours {best['ours'] * 1e3:8.1f} ms ({ns['ours']:5.1f} ns/voxel)  "
                  f"redlionfish {best['redlionfish'] * 1e3:8.1f} ms ({ns['redlionfish']:5.1f})  "
                  f"floor {best['floor'] * 1e3:8.1f} ms ({ns['floor']:5.1f})  "
                  f"ours/redlionfish={best['ours'] / best['redlionfish']:.3f} ours/floor={best['ours'] / best['floor']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
