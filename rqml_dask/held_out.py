"""Held-out counts for the stopping rule: binomial thinning of Poisson data.

Deconvolution of photon counts overfits: past some iteration, Richardson-Lucy and its family
fit the noise, the estimate gets worse, and the iterates still settle (so a rule that waits
for them to settle returns noise and calls it converged). The rule here is grounded in the
data instead. Each count ``y ~ Poisson(l)`` is split by binomial thinning,
``h ~ Binomial(y, f)`` and ``t = y - h``: ``h`` and ``t`` are *independent* Poisson counts of
means ``f l`` and ``(1 - f) l`` (Leiner, Duan, Wasserman, Ramdas: "Data fission", JASA 2023;
the same splitting as Noise2Noise-style self-supervision). The models refine ``t`` (rescaled
to the image's units), and every check scores the model's prediction of the data against
the held-out ``h`` by the Poisson deviance, which is smallest where the estimate explains
the signal and not the noise. The task's result is the iterate with the smallest held-out
deviance. Chosen over the Poisson discrepancy principle (Bertero et al., Inverse Problems
2010), which needs the background and the noise model exactly and is known to stop too
late at low counts; scikit-image, RedLionfish and DeconvolutionLab2 leave the iteration
count to the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rqml_dask.arrays import Array, ArrayBackend, slabs


SIGNIFICANCE = 2.0
"""How many standard errors better than the input's a result's held-out fit must be to count
as better by that test (:attr:`HeldOutFigures.significance`)."""

NOISE_REGIME = 0.5
"""The largest :attr:`HeldOutFigures.departure` a result may have to count as better than
its input by that test."""


@dataclass(frozen=True)
class HeldOutFigures:
    """What the stopping rule saw, for the outcome: held-out Poisson deviance per voxel of
    the task's core (lower is better; about 1 where a prediction is as good as the noise
    allows at high counts) of the input itself (``input``: the observed image taken as the
    estimate) and of the result (``result``, the iterate chosen, ``iteration``); ``fraction``
    of the counts was held out.

    The guard's two tests (:meth:`better_than_input`): ``significance``, the paired z-score
    of the per-voxel deviance of the result minus the input's (negative: the result predicts
    the held-out counts better, by that many standard errors; the counts are independent, so
    the voxels are), and ``departure``, how far the result lies from the blurred object,
    estimated from the held-out counts alone (``||x - h/s||^2 - sum h/s^2``, unbiased), as a
    fraction of the input's own noise energy (``sum y / counts_per_unit``, a lower bound of
    the input's squared error against the object).

    ``strength``: the regularisation strength the held-out counts chose (0: none beat the
    unregularised result), where the task searched for one (:mod:`rqml_dask.strength`).
    ``object_significance``, where the iterate or the strength was chosen by the held-out
    object error (``held_out_score: object``, or a strength search), is the guard's third
    test: how many standard errors the result's held-out object error
    (:meth:`HeldOutScore.object_significance`) lies below the input's. Regularisation, and
    iterating past the best prediction, trade the prediction's fit for a better object, so
    the first two tests, which judge predictions, pass over results that are better where it
    counts."""

    input: float
    result: float
    iteration: int
    fraction: float
    significance: float | None = None
    departure: float | None = None
    strength: float | None = None
    object_significance: float | None = None

    def better_than_input(self) -> bool:
        """Whether the result counts as better than its input: its held-out fit is
        :data:`SIGNIFICANCE` standard errors better (where the blur dominates the input's
        error), or it departs from the blurred object by less than :data:`NOISE_REGIME` of the
        input's noise (where the noise does: a smoothed input beats it, whatever it predicts),
        or, where the object error chose it, that error is :data:`SIGNIFICANCE` standard
        errors lower than the input's.
        Without the two figures, whether the result's deviance is below the input's."""
        if self.significance is None or self.departure is None:
            return self.result <= self.input
        if self.object_significance is not None and self.object_significance <= -SIGNIFICANCE:
            return True
        return self.significance <= -SIGNIFICANCE or self.departure < NOISE_REGIME


def thin(image: np.ndarray, counts_per_unit: float, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``image`` (``counts_per_unit`` photons per unit intensity) into the part the
    models refine, in the image's units (``float32``), and the held-out counts."""
    counts = np.rint(np.asarray(image, dtype=np.float64) * counts_per_unit).astype(np.int64)
    held = np.random.default_rng(seed).binomial(counts, fraction)
    train = (counts - held) / (counts_per_unit * (1.0 - fraction))
    return train.astype(np.float32), held.astype(np.float32)


class HeldOutScore:
    """Scores predictions of the data (the model's forward model applied to its estimate,
    in the image's units) against the held-out counts, over ``core`` of the window only (the
    task's result; near the window's edge a prediction lacks the light from past it, and
    the score there would stop the task early)."""

    def __init__(self, held: Array, counts_per_unit: float, fraction: float, backend: ArrayBackend,
                 core: tuple[slice, ...] = ()) -> None:
        xp = backend.xp
        self.xp = xp
        self.backend = backend
        self.core = core
        self.held = xp.astype(held[core], xp.float32)  # counts: exact in float32 (below 2**24)
        self.scale = counts_per_unit * fraction
        self.fraction = fraction
        safe = xp.where(self.held > 0, self.held, xp.asarray(1.0, dtype=xp.float32))
        self._held_log_held = xp.where(self.held > 0, self.held * xp.log(safe), xp.asarray(0.0, dtype=xp.float32))
        """``h log h``, in float32: a constant of every deviance, the same bits each time, so
        it cancels exactly between the iterates and baselines a task compares."""

    def _terms(self, prediction: Array, slab: tuple[slice, ...]) -> Array:
        """Per-voxel Poisson deviance ``2 (mu - h - h log mu + h log h)`` of the held-out
        counts ``h`` under the predicted means ``mu`` (``prediction``: the window's) over
        ``slab`` of the core (:func:`~rqml_dask.arrays.slabs`), in float64."""
        xp = self.xp
        held = xp.astype(self.held[slab], xp.float64)
        mu = xp.maximum(xp.astype(prediction[self.core][slab], xp.float64) * self.scale, 1e-12)
        terms = mu - held
        terms -= held * xp.log(mu)
        terms += xp.astype(self._held_log_held[slab], xp.float64)
        terms *= 2.0
        return terms

    def _slabs(self) -> list[tuple[slice, ...]]:
        return slabs(self.held.shape[0]) if self.held.ndim else [(...,)]

    def deviance(self, prediction: Array) -> float:
        """The mean per-voxel deviance over the core, summed slab by slab."""
        total = sum(float(self.xp.sum(self._terms(prediction, slab))) for slab in self._slabs())
        return total / max(self.held.size, 1)

    def significance(self, result: Array, baseline: Array) -> float:
        """The paired z-score of the per-voxel deviances of the prediction ``result`` minus
        those of ``baseline`` (negative: ``result`` fits the held-out counts better); two
        passes over the slabs (the mean, then the spread about it)."""
        xp, count = self.xp, max(self.held.size, 1)

        def difference(slab):
            return self._terms(result, slab) - self._terms(baseline, slab)

        mean = sum(float(xp.sum(difference(slab))) for slab in self._slabs()) / count
        spread = (sum(float(xp.sum((difference(slab) - mean) ** 2)) for slab in self._slabs()) / count) ** 0.5
        return mean / (spread / count**0.5) if spread > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))

    def _object_residual(self, prediction: Array) -> Array:
        """The spectrum of the held-out counts (in the image's units) less ``prediction``
        over the core (:meth:`object_error`)."""
        xp = self.xp
        residual = xp.astype(self.held, xp.float64) / self.scale - xp.astype(prediction[self.core], xp.float64)
        return self.backend.rfftn(residual, tuple(self.held.shape))

    def object_error(self, prediction: Array, weights: Array) -> float:
        """The held-out *object* error of a prediction: ``sum w |F(h/s - prediction)|^2``
        over the core's frequencies, ``w`` the model's ``weights`` for the core's shape (``1 / (|H|^2 + eps)``
        where its transfer function ``H`` passes signal, 0 elsewhere:
        :meth:`~rqml_dask.models.RefinementModel.object_weights`). The held-out counts are
        independent of every estimate made without them, so this is the in-band error of the
        estimate's object plus a noise term the same for every estimate: it ranks estimates
        as their object error does where the held-out deviance (which scores the blurred
        prediction) prefers the least regularised one."""
        spectrum = self._object_residual(prediction)
        return float(self.xp.sum(weights * (spectrum.real**2 + spectrum.imag**2)))

    def object_significance(self, result: Array, baseline: Array, weights: Array) -> float:
        """How many standard errors of the held-out noise :meth:`object_error` of the
        prediction ``result`` lies below ``baseline``'s (negative: ``result`` is better). The
        difference is linear in the held-out counts (the predictions do not depend on them);
        its variance is ``sum_i var(h_i / s) g_i^2``, ``g`` its gradient in the counts and
        ``var(h_i / s)`` the baseline's prediction over ``s``."""
        xp = self.xp
        shape = tuple(self.held.shape)
        difference = self.object_error(result, weights) - self.object_error(baseline, weights)
        change = xp.astype(baseline[self.core], xp.float64) - xp.astype(result[self.core], xp.float64)
        spectrum = self.backend.rfftn(change, shape)
        spectrum *= weights
        gradient = self.backend.irfftn(spectrum, shape)
        gradient *= math.prod(shape)
        variance = xp.maximum(xp.astype(baseline[self.core], xp.float64), 0.0) / self.scale
        spread = float(xp.sum(variance * gradient * gradient)) ** 0.5
        return difference / spread if spread > 0 else (0.0 if difference == 0 else math.copysign(math.inf, difference))

    def departure(self, estimate: Array, observed: Array, background: float = 0.0) -> float:
        """How far the window's ``estimate`` (plus the known ``background`` the data hold)
        lies from the blurred object over the core, as a fraction of the noise energy of the
        window's ``observed`` image (:class:`HeldOutFigures`)."""
        xp = self.xp
        scaled = xp.astype(self.held, xp.float64) / self.scale
        estimate = xp.astype(estimate[self.core], xp.float64) + background
        distance = float(xp.sum((estimate - scaled) ** 2)) - float(xp.sum(scaled)) / self.scale
        noise = float(xp.sum(xp.astype(observed[self.core], xp.float64))) / (self.scale / self.fraction)
        return distance / noise if noise > 0 else math.inf


def estimate_counts_per_unit(image: np.ndarray) -> float:
    """Photons per unit intensity of Poisson data from its own noise: the variance of a
    Poisson count equals its mean, and the second difference of three neighbours along
    the last axis, ``x[i-1] - 2 x[i] + x[i+1]``, removes a sampled (blurred) signal but for
    its curvature and has six times their variance. What curvature is left adds to that:
    the estimate errs towards fewer photons (more noise), the safe side for a stopping rule."""
    x = np.asarray(image, dtype=np.float64)
    second = x[..., :-2] - 2.0 * x[..., 1:-1] + x[..., 2:]
    variance = float(np.sum(second * second)) / 6.0
    total = float(np.sum(x[..., 1:-1]))
    if variance <= 0 or total <= 0:
        raise ValueError("the image has no noise to estimate its photon count from: set input.counts_per_unit")
    return total / variance
