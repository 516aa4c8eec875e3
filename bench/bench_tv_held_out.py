"""Can the held-out deviance choose a TV-RL regularisation strength?

One synthetic cells volume (32x64x64, mirrored by a full PSF width on every side) per PSF
and photon level; 20 % of its counts held out (``rqml_dask.held_out.thin``). Plain RL and
TV-RL at several strengths each run from the start to their held-out optimum (checks every
5 iterations, patience 10); printed: the iteration, the held-out deviance there and the
error against the truth. The held-out rule would pick the strength of lowest deviance.

    .venv/bin/python bench/bench_tv_held_out.py
"""

from __future__ import annotations

import numpy as np
import scipy.signal

from rqml_dask.arrays import numpy_backend
from rqml_dask.held_out import HeldOutScore, thin
from rqml_dask.synthetic import gaussian_psf, make_truth, widefield_psf
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy, TotalVariationRichardsonLucy

STRENGTHS = (0.0, 0.0005, 0.002, 0.005, 0.01, 0.02)


def main() -> None:
    backend = numpy_backend()
    print("| PSF | photons | TV strength | held-out optimum (iteration) | held-out deviance | error vs truth |")
    print("|---|---|---|---|---|---|")
    for kind in ("gaussian", "widefield"):
        for photons in (100, 30):
            rng = np.random.default_rng(3)
            truth = make_truth("cells", (32, 64, 64), rng) + 0.01
            psf = gaussian_psf((2.0, 1.2, 1.2)) if kind == "gaussian" else widefield_psf()
            observed = rng.poisson(np.clip(scipy.signal.fftconvolve(truth, psf, mode="same"), 0, None) * photons) / photons
            observed = np.pad(observed, [(p, p) for p in psf.shape], mode="symmetric").astype(np.float32)
            core = tuple(slice(p, -p) for p in psf.shape)
            train, held = thin(observed, photons, 0.2, seed=1)
            score = HeldOutScore(held, photons, 0.2, backend)
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
                error = float(np.linalg.norm(best[2][core] - truth) / np.linalg.norm(truth))
                print(f"| {kind} | {photons} | {strength:g} | {best[1]} | {best[0]:.5f} | {error:.3f} |", flush=True)


if __name__ == "__main__":
    main()
