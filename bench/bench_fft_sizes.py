"""The transform shape a Richardson-Lucy step runs at, and the step against its FFT floor (issue 32, part 1).

For each window (the quickstart's tile windows, the 2 GiB bench's, cubes with a 15^3 and a
21x25x25 PSF) the object domain ``n + p - 1`` is rounded up per axis to a length the FFT is
fast at. Two rules, timed interleaved in one process (best of ``--repeats``, one FFT thread):

* ``next_fast_len``: SciPy's smallest 5-smooth length >= the domain (the rule before);
* ``transform_shape``: the shape :func:`~rqml_plugins.deconvolution._convolution.transform_shape`
  picks now (the cheapest by a per-factor cost model among 7-smooth lengths up to 25 % longer).

Per rule: the transform shape, one step of ``--model`` (plain RL by default;
``richardson_lucy_accelerated``, the fast recipe's first rung, adds its extrapolation and
two inner products), and the FFT floor at that shape (two real
forward and two inverse transforms, what a step cannot do without), and the step's ratio
to that floor. Last lines: ``window=... step_ratio=<old/new> floor_ratio=<step/floor>``.

Usage: python bench/bench_fft_sizes.py [--repeats 5] [--model richardson_lucy_accelerated]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.fft

from rqml_dask.arrays import numpy_backend
from rqml_dask.synthetic import gaussian_psf, widefield_psf
from rqml_plugins.deconvolution import _convolution
from rqml_dask.models import load_model

CASES = [  # (name, window shape, psf)
    ("quickstart interior tile", (70, 86, 86), lambda: gaussian_psf((2.0, 1.2, 1.2))),
    ("2 GiB bench tile", (40, 264, 520), lambda: gaussian_psf((1.0, 1.0, 1.0))),
    ("64^3, 15^3 psf", (64, 64, 64), lambda: gaussian_psf((7 / 3, 7 / 3, 7 / 3))),
    ("128^3, 15^3 psf", (128, 128, 128), lambda: gaussian_psf((7 / 3, 7 / 3, 7 / 3))),
    ("128^3, 21x25x25 psf", (128, 128, 128), lambda: widefield_psf((21, 25, 25))),
]


def old_shape(image_shape, psf_shape):
    return tuple(scipy.fft.next_fast_len(n + p - 1, True) for n, p in zip(image_shape, psf_shape))


def best_of(repeats: int, call) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def floor(shape: tuple[int, ...]):
    """Two ``rfftn`` and two ``irfftn`` at ``shape`` (float32), one FFT thread: a call."""
    x = np.random.default_rng(0).random(shape, dtype=np.float32)

    def transforms() -> None:
        for _ in range(2):
            scipy.fft.irfftn(scipy.fft.rfftn(x, workers=1), shape, workers=1)

    return transforms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="richardson_lucy")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    new_rule = _convolution.transform_shape
    model_class = load_model(args.model)
    for name, window, make_psf in CASES:
        image = rng.poisson(20.0, window).astype(np.float32)
        psf = make_psf().astype(np.float32)
        psf_shape = psf.shape
        rows = {}
        for rule, shape_of in (("next_fast_len", old_shape), ("transform_shape", new_rule)):
            _convolution.transform_shape = shape_of
            try:
                model = model_class({"image": image, "psf": psf}, numpy_backend())
            finally:
                _convolution.transform_shape = new_rule
            model.step()
            model.step()  # the accelerated model extrapolates from its third step on
            model.step()
            rows[rule] = (model, model.convolver.fft_shape, floor(model.convolver.fft_shape))
        times = {rule: [float("inf"), float("inf")] for rule in rows}
        for _ in range(args.repeats):  # interleaved
            for rule, (model, _, fft_floor) in rows.items():
                times[rule][0] = min(times[rule][0], best_of(1, model.step))
                times[rule][1] = min(times[rule][1], best_of(1, fft_floor))
        core = int(np.prod(window))
        print(f"{name}: window {window}, psf {psf_shape}")
        for rule, (_, shape, _) in rows.items():
            step, fft = times[rule]
            print(f"  {rule:>15}: transform {shape} ({np.prod(shape) / core:.2f}x the window), step {step * 1e3:7.1f} ms "
                  f"({step / core * 1e9:5.1f} ns per window voxel), FFT floor {fft * 1e3:7.1f} ms, step/floor {step / fft:.2f}")
        old, new = times["next_fast_len"][0], times["transform_shape"][0]
        print(f"window={'x'.join(map(str, window))} step_ratio={old / new:.2f} floor_ratio={new / times['transform_shape'][1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
