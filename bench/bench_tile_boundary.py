"""Tiles against the whole volume: does a tile's window edge change its core's result?

A synthetic volume (``rqml data synth``: cells, a widefield or Gaussian PSF) is refined with a
fixed number of plain Richardson-Lucy iterations twice with the product's own code: as one
window covering the volume, and cut into tiles whose windows carry the halo ``halo: auto``
gives (:func:`rqml_plugins.deconvolution._convolution.halo_for`; also a halo of one PSF width,
the rule before). Reported: the relative L2 difference of the stitched tiles from the untiled
result, and both errors against the truth.

    .venv/bin/python bench/bench_tile_boundary.py [--shape 48,96,96] [--tile 24,48,48] [--iterations 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from rqml_dask.arrays import numpy_backend
from rqml_dask.synthetic import SynthSpec, write_synthetic
from rqml_dask.task import ArrayRef, Region
from rqml_dask.tiling import plan_regions
from rqml_dask.volumes import open_array, read_window
from rqml_plugins.deconvolution._convolution import halo_for
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy


def refine(image: ArrayRef, psf: np.ndarray, regions: list[Region], shape: tuple[int, ...], iterations: int) -> np.ndarray:
    """The stitched cores of ``regions``, each refined alone for ``iterations``."""
    out = np.zeros(shape, np.float32)
    for region in regions:
        model = RichardsonLucy({"image": read_window(image, region), "psf": psf}, numpy_backend())
        for _ in range(iterations):
            model.step()
        out[region.core_slices] = model.estimate[region.core_in_window]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="48,96,96")
    parser.add_argument("--tile", default="24,48,48")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--psf", default="widefield,gaussian")
    parser.add_argument("--photons", type=float, default=300)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    root = Path(tempfile.mkdtemp(prefix="rqml-tiles-"))
    print(f"| PSF | halo | tiles | untiled error | tiled error | tiled / untiled error | tiled vs untiled (rel. L2) | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.psf.split(","):
        store = write_synthetic(root / f"{kind}.zarr", SynthSpec(kind="cells", shape=shape, psf=kind, photons=args.photons))
        image, truth = ArrayRef(str(store), "observed"), np.asarray(open_array(ArrayRef(str(store), "truth"))[...])
        psf = np.asarray(open_array(ArrayRef(str(store), "psf"))[...])
        whole = refine(image, psf, plan_regions(shape, shape, (0,) * len(shape)), shape, args.iterations)
        untiled_error = float(np.linalg.norm(whole - truth) / np.linalg.norm(truth))
        for label, halo in (("auto", halo_for(psf, args.iterations)), ("PSF width", psf.shape)):
            started = time.perf_counter()
            regions = plan_regions(shape, tile, halo)
            tiled = refine(image, psf, regions, shape, args.iterations)
            error = float(np.linalg.norm(tiled - truth) / np.linalg.norm(truth))
            difference = float(np.linalg.norm(tiled - whole) / np.linalg.norm(whole))
            print(f"| {kind} {psf.shape} | {label} {tuple(halo)} | {len(regions)} | {untiled_error:.4f} | {error:.4f} "
                  f"| {error / untiled_error:.4f} | {100 * difference:.2f} % | {time.perf_counter() - started:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
