"""What a convergence check costs a Richardson-Lucy iteration (issue 32, part 3).

A task checks every ``check_every`` iterations: the misfit and the held-out score of the
current estimate, which share one convolution (``Convolver.prediction``). The step after a
check now takes that convolution instead of blurring the same estimate again. Timed in one
process, interleaved, best of ``--repeats``, one FFT thread, on a quickstart-sized window:

* ``no checks``: plain RL steps;
* ``checks, step blurs again``: a check every ``--every`` steps, the step computing its own
  forward convolution (before);
* ``checks, step reuses``: the same, the step reusing the check's (now).

Both checked runs give the same estimates bit for bit (asserted).

Usage: python bench/bench_check_cost.py [--shape 82,94,94] [--every 5] [--iterations 60]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rqml_dask.arrays import numpy_backend
from rqml_plugins.deconvolution.richardson_lucy import EPSILON, RichardsonLucy


class BlurringAgain(RichardsonLucy):
    """The step as it was: a fresh forward convolution whatever a check just computed."""

    def _correction(self, x):
        blurred = self.convolver.forward(x)
        blurred += self.convolver.background + EPSILON
        correction = self.convolver.adjoint(self.image / blurred)
        correction *= self.convolver.normalisation
        return correction


def run(model_class: type[RichardsonLucy], problem: dict, iterations: int, every: int | None) -> tuple[float, np.ndarray]:
    model = model_class(problem, numpy_backend())
    started = time.perf_counter()
    for i in range(1, iterations + 1):
        model.step()
        if every and i % every == 0:
            model.misfit()
            model.prediction()
    return time.perf_counter() - started, model.estimate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="70,86,86", help="the window (the quickstart's interior tile with its auto halo)")
    parser.add_argument("--psf", default="13,9,9")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    psf_shape = tuple(int(v) for v in args.psf.split(","))
    rng = np.random.default_rng(0)
    grid = np.indices(psf_shape, dtype=np.float64) - (np.array(psf_shape)[:, None, None, None] - 1) / 2
    psf = np.exp(-np.sum(grid**2 / (2 * (np.array(psf_shape)[:, None, None, None] / 6) ** 2), axis=0)).astype(np.float32)
    image = rng.poisson(50.0, shape).astype(np.float32)
    problem = {"image": image, "psf": psf}
    rows = {"no checks": (RichardsonLucy, None), "checks, step blurs again": (BlurringAgain, args.every),
            "checks, step reuses": (RichardsonLucy, args.every)}
    best = {name: float("inf") for name in rows}
    estimates = {}
    for _ in range(args.repeats):
        for name, (cls, every) in rows.items():
            seconds, estimates[name] = run(cls, problem, args.iterations, every)
            best[name] = min(best[name], seconds)
    np.testing.assert_array_equal(estimates["checks, step blurs again"], estimates["checks, step reuses"])
    model = RichardsonLucy(problem, numpy_backend())
    print(f"window {shape}, psf {psf_shape}, transform {model.convolver.fft_shape}, a check every {args.every}, "
          f"{args.iterations} iterations, best of {args.repeats}")
    plain = best["no checks"]
    for name, seconds in best.items():
        print(f"{name:<28}{seconds / args.iterations * 1e3:8.2f} ms/iteration  {seconds / plain:.3f}x no checks")
    print(f"reuse / blur again: {best['checks, step reuses'] / best['checks, step blurs again']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
