"""Can held-out counts choose a TV-RL regularisation strength?

One synthetic cells volume (32x64x64) per PSF, photon level and seed; 20 % of its counts
held out (``rqml_dask.held_out.thin``). Plain RL and TV-RL at several strengths each run
from the start to their held-out optimum (checks every 5 iterations, patience 10). Two
criteria then rank the strengths, both from the held-out counts ``h`` alone:

* the held-out Poisson deviance of the prediction (what the stopping rule uses);
* an object-domain criterion: ``sum |F(h/s) - OTF F(x)|^2 / (|OTF|^2 + eps)`` over the
  frequencies where ``|OTF|^2 > 1e-4`` (``s`` the held-out counts per unit intensity): the
  held-out counts' spectrum less the blurred estimate's, weighted back towards the object, so
  that it ranks estimates by their in-band *object* error (the noise term is the same for
  every estimate, independent of it).

Printed per data set: the strength the truth prefers, each criterion's pick, and every
strength's error against the truth.

    .venv/bin/python bench/bench_tv_held_out.py [--eps 1e-3]
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.signal

from rqml_dask.arrays import numpy_backend
from rqml_dask.held_out import HeldOutScore, thin
from rqml_dask.synthetic import gaussian_psf, make_truth, widefield_psf
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy, TotalVariationRichardsonLucy

STRENGTHS = (0.0, 0.002, 0.005, 0.01, 0.02)
FRACTION = 0.2


def object_criterion(held: np.ndarray, estimate: np.ndarray, psf: np.ndarray, scale: float, eps: float) -> float:
    """The object-domain criterion (module docstring) of ``estimate`` (the window's shape)."""
    axes = tuple(range(held.ndim))
    centred = np.zeros(held.shape)
    centred[tuple(slice(0, p) for p in psf.shape)] = psf
    otf = np.fft.rfftn(np.roll(centred, [-(p // 2) for p in psf.shape], axis=axes), axes=axes)
    power = np.abs(otf) ** 2
    weight = np.where(power > 1e-4, 1.0 / (power + eps), 0.0)
    residual = np.fft.rfftn(held / scale, axes=axes) - otf * np.fft.rfftn(estimate.astype(np.float64), axes=axes)
    return float(np.sum(weight * np.abs(residual) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eps", type=float, default=1e-3)
    args = parser.parse_args()
    backend = numpy_backend()
    print("| PSF | photons | seed | truth's pick | deviance's pick | object criterion's pick | error at λ = " +
          " / ".join(f"{s:g}" for s in STRENGTHS) + " |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("gaussian", "widefield"):
        for photons in (100, 30):
            for seed in (3, 4):
                rng = np.random.default_rng(seed)
                truth = make_truth("cells", (32, 64, 64), rng) + 0.01
                psf = gaussian_psf((2.0, 1.2, 1.2)) if kind == "gaussian" else widefield_psf()
                blurred = np.clip(scipy.signal.fftconvolve(truth, psf, mode="same"), 0, None)
                observed = (rng.poisson(blurred * photons) / photons).astype(np.float32)
                train, held = thin(observed, photons, FRACTION, seed=1)
                score = HeldOutScore(held, photons, FRACTION, backend)
                rows = []
                for strength in STRENGTHS:
                    problem = {"image": train, "psf": psf}
                    model = (RichardsonLucy(problem, backend) if strength == 0
                             else TotalVariationRichardsonLucy(problem, backend, regularization=strength))
                    best = (np.inf, 0, None)
                    for k in range(1, 400):
                        model.step()
                        if k % 5 == 0:
                            deviance = score.deviance(model.prediction())
                            if deviance < best[0]:
                                best = (deviance, k, model.estimate.copy())
                            elif k - best[1] >= 10:
                                break
                    error = float(np.linalg.norm(best[2] - truth) / np.linalg.norm(truth))
                    rows.append((strength, error, best[0], object_criterion(held, best[2], psf, photons * FRACTION, args.eps)))
                pick = {name: min(rows, key=lambda r: r[i])[0] for name, i in (("truth", 1), ("deviance", 2), ("object", 3))}
                errors = " / ".join(f"{r[1]:.4f}" for r in rows)
                print(f"| {kind} | {photons} | {seed} | {pick['truth']:g} | {pick['deviance']:g} | {pick['object']:g} | {errors} |",
                      flush=True)


if __name__ == "__main__":
    main()
